"""Times the real amalgamation train step (the one `python -m cka_jax.main` runs).

    python scripts/benchmark.py --method=cka --teacher=resnet18 --student=resnet18 \
        --image_size=64 --batch_size=64 [--dtype=bfloat16] [--devices=2] [--compare_torch]

Reports, after compilation: the compile time, the median step time over ``--steps`` timed
steps, images per second, the FLOPs of one step from XLA's cost analysis and the achieved
fraction of the device's peak, XLA's memory analysis of the step and the process's peak
memory. With ``--compare_torch`` (kd and cfl) it also times the PyTorch reference step
(`benchmarks.torch_reference`) on the same shapes, its steps interleaved with JAX's in this
process (JAX, PyTorch, JAX, ...: both see the same machine state), and prints the JAX/PyTorch
ratio of the medians. Writes everything to ``--out`` as JSON. This is a script, not a test:
numbers depend on the machine.

The step includes the on-device augmentation of the raw uint8 batch (as in training);
``--no_augment`` replaces it with the eval-time resize/normalise, which is what the PyTorch
reference's step sees (its augmentation would run in DataLoader workers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="cka")
    p.add_argument("--teacher", default="resnet18", help="teacher arch (all teachers)")
    p.add_argument("--teachers", type=int, default=2, help="number of teachers")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--width", type=int, default=64, help="first-stage width of every model")
    p.add_argument("--stem", default="imagenet", help="imagenet | small")
    p.add_argument("--classes_per_teacher", type=int, default=50)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    p.add_argument("--parallelism", default="mesh", help="mesh | pmap | single")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--no_augment", action="store_true")
    p.add_argument(
        "--num_data",
        type=int,
        default=50_000,
        help="training-set size for the peer methods' memory bank (CIFAR's by default)",
    )
    p.add_argument(
        "--two_views",
        action="store_true",
        help="run the second augmented view through the student for every method (kd and "
        "cka_inter use one view; cka and cka_intra always use two)",
    )
    p.add_argument(
        "--against",
        default="",
        help="another method (suffix '+2v' for --two_views) timed in the same process, its "
        "steps interleaved with this one's; prints the ratio of the two medians",
    )
    p.add_argument(
        "--profile",
        default="",
        help="directory: trace a few more steps with jax.profiler and print the ops that "
        "take the most time",
    )
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=0.0,
        help="the device's peak TFLOP/s for the fraction of peak (default: a table of known "
        "GPUs' fp32 peaks, or the CPU's cores x clock x FMA width)",
    )
    p.add_argument("--compare_torch", "--compare-torch", action="store_true")
    p.add_argument("--out", default="", help="JSON output file")
    return p.parse_args(argv)


def _ensure_host_devices(n: int) -> None:
    # Must happen before JAX starts: CPU runs get n host devices (ignored on GPU/TPU).
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def peak_flops_per_s(device) -> tuple[float | None, str]:
    """The device's peak FLOP/s for float32 and where the number comes from."""
    if device.platform == "gpu":
        known = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L4": 30e12, "V100": 15.7e12}
        for name, flops in known.items():
            if name in device.device_kind:
                return flops, f"{device.device_kind} fp32 (non-tensor-core) datasheet"
        return None, f"unknown GPU {device.device_kind}"
    if device.platform == "cpu":
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        mhz = [float(x.split(":")[1]) for x in info.splitlines() if x.startswith("cpu MHz")]
        flags = next((x for x in info.splitlines() if x.startswith("flags")), "")
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 16
        cores = os.cpu_count() or 1
        if mhz:
            ghz = max(mhz) / 1e3
            return (
                cores * ghz * 1e9 * per_cycle,
                f"{cores} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle (2 FMA pipes)",
            )
    return None, "unknown"


def build_step(args):
    """The step `main` would run for these shapes: ``(spec, student variables, teacher
    variables)``, with randomly initialised teachers (timing does not depend on weights)."""
    import dataclasses
    import functools

    from cka_jax.config import base_config, model_config
    from cka_jax.data import augment_config, eval_kwargs, eval_preprocess
    from cka_jax.models.build import init_model
    from cka_jax.train.spec import compute_dtype, student_run, view_shape

    cfg = base_config()
    cfg.augment = augment_config("imagenet")
    cfg.augment.out_size, cfg.augment.channels = args.image_size, args.channels
    cfg.compute_dtype = args.dtype
    cfg.student = model_config(args.student, width=args.width, stem=args.stem)
    teachers, teacher_vars = [], []
    for t in range(args.teachers):
        m = model_config(args.teacher, width=args.width, stem=args.stem)
        model, variables = init_model(
            m,
            args.classes_per_teacher,
            1 + t,
            view_shape(cfg.augment),
            "teacher",
            compute_dtype(cfg),
        )
        teachers.append(model)
        teacher_vars.append(variables)
    num_classes = args.classes_per_teacher * args.teachers
    spec, student_vars = student_run(
        cfg, args.method, num_classes, 0, teachers, 10_000, args.num_data
    )
    if args.two_views:  # the second view through the student even where no term needs it
        method = spec.method
        spec = dataclasses.replace(
            spec, method=dataclasses.replace(method, needs=method.needs | {"two_views"})
        )
    if args.no_augment:
        preprocess = functools.partial(eval_preprocess, **eval_kwargs(cfg.augment))
        spec = dataclasses.replace(spec, augment=lambda keys, images: preprocess(images))
    return spec, student_vars, teacher_vars if spec.method.uses_teachers else []


