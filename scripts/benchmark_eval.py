"""Sharded evaluation, timed in one process (or one set of joined processes) with the two
variants interleaved (A, B, A, B, ...), so both see the same machine state.

Devices (default):

    python scripts/benchmark_eval.py --devices=2 --arch=resnet18 --image_size=64 \
        --num_images=512 --batch_size=256 --rounds=5

scores the split on 1 device against ``--devices`` devices. On a CPU these are forced host
devices (``--xla_force_host_platform_device_count``, set here before JAX starts), which
share the machine's cores; on a GPU host they are the GPUs.

Processes:

    python scripts/benchmark_eval.py --processes=2 ...

starts that many processes with one device each, joined over localhost, and compares what
each process did before sharding (every process scores the whole split on its own device)
with the sharded scoring (each scores its share; the logits are gathered).

Prints XLA's FLOPs per device per batch (the compiled program's cost analysis), the median
seconds per scoring of the split for each variant and their ratio. A script, not a test:
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def launch(args, argv) -> None:
    """Runs this script in ``args.processes`` joined processes; prints process 0's output."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(args.processes),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv],
            env={**env, "JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE if i else None,
            stderr=subprocess.DEVNULL if i else None,
        )
        for i in range(args.processes)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"exit codes {codes}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    joined = "JAX_NUM_PROCESSES" in os.environ
    if args.processes > 1 and not joined:
        return launch(args, argv)
    if not joined and args.devices > 1:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import numpy as np

    from cka_jax.config import distributed_config, model_config
    from cka_jax.data import Split, augment_config
    from cka_jax.evaluation import evaluate
    from cka_jax.infra import distributed
    from cka_jax.models.build import init_model

    distributed.initialize(distributed_config())
    aug = augment_config("imagenet")
    aug.out_size = args.image_size
    m = model_config(args.arch, width=args.width, stem=args.stem)
    shape = (args.image_size, args.image_size, 3)
    model, variables = init_model(m, args.num_classes, 0, shape, "student")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.num_images, *shape), dtype=np.uint8)
    split = Split(images, rng.integers(0, args.num_classes, args.num_images))
    devices = jax.devices()
    if joined:
        variants = {
            "whole split per process": jax.local_devices()[:1],
            f"sharded over {len(devices)} processes": devices,
        }
    else:
        if len(devices) < args.devices:
            raise SystemExit(f"{args.devices} devices asked for, {len(devices)} found")
        variants = {"1 device": devices[:1], f"{args.devices} devices": devices[: args.devices]}
    scorers = {
        name: evaluate.Scorer(model, aug, args.batch_size, devices=d)
        for name, d in variants.items()
    }
    say = print if distributed.is_primary() else (lambda *a: None)
    logits = {name: s.logits(variables, split) for name, s in scorers.items()}  # compiles
    a, b = logits.values()
    say(f"max |logit difference| {np.max(np.abs(a - b)):.2e}")
    if not joined:  # cost analysis of programs spanning processes is not needed here
        for name, scorer in scorers.items():
            # XLA's cost analysis of the compiled program is per device.
            replicated, sharded = evaluate._shardings(scorer.devices)
            placed = jax.device_put(variables, replicated)
            batch = jax.device_put(images[: scorer.batch_size], sharded)
            cost = scorer.forward.lower(placed, batch).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            say(f"{name:10s} {cost['flops'] / 1e9:.2f} GFLOP per device per batch")
    times = {name: [] for name in scorers}
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            distributed.barrier(f"time {name}")
            start = time.perf_counter()
            scorer.logits(variables, split)
            times[name].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        say(
            f"{name}: median {median[name]:.3f} s per scoring of {args.num_images} images "
            f"({', '.join(f'{x:.3f}' for x in t)})"
        )
    first, second = median
    say(f"{second} / {first} = {median[second] / median[first]:.3f}")
    return median


if __name__ == "__main__":
    main()
