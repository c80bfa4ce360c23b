"""Input pipeline throughput: augmented images per second on this machine's default device.

    python scripts/benchmark_input.py [--sizes 224 28] [--batches 64 256] [--repeats 5]

For each input size and batch size it times, after one compile run, the median of
``--repeats`` runs of
  * ``augment``: ``augment_batch`` on a device-resident uint8 batch (one view);
  * ``two_views``: both contrastive views (images/s counts each image once);
  * ``end_to_end``: ``train_batch`` (host gather) + transfer + ``two_views``, i.e. what a
    training step waits for.
Sizes >= 64 use the 'imagenet' augmentation preset (3-channel input, all augmentations on);
smaller ones the 'mnist' preset (1-channel digits, tiled to 3 channels).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from cka_jax.data import Split, augment_batch, augment_config, train_batch, train_kwargs, two_views


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn(0))  # compile
    compile_s = time.perf_counter() - start
    times = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def bench(size: int, batch: int, repeats: int) -> dict[str, float]:
    preset = "imagenet" if size >= 64 else "mnist"
    cfg = augment_config(preset)
    cfg.out_size = size
    kw = train_kwargs(cfg)
    channels = 3 if preset == "imagenet" else 1
    rng = np.random.default_rng(0)
    split = Split(
        rng.integers(0, 256, (2 * batch, size, size, channels), dtype=np.uint8),
        np.zeros(2 * batch, np.int32),
    )
    images = jax.device_put(split.images[:batch])
    key = jax.random.key(0)

    def one(i):
        return augment_batch(jax.random.fold_in(key, i), images, **kw)

    def both(i):
        return two_views(jax.random.fold_in(key, i), images, **kw)

    def end_to_end(i):
        b = train_batch(split, batch, seed=0, step=i)
        return two_views(jax.random.fold_in(key, i), jax.device_put(b["image"]), **kw)

    out = {}
    for name, fn in [("augment", one), ("two_views", both), ("end_to_end", end_to_end)]:
        seconds, compile_s = _median_seconds(fn, repeats)
        out[name] = batch / seconds
        out[f"{name}_compile_s"] = compile_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 28])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), {jax.device_count()} device(s); "
        f"median of {args.repeats} runs after compile"
    )
    print(
        f"{'input':>12} {'batch':>6} {'augment img/s':>14} {'two_views img/s':>16} "
        f"{'end_to_end img/s':>17} {'compile s':>10}"
    )
    results = {}
    for size in args.sizes:
        for batch in args.batches:
            r = bench(size, batch, args.repeats)
            results[size, batch] = r
            ch = 3 if size >= 64 else 1
            print(
                f"{f'{size}x{size}x{ch}':>12} {batch:>6} {r['augment']:>14.0f} "
                f"{r['two_views']:>16.0f} {r['end_to_end']:>17.0f} "
                f"{r['augment_compile_s']:>10.1f}",
                flush=True,
            )
    print("ratios:")
    for size in args.sizes:
        for batch in args.batches:
            r = results[size, batch]
            print(
                f"  {size}px batch {batch}: end_to_end / two_views = "
                f"{r['end_to_end'] / r['two_views']:.2f}; two_views / augment = "
                f"{r['two_views'] / r['augment']:.2f} (0.5 = no overhead)"
            )
        if len(args.batches) > 1:
            lo, hi = min(args.batches), max(args.batches)
            print(
                f"  {size}px: augment img/s at batch {hi} / batch {lo} = "
                f"{results[size, hi]['augment'] / results[size, lo]['augment']:.2f}"
            )
    if len(args.sizes) > 1:
        big, small = max(args.sizes), min(args.sizes)
        for batch in args.batches:
            print(
                f"  batch {batch}: augment img/s at {small}px / {big}px = "
                f"{results[small, batch]['augment'] / results[big, batch]['augment']:.1f}"
            )


if __name__ == "__main__":
    main()
