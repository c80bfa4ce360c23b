"""Port a torchvision ResNet checkpoint into a cka_jax model checkpoint (a teacher).

    python scripts/port_torch_resnet.py --arch resnet34 --checkpoint teacher.pth --out DIR \
        [--image-size 224] [--class-names classes.txt] [--stem imagenet] [--overwrite]

``--checkpoint`` is a ``.pth``/``.pt`` file (read with ``torch.load(weights_only=True)``:
files whose unpickling would run code are refused) or a ``.safetensors`` file (no torch
needed). The state_dict may be nested under ``state_dict``/``model_state``/``model`` and may
carry DataParallel's ``module.`` prefix. ``--arch`` may be left out: it is then read off the
checkpoint's layout. DIR is written with `cka_jax.checkpoint.save_model` (``variables/`` +
``model.json``) and can be named as a teacher in a config:
``config.teachers = ({'checkpoint': DIR}, ...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ARCHS = ("resnet18", "resnet34", "resnet50")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="port_torch_resnet.py",
        description="Port a torchvision ResNet (.pth or .safetensors) to a cka_jax checkpoint.",
    )
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="torchvision architecture; default: read off the checkpoint's layout",
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help=".pth/.pt or .safetensors file"
    )
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="input size the model was trained at (recorded in model.json; default 224)",
    )
    parser.add_argument(
        "--class-names",
        type=Path,
        default=None,
        help="text file with one class name per line, in the classifier's output order "
        "(default: class0, class1, ...)",
    )
    parser.add_argument(
        "--stem",
        choices=("imagenet", "small"),
        default="imagenet",
        help="'imagenet' (torchvision's 7x7/2 conv + max-pool, the default) or 'small' "
        "(3x3/1 conv1 and no max-pool, as CIFAR variants use)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it already holds files"
    )
    args = parser.parse_args(argv)
    if args.image_size < 1:
        parser.error(f"--image-size must be positive, got {args.image_size}")
    return args


def read_class_names(path: Path, num_classes: int) -> list[str]:
    if path is None:
        return [f"class{i}" for i in range(num_classes)]
    if not path.is_file():
        raise ValueError(f"--class-names file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(
            f"--class-names file {path} lists {len(names)} names but the checkpoint's "
            f"classifier (fc.weight) has {num_classes} classes"
        )
    return names


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def port_checkpoint(args: argparse.Namespace) -> dict:
    """Ports ``args.checkpoint`` into ``args.out``; returns the written meta."""
    from cka_jax import checkpoint, port

    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} already holds files; pass --overwrite to replace it")
    state_dict = port.load_state_dict(args.checkpoint)
    arch = args.arch or port.guess_arch(state_dict)
    if arch is None:
        raise ValueError(
            f"cannot tell which ResNet {args.checkpoint} holds; pass --arch (one of {ARCHS})"
        )
    model, variables = port.from_torchvision(state_dict, arch, stem=args.stem)
    num_classes = int(model.num_classes)
    channels = int(state_dict["conv1.weight"].shape[1])
    meta = {
        "arch": arch,
        "num_classes": num_classes,
        "width": int(model.width),
        "stem": args.stem,
        "channels": channels,
        "image_size": int(args.image_size),
        "class_names": read_class_names(args.class_names, num_classes),
        "preprocess": {
            "out_size": int(args.image_size),
            "channels": channels,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_fraction": 0.875,
        },
        "source": "torchvision",
        "source_checkpoint": str(args.checkpoint.absolute()),
        "source_sha256": sha256(args.checkpoint),
    }
    checkpoint.save_model(out, variables, meta)
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = port_checkpoint(args)
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {meta['arch']} with {meta['num_classes']} classes "
        f"(stem {meta['stem']}, {meta['channels']} input channels). Name it as a teacher: "
        f"config.teachers = ({{'checkpoint': '{args.out}'}}, ...)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