def prepare(args, devices):
    """``(runner, placed state, placed teacher variables, host batch)`` for ``args``."""
    import jax
    import numpy as np

    from cka_jax.train.runtime import Runner
    from cka_jax.train.step import create_train_state

    spec, student_vars, teacher_vars = build_step(args)
    runner = Runner(spec, args.parallelism, devices=devices)
    runner.check_batch_size(args.batch_size)
    rng = np.random.default_rng(0)
    size, c, b = args.image_size, args.channels, args.batch_size
    batch = {
        "image": rng.integers(0, 256, (b, size, size, c), dtype=np.uint8),
        "index": np.arange(b, dtype=np.int32),
        "label": rng.integers(0, args.classes_per_teacher * args.teachers, b).astype(np.int32),
    }
    state = create_train_state(spec, student_vars, teacher_vars, jax.random.key(0))
    return runner, runner.put_state(state), runner.put_replicated(teacher_vars), batch


class StepTimer:
    """A prepared step that times one update per `time_one()` call (blocking at its edges),
    so that two steps can be interleaved in one process.

    With ``aot`` the step is compiled ahead of time first (``compile_s``, ``compiled`` for
    XLA's cost and memory analysis) and that executable is what runs: one compile, not two.
    Otherwise the runner's jitted step runs.
    """

    def __init__(self, args, devices, *, aot: bool = False, warmup: int = 2):
        import jax

        self.runner, self.state, self.teacher_vars, self.batch = prepare(args, devices)
        self.step_fn = self.runner.step
        if aot:
            t0 = time.perf_counter()
            self.compiled = self.runner.compile(
                self.state, self.teacher_vars, self.runner.put_batch(self.batch)
            )
            self.compile_s = time.perf_counter() - t0
            self.step_fn = self._compiled_step
        for _ in range(warmup):
            self.time_one()
        jax.block_until_ready(self.state)

    def _compiled_step(self, state, teacher_vars, device_batch):
        import jax

        state, metrics = self.compiled(state, teacher_vars, device_batch)
        if self.runner.parallelism == "pmap":
            metrics = jax.tree.map(lambda a: a[0], metrics)
        return state, metrics

    def time_one(self) -> float:
        import jax

        device_batch = self.runner.put_batch(self.batch)
        t = time.perf_counter()
        self.state, self.metrics = self.step_fn(self.state, self.teacher_vars, device_batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t


def main(argv=None):
    args = parse_args(argv)
    _ensure_host_devices(args.devices)
    import jax
    import numpy as np

    from cka_jax.infra import xla_options

    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        sys.exit(f"asked for {args.devices} devices, {len(jax.devices())} available")
    # The PyTorch side first, so that a flag it cannot take fails before XLA compiles.
    torch_timer = torch_step_timer(args) if args.compare_torch else None
    timer = StepTimer(args, devices, aot=True)
    cost = timer.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = timer.compiled.memory_analysis()
    b = args.batch_size
    other = None
    if args.against:
        name, two_views = args.against.removesuffix("+2v"), args.against.endswith("+2v")
        other_args = argparse.Namespace(**{**vars(args), "method": name, "two_views": two_views})
        other = StepTimer(other_args, devices)
    times, other_times, torch_times = [], [], []
    for _ in range(args.steps):  # interleaved, so all see the same machine state
        times.append(timer.time_one())
        if other is not None:
            other_times.append(other.time_one())
        if torch_timer is not None:
            torch_times.append(torch_timer.time_one())
    step_s = float(np.median(times))
    peak, peak_source = peak_flops_per_s(devices[0])
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak_tflops"
    device_stats = devices[0].memory_stats() or {}  # None on CPU
    if args.parallelism == "pmap":
        flops *= len(devices)  # cost analysis of a pmapped step is per device
    result = {
        "config": vars(args),
        "device": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
        "jax": jax.__version__,
        "cpu_convolutions": xla_options.resolved(args.image_size),
        "compile_s": round(timer.compile_s, 2),
        "step_s_median": step_s,
        "step_s_min": float(np.min(times)),
        "images_per_s": b / step_s,
        "step_gflops": flops / 1e9,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": peak_source,
        "fraction_of_peak": flops / step_s / (peak * len(devices)) if peak else None,
        "xla_memory_mb": {
            k: getattr(memory, k) / 2**20
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
            if memory is not None and hasattr(memory, k)
        },
        "device_peak_memory_mb": (
            device_stats["peak_bytes_in_use"] / 2**20
            if "peak_bytes_in_use" in device_stats
            else None
        ),
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": float(timer.metrics["loss"]),
    }
    if other is not None:
        result["against"] = {
            "method": args.against,
            "step_s_median": float(np.median(other_times)),
            "step_s_min": float(np.min(other_times)),
        }
        result["over_against_time"] = step_s / result["against"]["step_s_median"]
    if args.profile:
        result["profile"] = profile_steps(timer, args.profile)
    if torch_timer is not None:
        result["torch"] = torch_result(torch_timer, torch_times, args)
        result["jax_over_torch_time"] = step_s / result["torch"]["step_seconds_median"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def profile_steps(timer: StepTimer, log_dir, steps=5, top=25) -> dict:
    """Traces ``steps`` more steps of ``timer`` with jax.profiler and sums the time of each
    XLA op (over every thread) from the Perfetto trace; returns the ``top`` ops in ms per
    step."""
    import collections
    import gzip

    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            timer.time_one()
    trace_file = max(Path(log_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops, kinds = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # XLA ops only: Python frames start with '$', runtime wrappers hold '::' or '('.
        if e.get("ph") != "X" or "dur" not in e or name.startswith("$") or "::" in name:
            continue
        if "(" in name or name in ("ParseArguments", "shard_args", "Handle inputs"):
            continue
        if name.split(".")[0] in ("while", "call", "conditional"):  # their body ops count
            continue
        ms = e["dur"] / 1e3 / steps
        ops[name] += ms
        kinds[name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name] += ms
    total = sum(ops.values())
    print(f"profile ({trace_file}): XLA ops, ms per step summed over threads ({total:.1f} total)")
    for title, counter in (("by kind", kinds), ("by op", ops)):
        print(f" {title}:")
        for name, ms in counter.most_common(top):
            print(f"  {ms:9.2f}  {100 * ms / total:5.1f}%  {name}")
    return {
        "trace": str(trace_file),
        "op_ms_per_step_total": total,
        "by_kind_ms": dict(kinds.most_common(top)),
        "by_op_ms": dict(ops.most_common(top)),
    }


def torch_step_timer(args):
    """The PyTorch reference step on the same shapes, warmed up, as a
    `torch_reference.StepTimer` whose steps `main` interleaves with JAX's."""
    from benchmarks import torch_reference

    if args.method not in torch_reference.METHODS or args.width != 64:
        sys.exit(
            "--compare_torch needs --method=kd or cfl (the PyTorch reference's methods) and "
            "--width=64 (torchvision's ResNets)"
        )
    step = torch_reference.TorchAmalgamationStep(
        args.method,
        [args.teacher] * args.teachers,
        args.student,
        args.classes_per_teacher,
        stem=args.stem,
    )
    return torch_reference.StepTimer(step, args.batch_size, args.image_size)


def torch_result(timer, times, args) -> dict:
    from benchmarks import torch_reference

    timer.close()
    result = torch_reference.summary(
        timer.step_obj, times, args.batch_size, args.image_size, timer.loss
    )
    if args.profile:
        result["profile"] = torch_profile(timer.step_obj, args)
    return result


def torch_profile(step, args, steps=5, top=25) -> dict:
    """torch.profiler over ``steps`` steps: the ops with the most self time, ms per step."""
    import torch

    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    images = images.contiguous(memory_format=step.memory_format)
    step.step(images)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step.step(images)
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)
    total = sum(r.self_cpu_time_total for r in rows) / 1e3 / steps
    print(f"torch profile: ops by self CPU time, ms per step ({total:.1f} total)")
    ranked = {}
    for r in rows[:top]:
        ms = r.self_cpu_time_total / 1e3 / steps
        ranked[r.key] = ms
        print(f"  {ms:9.2f}  {100 * ms / total:5.1f}%  {r.key}")
    return {"self_ms_total": total, "by_op_ms": ranked}


if __name__ == "__main__":
    main()
