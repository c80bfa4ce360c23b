"""A/B of the ImageNet stem's max-pool in one process, steps interleaved:
`cka_jax.models.pool.max_pool_3x3_s2` (strided slices, the default) against flax's
``nn.max_pool`` (XLA reduce_window), in the real train step.

    python scripts/benchmark_stem_pool.py [benchmark.py flags, e.g. --no_augment]

Defaults: resnet-18 student and two resnet-18 teachers, 64 px, batch 64, KD. Prints the
median step time of each and their ratio. A script, not a test: numbers depend on the
machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmarks import step_benchmark as benchmark  # noqa: E402


def main(argv=None):
    import flax.linen as nn
    import jax
    import numpy as np

    from cka_jax.models import resnet
    from cka_jax.train import runtime

    defaults = ["--teacher=resnet18", "--student=resnet18", "--image_size=64", "--method=kd"]
    args = benchmark.parse_args(defaults + list(argv if argv is not None else sys.argv[1:]))
    devices = jax.devices()[:1]
    variants = {"slices": benchmark.StepTimer(args, devices)}
    # The step traces the stem at its first call: swap the pool, forget the cached step.
    pooled = resnet.max_pool_3x3_s2
    resnet.max_pool_3x3_s2 = lambda x: nn.max_pool(
        x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
    )
    runtime.clear_compiled_steps()
    try:
        variants["reduce_window"] = benchmark.StepTimer(args, devices)
    finally:
        resnet.max_pool_3x3_s2 = pooled
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, timer in variants.items():
            times[name].append(timer.time_one())
    median = {name: float(np.median(t)) for name, t in times.items()}
    for name, s in median.items():
        print(f"{name:14s} {s * 1e3:8.1f} ms median over {args.steps} interleaved steps")
    print(f"slices / reduce_window = {median['slices'] / median['reduce_window']:.3f}")
    return median


if __name__ == "__main__":
    main()
