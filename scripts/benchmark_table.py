"""Runs scripts/benchmark.py over a grid, one process per cell, and prints one markdown table.

    python scripts/benchmark_table.py --grid=methods     # kd/cfl/cka_inter/cka at B=64, 256
    python scripts/benchmark_table.py --grid=torch       # JAX vs PyTorch, resnet18 x3, 64 px
    python scripts/benchmark_table.py --grid=dtype       # float32 vs bfloat16
    python scripts/benchmark_table.py --grid=xla_flags   # XLA CPU flag candidates

Every cell is measured in this one invocation (no numbers carried over from other runs), so
the ratios in a table compare like with like. Each process gets the environment it needs
(XLA_FLAGS must be set before JAX starts, hence one process per cell).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "benchmark.py"

# The shapes the issue names: resnet-18 student and two resnet-18 teachers at 64 px.
R18 = ["--teacher=resnet18", "--student=resnet18", "--image_size=64"]
# The embedded default's shapes (configs/default.py): resnet10 width 16, 28 px digits.
DEFAULT = [
    "--teacher=resnet10",
    "--student=resnet10",
    "--width=16",
    "--stem=small",
    "--image_size=28",
    "--channels=3",
    "--classes_per_teacher=5",
]

GRIDS = {
    "methods": [
        (f"{shape} {m} B={b}", [*args, f"--method={m}", f"--batch_size={b}"], {})
        for shape, args in (("default", DEFAULT), ("r18/64px", R18))
        for b in (64, 256)
        for m in ("kd", "cfl", "cka_inter", "cka")
    ],
    "torch": [
        (f"{m} B=64", [*R18, f"--method={m}", "--batch_size=64", "--compare_torch", *extra], {})
        for m in ("kd", "cfl")
        for extra in ([], ["--no_augment"])
    ],
    "dtype": [
        (f"{shape} {m} {d}", [*args, f"--method={m}", "--batch_size=64", f"--dtype={d}"], {})
        for shape, args in (("default", DEFAULT), ("r18/64px", R18))
        for m in ("kd", "cka")
        for d in ("float32", "bfloat16")
    ],
    "xla_flags": [
        (f"{shape} cka {name}", [*args, "--method=cka", "--batch_size=64"], {"XLA_FLAGS": flags})
        for shape, args in (("default", DEFAULT), ("r18/64px", R18))
        for name, flags in (
            ("(none)", ""),
            ("oneDNN", "--xla_cpu_use_onednn=true"),
            ("XNNPACK", "--xla_cpu_use_xnnpack=true"),
            ("512-bit vectors", "--xla_cpu_prefer_vector_width=512"),
            ("concurrency scheduler", "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
        )
    ],
}


def run_cell(args, env_extra, steps) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, **env_extra}
        command = [sys.executable, str(SCRIPT), *args, f"--steps={steps}", f"--out={out.name}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        return json.loads(Path(out.name).read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="", help="also write all results as JSON")
    args = parser.parse_args()
    rows = []
    header = "| cell | compile s | step ms (median) | img/s | GFLOP/step | % of peak | vs first |"
    print(header + "\n|---|---|---|---|---|---|---|", flush=True)
    first = {}
    for name, cell_args, env in GRIDS[args.grid]:
        r = run_cell(cell_args, env, args.steps)
        rows.append({"cell": name, "args": cell_args, "env": env, **r})
        if "error" in r:
            print(f"| {name} | error: {r['error']} |", flush=True)
            continue
        group = name.split()[0]
        first.setdefault(group, r["step_s_median"])
        frac = r["fraction_of_peak"]
        cells = [
            name,
            f"{r['compile_s']:.1f}",
            f"{r['step_s_median'] * 1e3:.1f}",
            f"{r['images_per_s']:.0f}",
            f"{r['step_gflops']:.2f}",
            f"{frac * 100:.1f}" if frac else "-",
            f"{r['step_s_median'] / first[group]:.2f}x",
        ]
        if "torch" in r:
            t = r["torch"]["step_seconds_median"]
            cells[0] += f" (torch {t * 1e3:.1f} ms, JAX/torch {r['jax_over_torch_time']:.2f})"
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
