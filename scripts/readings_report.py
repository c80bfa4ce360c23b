"""The diagnostics of every run in a workdir, one row per method (docs/method.md's tables).

    python scripts/readings_report.py runs/readings/default [--out=table.md]

Per method (averaged over its seeds): the merged accuracy of the final student (mean ± std)
and its paired difference to `kd` on the same seeds, the routing accuracy; each term's
median gradient share on the student network; the inter term's first and last logged value
and how much it fell; and the median peakedness of the teachers' and the student's transport
maps (mean row maximum x (B-1): 1 is uniform, B-1 one-hot; entropy / log(B-1): 1 is uniform,
0 one-hot).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TERMS = ("intra", "inter", "align", "std", "kd", "recon")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_row(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    row = {
        "run": result["method"],
        "seed": result["seed"],
        "merged": result["merged_acc"],
        "routing": result.get("routing_acc"),
        "shares": result.get("grad_share_median", {}),
    }
    inter = [m["loss/inter"] for m in metrics if "loss/inter" in m]
    if inter:
        last = float(np.mean(inter[-5:]))  # the last five logged steps, against noise
        row["inter"] = (inter[0], last, 100 * (inter[0] - last) / inter[0])
    maps = {}  # ('peak' | 'entropy', 'student' | 'teachers') -> logged values
    for m in metrics:
        for key, value in m.items():
            if key.startswith("inter/"):
                model = "student" if "student" in key else "teachers"
                maps.setdefault((key.rsplit("_", 1)[1], model), []).append(value)
    row["maps"] = {k: float(np.median(v)) for k, v in maps.items()}
    return row


def average(rows: list[dict]) -> list[dict]:
    """One row per method: every number averaged over its seeds; the merged accuracy as
    mean ± std and its paired difference to `kd` on the same seeds (when kd ran)."""
    kd = {r["seed"]: r["merged"] for r in rows if r["run"] == "kd"}
    out = []
    for method in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == method]
        merged = [r["merged"] for r in group]
        deltas = [r["merged"] - kd[r["seed"]] for r in group if r["seed"] in kd]
        row = {
            "run": f"{method} (n={len(group)})",
            "merged": merged,
            "delta": deltas if method != "kd" and deltas else None,
            "routing": float(np.mean([r["routing"] for r in group])),
            "shares": {
                t: float(np.mean([r["shares"][t] for r in group])) for t in group[0]["shares"]
            },
            "maps": {k: float(np.mean([r["maps"][k] for r in group])) for k in group[0]["maps"]},
        }
        if "inter" in group[0]:
            row["inter"] = tuple(np.mean([r["inter"] for r in group], axis=0))
        out.append(row)
    return out


def mean_std(values) -> str:
    if values is None:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    terms = [t for t in TERMS if any(t in r["shares"] for r in rows)]
    header = ["run", "merged", "Δ vs kd", "routing", *[f"share {t}" for t in terms]]
    header += ["inter first", "inter last", "fall %", "peak teachers", "peak student"]
    header += ["entropy teachers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        first, last, fall = r.get("inter", (None, None, None))
        cells = [r["run"], mean_std(r["merged"]), mean_std(r["delta"]), fmt(r["routing"])]
        cells += [fmt(r["shares"].get(t), ".3f") for t in terms]
        cells += [fmt(first, ".3f"), fmt(last, ".3f"), fmt(fall, ".1f")]
        maps = r["maps"]
        cells += [fmt(maps.get(("peak", "teachers"))), fmt(maps.get(("peak", "student")))]
        cells += [fmt(maps.get(("entropy", "teachers")))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    run_dirs = sorted(p.parent for p in args.workdir.glob("runs/*/seed_*/result.json"))
    if not run_dirs:
        raise SystemExit(f"no finished runs under {args.workdir}/runs")
    text = table(average([run_row(d) for d in run_dirs]))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
