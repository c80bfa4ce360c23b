"""A/B of the CPU convolution kernels (`cka_jax.infra.xla_options`) in the real train step, in one
process, steps interleaved: XLA's default ('ynnpack'), YNNPACK fusions off ('eigen') and
YNNPACK off for stand-alone convolutions ('mixed'), and with ``--torch`` the PyTorch reference step
(`benchmarks.torch_reference`, kd and cfl) as a third, interleaved the same way.

    python scripts/benchmark_cpu_convolutions.py --method=cfl --student=resnet34 \
        --image_size=224 --batch_size=16 --no_augment --steps=5 --torch

Takes `scripts/benchmark.py`'s flags (defaults here: resnet-18 student and two resnet-18
teachers, 64 px, batch 64, KD). Prints the median step time of each and their ratios. A
script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import step_benchmark as benchmark  # noqa: E402


def main(argv=None):
    import jax
    import numpy as np

    from cka_jax.infra import xla_options

    argv = list(sys.argv[1:] if argv is None else argv)
    with_torch = "--torch" in argv
    argv = [a for a in argv if a != "--torch"]
    defaults = ["--teacher=resnet18", "--student=resnet18", "--image_size=64", "--method=kd"]
    args = benchmark.parse_args(defaults + argv)
    devices = jax.devices()[:1]
    timers = {}
    choices = ("eigen", "ynnpack", "mixed")  # 'auto' is one of them, by image size
    for choice in choices:
        xla_options.set_cpu_convolutions(choice)  # the runner's step is compiled per choice
        timers[choice] = benchmark.StepTimer(args, devices).time_one
    xla_options.set_cpu_convolutions("auto")
    if with_torch:
        timers["pytorch"] = benchmark.torch_step_timer(args).time_one
    times = {name: [] for name in timers}
    for _ in range(args.steps):
        for name, time_one in timers.items():
            times[name].append(time_one())
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(
        f"{args.method}, {args.student} student, {args.teachers} {args.teacher} teachers, "
        f"{args.image_size} px, batch {args.batch_size}{', no augment' if args.no_augment else ''}"
    )
    for name, t in times.items():
        print(
            f"{name:8s} {median[name] * 1e3:8.1f} ms median over {args.steps} interleaved steps "
            f"({', '.join(f'{x * 1e3:.0f}' for x in t)})"
        )
    for choice in ("eigen", "mixed"):
        print(f"{choice} / ynnpack = {median[choice] / median['ynnpack']:.3f}")
    print(f"'auto' uses {xla_options.resolved(args.image_size)!r} at {args.image_size} px")
    if with_torch:
        for choice in choices:
            print(f"{choice} / pytorch = {median[choice] / median['pytorch']:.3f}")
    return median


if __name__ == "__main__":
    main()
