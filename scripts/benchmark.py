"""Times the real amalgamation train step (the one `python -m cka_jax.main` runs).

    python scripts/benchmark.py --method=cka --teacher=resnet18 --student=resnet18 \
        --image_size=64 --batch_size=64 [--dtype=bfloat16] [--devices=2] [--compare_torch]

See `benchmarks.step_benchmark` (and docs/performance.md) for what it reports.
"""

from benchmarks.step_benchmark import main

if __name__ == "__main__":
    main()
