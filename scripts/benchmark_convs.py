"""Every convolution of a ResNet at one input size, timed in isolation in JAX and in
PyTorch in one process, interleaved (JAX, PyTorch, JAX, ...): the forward, the input
gradient (dgrad) and the weight gradient (wgrad) of each distinct shape.

    python scripts/benchmark_convs.py --image_size=224 --batch_size=16 --rounds=5

JAX: ``lax.conv_general_dilated`` in NHWC / HWIO as `cka_jax.models.conv.Conv` computes it,
and its ``jax.vjp`` with respect to the input or the kernel, each jitted on its own (XLA
drops the unused forward). PyTorch: ``F.conv2d`` on channels_last tensors under
``no_grad`` and ``aten.convolution_backward`` with one output asked for, which is what
autograd calls (oneDNN). ``--stem_formulation=s2d`` also times the stem as space-to-depth
plus a stride-1 4x4 convolution (`benchmarks.formulations`).

Prints a table of medians per op (ms), the JAX / PyTorch ratio, and the time of each op
kind summed over one KD/CFL step's convolutions (two resnet-18 teachers forward, the
student forward and backward; the stem needs no dgrad). A script, not a test: numbers
depend on the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# XLA's CPU convolutions without YNNPACK (Eigen's kernels).
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}

# Blocks per stage (basic blocks: two 3x3 convolutions each).
BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def conv_shapes(image_size: int, arch: str) -> dict:
    """``{(name, size, cin, cout, k, stride, pad): count}``: every convolution of a torchvision
    basic-block ResNet at ``image_size`` px, by distinct shape (input size ``size``)."""
    counts = {}

    def add(name, size, cin, cout, k, s, p):
        key = (name, size, cin, cout, k, s, p)
        counts[key] = counts.get(key, 0) + 1

    add("stem 7x7/2", image_size, 3, 64, 7, 2, 3)
    size = (image_size + 1) // 2 // 2  # stem conv /2, max-pool /2
    cin = 64
    for stage, blocks in enumerate(BLOCKS[arch]):
        cout = 64 * 2**stage
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            if stride == 2:
                add(f"l{stage + 1} 3x3/2", size, cin, cout, 3, 2, 1)
                add(f"l{stage + 1} 1x1/2 down", size, cin, cout, 1, 2, 0)
                size = (size + 1) // 2
            else:
                add(f"l{stage + 1} 3x3", size, cin, cout, 3, 1, 1)
            add(f"l{stage + 1} 3x3", size, cout, cout, 3, 1, 1)
            cin = cout
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    p.add_argument("--min_ms", type=float, default=40.0, help="repeat each op to this long")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    p.add_argument(
        "--stem_formulation",
        default="",
        help="'s2d': also time the stem as space-to-depth + a stride-1 4x4 conv",
    )
    p.add_argument(
        "--no_ynn",
        action="store_true",
        help="also time JAX with XLA's YNNPACK fusions off for these convolutions (jit "
        "compiler option xla_cpu_experimental_ynn_fusion_type=''; Eigen's convolution)",
    )
    p.add_argument("--out", default="", help="JSON output file")
    return p.parse_args(argv)


def jax_ops(n, size, cin, cout, k, s, p, stem_s2d=False, options=None):
    """``{op: (fn, args)}``: jitted forward, dgrad and wgrad of one convolution (``options``:
    XLA compiler options of the jit)."""
    import jax
    import numpy as np

    from benchmarks import formulations

    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.standard_normal((n, size, size, cin), np.float32))
    w = jax.numpy.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.05)
    if stem_s2d:
        f = formulations.space_to_depth_stem_conv
    else:

        def f(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

    y = f(x, w)
    g = jax.numpy.asarray(rng.standard_normal(y.shape, np.float32))
    jit = functools.partial(jax.jit, compiler_options=options)
    fwd = jit(f)
    dgrad = jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
    wgrad = jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
    return {
        "fwd": (fwd, (x, w)),
        "dgrad": (dgrad, (x, w, g)),
        "wgrad": (wgrad, (x, w, g)),
    }, 2.0 * n * y.shape[1] * y.shape[2] * cout * k * k * cin


def torch_ops(n, size, cin, cout, k, s, p):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(n, cin, size, size, generator=gen).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, generator=gen) * 0.05).contiguous(memory_format=cl)
    with torch.no_grad():
        y = F.conv2d(x, w, stride=s, padding=p)
    g = torch.randn(y.shape, generator=gen).contiguous(memory_format=cl)
    back = torch.ops.aten.convolution_backward

    def fwd():
        with torch.no_grad():
            return F.conv2d(x, w, stride=s, padding=p)

    def grad(mask):
        return lambda: back(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

    return {"fwd": fwd, "dgrad": grad([True, False, False]), "wgrad": grad([False, True, False])}


def _timed(call, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - start) / reps


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    n = args.batch_size
    r18 = conv_shapes(args.image_size, "resnet18")
    r34 = conv_shapes(args.image_size, "resnet34")
    shapes = sorted(set(r18) | set(r34), key=lambda key: (key[0][:2], -key[1], key[0]))
    cases = {}  # (shape, op, framework) -> callable
    flops = {}
    for shape in shapes:
        _, size, cin, cout, k, s, p = shape
        ops, flops[shape] = jax_ops(n, size, cin, cout, k, s, p)
        for op, (fn, a) in ops.items():
            cases[shape, op, "jax"] = lambda fn=fn, a=a: jax.block_until_ready(fn(*a))
        for op, fn in torch_ops(n, size, cin, cout, k, s, p).items():
            cases[shape, op, "torch"] = fn
        if args.no_ynn:
            no_ynn, _ = jax_ops(n, size, cin, cout, k, s, p, options=NO_YNN)
            for op, (fn, a) in no_ynn.items():
                cases[shape, op, "jax no-ynn"] = lambda fn=fn, a=a: jax.block_until_ready(fn(*a))
        if args.stem_formulation == "s2d" and k == 7:
            s2d_ops, _ = jax_ops(n, size, cin, cout, k, s, p, stem_s2d=True)
            for op, (fn, a) in s2d_ops.items():
                cases[shape, op, "jax s2d"] = lambda fn=fn, a=a: jax.block_until_ready(fn(*a))
    reps = {}
    for key, call in cases.items():  # compile, warm up, and size the repeats
        call()
        t = _timed(call, 1)
        reps[key] = max(1, int(args.min_ms / 1e3 / max(t, 1e-6)))
    times = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, call in cases.items():  # JAX and PyTorch of one op back to back
            times[key].append(_timed(call, reps[key]))
    med = {key: float(np.median(t)) * 1e3 for key, t in times.items()}

    variants = [v for v in ("jax", "jax no-ynn", "jax s2d") if any(k[2] == v for k in cases)]
    heads = " | ".join(f"{v} ms" for v in variants)
    ratios = " | ".join(f"{v} / PT" for v in variants)
    print(f"{args.image_size} px, batch {n}; ms, median of {args.rounds} interleaved rounds")
    print(f"| conv (input, cin->cout) | count r18/r34 | op | {heads} | PyTorch ms | {ratios} |")
    print("|---" * (4 + 2 * len(variants)) + "|")
    rows = []
    for shape in shapes:
        name, size, cin, cout = shape[:4]
        for op in ("fwd", "dgrad", "wgrad"):
            t = med[shape, op, "torch"]
            row = {
                "conv": name,
                "size": size,
                "cin": cin,
                "cout": cout,
                "op": op,
                "count_r18": r18.get(shape, 0),
                "count_r34": r34.get(shape, 0),
                "torch_ms": t,
                "gflop": flops[shape] / 1e9,
            }
            for v in variants:
                # The s2d stem has no other shapes: they keep the plain convolution.
                row[f"{v}_ms"] = med.get((shape, op, v), med[shape, op, "jax"])
            rows.append(row)
            cells = " | ".join(f"{row[f'{v}_ms']:.2f}" for v in variants)
            rel = " | ".join(f"{row[f'{v}_ms'] / t:.2f}" for v in variants)
            print(
                f"| {name} ({size}, {cin}->{cout}) | {row['count_r18']}/{row['count_r34']} | "
                f"{op} | {cells} | {t:.2f} | {rel} |"
            )
    # One step's convolutions: 2 resnet-18 teachers forward; the student forward, wgrad, and
    # dgrad but for the stem (the images need no gradient).
    print("\nsummed over one step's convolutions (2 resnet-18 teachers), ms:")
    summary = {}
    for student, count in (("resnet18", "count_r18"), ("resnet34", "count_r34")):
        total = {fw: {} for fw in (*variants, "torch")}
        for fw in total:
            for row in rows:
                ms = row[f"{fw}_ms"]
                if row["op"] == "fwd":
                    teachers = 2 * row["count_r18"] * ms
                    part = {"teacher fwd": teachers, "student fwd": row[count] * ms}
                elif row["op"] == "dgrad":
                    stem = row["conv"].startswith("stem")
                    part = {"student dgrad": 0 if stem else row[count] * ms}
                else:
                    part = {"student wgrad": row[count] * ms}
                for kind, v in part.items():
                    total[fw][kind] = total[fw].get(kind, 0.0) + v
            total[fw]["all convs"] = sum(total[fw].values())
        summary[student] = total
        for kind, t in total["torch"].items():
            cells = "  ".join(
                f"{v} {total[v][kind]:8.1f} ({total[v][kind] / t:.2f})" for v in variants
            )
            print(f"  {student:9s} {kind:14s} PyTorch {t:8.1f}  {cells}")
    result = {"config": vars(args), "rows": rows, "step_convs_ms": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
