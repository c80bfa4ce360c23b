"""Port torchvision ResNet weights to the Flax ResNets of `cka_jax.models`.

Architectures: torchvision's ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``,
``resnet152``, ``wide_resnet50_2``, ``wide_resnet101_2``, ``resnext50_32x4d`` and
``resnext101_32x8d`` (and cka_jax's own ``resnet10``), any number of classes.

The mapping is pure numpy: torch is needed only to read ``.pth`` files; ``.safetensors``
files are read with the safetensors package alone.

    state_dict = load_state_dict("teacher.pth")      # or "teacher.safetensors"
    model, variables = from_torchvision(state_dict, "resnet34")
    logits, features = model.apply(variables, images_nhwc)   # what torchvision computes

torchvision name                   Flax variable (``variables[collection][...]``)
``conv1.weight`` (O, I, kh, kw)    ``params/conv1/kernel`` (kh, kw, I, O)
``bn1.weight`` / ``bn1.bias``      ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``_var``    ``batch_stats/bn1/mean`` / ``batch_stats/bn1/var``
``layer2.0.conv1.weight``          ``params/layer2_0/conv1/kernel``
``layer2.0.conv2.weight`` grouped  (O, I/groups, 3, 3) -> (3, 3, I/groups, O), ResNeXt's
``layer2.0.downsample.0/1.*``      ``params/layer2_0/downsample_conv`` / ``downsample_bn``
``fc.weight`` (out, in)            ``params/fc/kernel`` (in, out); ``fc.bias`` -> ``fc/bias``

``num_batches_tracked`` entries carry no weights and are ignored. Input normalisation is not
part of the model (it stays in the data pipeline), exactly as in torchvision. timm's plain
ResNets (``resnet18`` ... ``resnet152``, ``wide_resnet*``, ``resnext*`` without a suffix such
as ``d``) name and shape their tensors exactly as torchvision does, so their checkpoints port
unchanged (docs/porting.md).

Checkpoints from the internet are untrusted: ``.pth`` files are read with
``torch.load(..., weights_only=True)``, which refuses pickles that would build anything other
than tensors and plain containers, so a file that would run code on load is an error. A file
that is empty, truncated, corrupt or of another format than its name says is a `PortError`
naming the file and what was expected.

The command line (``python -m cka_jax.port --help``) writes a ported checkpoint as a cka_jax
model checkpoint, usable as a teacher; see `main`.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import sys
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.models import ARCHITECTURES, create_model

# Keys under which training scripts commonly nest the state_dict, tried in this order.
NESTING_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net")
# Prefixes added by DataParallel / DistributedDataParallel and by torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# torchvision's ResNets by (blocks per stage, block type, groups, width_per_group), the last
# two read off the 3x3 ``conv2`` weights (O, I / groups, 3, 3). Only the ones in
# `cka_jax.models.ARCHITECTURES` can be ported; the others are named in errors.
KNOWN_LAYOUTS = {
    ((1, 1, 1, 1), "basic", 1, 64): "resnet10",
    ((2, 2, 2, 2), "basic", 1, 64): "resnet18",
    ((3, 4, 6, 3), "basic", 1, 64): "resnet34",
    ((3, 4, 6, 3), "bottleneck", 1, 64): "resnet50",
    ((3, 4, 23, 3), "bottleneck", 1, 64): "resnet101",
    ((3, 8, 36, 3), "bottleneck", 1, 64): "resnet152",
    ((3, 4, 6, 3), "bottleneck", 1, 128): "wide_resnet50_2",
    ((3, 4, 23, 3), "bottleneck", 1, 128): "wide_resnet101_2",
    ((3, 4, 6, 3), "bottleneck", 32, 4): "resnext50_32x4d",
    ((3, 4, 23, 3), "bottleneck", 32, 8): "resnext101_32x8d",
    ((3, 4, 23, 3), "bottleneck", 64, 4): "resnext101_64x4d",
}
# What the command line ports: torchvision's architectures that cka_jax builds.
TORCHVISION_ARCHS = tuple(a for a in ARCHITECTURES if a != "resnet10")
INSTALL_HINT = "pip install -e '.[port]'"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class PortError(ValueError):
    """A state_dict or checkpoint file that cannot be ported (the message says why)."""


class UntrustedCheckpointError(PortError):
    """A ``.pth`` file that ``torch.load(weights_only=True)`` refuses to unpickle."""


# --- reading files ------------------------------------------------------------------------


def _to_numpy(name: str, value) -> np.ndarray:
    """A tensor or array-like as a numpy array (torch tensors without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype.itemsize < 4:  # bf16/fp16: no numpy bf16
            value = value.float()
        return value.numpy()
    if not hasattr(value, "shape"):
        raise PortError(
            f"state_dict entry '{name}' is a {type(value).__name__}, not a tensor or array"
        )
    return np.asarray(value)


def unwrap_state_dict(obj) -> dict:
    """The flat ``{name: tensor}`` state_dict inside a loaded checkpoint.

    Accepts a state_dict nested under one of `NESTING_KEYS` (e.g. ``{'model_state': ...,
    'epoch': 3}``, possibly several levels deep) and strips a ``module.`` prefix
    (DataParallel) or ``_orig_mod.`` prefix (torch.compile) that every name shares.
    Values are returned as they are (torch tensors or arrays).
    """
    for _ in range(8):
        if not isinstance(obj, Mapping):
            raise PortError(
                f"expected a state_dict (a mapping of names to tensors), got a {type(obj).__name__}"
            )
        nested = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    else:
        raise PortError("state_dict is nested more than 8 levels deep")
    state = dict(obj)
    if not state:
        raise PortError("the state_dict is empty")
    if not any(hasattr(v, "shape") for v in state.values()):
        keys = ", ".join(repr(k) for k in list(state)[:10])
        raise PortError(
            f"found no tensors: top-level keys are {keys}; expected torchvision names such as "
            f"'conv1.weight', or a state_dict nested under one of {list(NESTING_KEYS)}"
        )
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _sniff(path: Path) -> str:
    """What a file's first bytes say it holds: 'empty', 'safetensors' (an 8-byte header size,
    then the JSON header), 'zip' (torch.save since PyTorch 1.6), 'pickle' (older torch.save,
    or pickle.dump), 'tar' (torch.save before PyTorch 0.4), 'text', or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    if head[257:262] == b"ustar":
        return "tar"
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return "text"
    return "unknown"


_FORMATS = {
    "zip": "a PyTorch checkpoint (torch.save's zip archive)",
    "pickle": "a pickle (PyTorch's legacy torch.save format, or pickle.dump)",
    "tar": "a tar archive (PyTorch's oldest torch.save format)",
    "safetensors": "safetensors data",
    "text": "text",
}


def _reason(err: BaseException) -> str:
    """A one-line summary of ``err``: torch's ``WeightsUnpickler error`` line when there is
    one (its messages run to many lines of advice), else the message's first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not detail and i + 1 < len(lines):
                detail = lines[i + 1]
            lines = [f"WeightsUnpickler error: {detail}"]
            break
    first = lines[0] if lines else ""
    if len(first) > 160 and ". " in first:  # torch appends sentences of advice
        first = first[: first.index(". ") + 1]
    if len(first) > 240:
        first = first[:237] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _load_torch(path: Path):
    kind = _sniff(path)
    if kind == "empty":
        raise PortError(f"{path} is empty (0 bytes); expected a PyTorch checkpoint (torch.save)")
    if kind == "safetensors":
        raise PortError(
            f"{path} holds safetensors data, not a PyTorch checkpoint: rename it to end in "
            f".safetensors"
        )
    if kind not in ("zip", "pickle", "tar"):
        found = "holds text" if kind == "text" else "is neither"
        raise PortError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or, before "
            f"PyTorch 1.6, a pickle), and this file {found}"
        )
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs PyTorch, which is not installed: install the port extra "
            f"({INSTALL_HINT}), or convert the file to .safetensors, which needs no torch"
        ) from err
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: the error says more
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported operand" in str(err):  # an opcode no pickle writer emits here: garbage
            raise PortError(
                f"could not read {path} as a PyTorch checkpoint: it is truncated or corrupt, "
                f"or a pickle that torch.save did not write ({_reason(err)})"
            ) from err
        raise UntrustedCheckpointError(
            f"refused to load {path}: it is an untrusted pickle that builds objects other "
            f"than tensors and plain containers (loading it could run arbitrary code), so "
            f"torch.load(weights_only=True) rejected it. Only plain state_dicts are accepted; "
            f"if you trust the file's origin, re-save its state_dict (torch.save("
            f"model.state_dict(), ...)) or convert it to .safetensors. torch said: "
            f"{_reason(err)}"
        ) from err
    except Exception as err:  # noqa: BLE001 - corrupt/truncated/not a torch file
        raise PortError(
            f"could not read {path} as a PyTorch checkpoint: it is truncated, corrupt or not "
            f"written by torch.save ({_reason(err)})"
        ) from err


def _load_safetensors(path: Path) -> dict:
    kind = _sniff(path)
    if kind == "empty":
        raise PortError(f"{path} is empty (0 bytes); expected a safetensors file")
    if kind in ("zip", "pickle", "tar", "text"):
        rename = "; rename it to end in .pth" if kind != "text" else ""
        raise PortError(f"{path} is not a safetensors file: it holds {_FORMATS[kind]}{rename}")
    try:
        from safetensors.numpy import load_file
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the safetensors package: pip install safetensors "
            f"(or {INSTALL_HINT})"
        ) from err
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - corrupt file or dtype numpy cannot hold
        raise PortError(
            f"could not read {path} as a safetensors file: it is truncated, corrupt or of "
            f"another format ({_reason(err)})"
        ) from err


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a torchvision state_dict from ``.pth``/``.pt`` (torch, weights only) or
    ``.safetensors`` (no torch needed); returns it flat, as float numpy arrays.

    Nested checkpoints and ``module.`` prefixes are unwrapped (`unwrap_state_dict`). A
    ``.pth`` whose unpickling would build anything but tensors raises
    `UntrustedCheckpointError`; an empty, truncated or corrupt file, or one whose contents
    are not the format its name says, raises `PortError` naming the file and the format
    expected. A missing file raises `FileNotFoundError`.
    """
    path = Path(path)
    if path.is_dir():
        raise PortError(f"{path} is a directory; expected a .pth or .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        obj = _load_safetensors(path)
    elif name.endswith(TORCH_SUFFIXES):
        obj = _load_torch(path)
    else:
        raise PortError(
            f"cannot tell the format of {path} from its extension: use "
            f"{', '.join(TORCH_SUFFIXES)} for PyTorch checkpoints or .safetensors"
        )
    try:
        state = unwrap_state_dict(obj)
    except PortError as err:
        raise PortError(f"{path}: {err}") from err
    return {k: _to_numpy(k, v) for k, v in state.items()}


# --- architecture -------------------------------------------------------------------------


def _grouping(state_dict, counts: tuple[int, ...]) -> tuple[int, int] | None:
    """``(groups, width_per_group)`` that the blocks' 3x3 ``conv2`` weights say (a majority
    vote, so that one mis-shaped tensor is reported as such rather than as another arch);
    None when no block has a readable ``conv2``.

    torchvision's inner width is ``int(planes * width_per_group / 64) * groups`` with planes
    ``stem * 2**stage``, and a grouped weight is (inner, inner / groups, 3, 3).
    """
    conv1 = state_dict.get("conv1.weight")
    stem = int(conv1.shape[0]) if conv1 is not None and len(conv1.shape) == 4 else 64
    votes: Counter = Counter()
    for stage, blocks in enumerate(counts, 1):
        planes = stem * 2 ** (stage - 1)
        for index in range(blocks):
            weight = state_dict.get(f"layer{stage}.{index}.conv2.weight")
            if weight is None or len(weight.shape) != 4:
                continue
            inner, per_group = int(weight.shape[0]), int(weight.shape[1])
            if per_group < 1 or inner % per_group or (per_group * 64) % planes:
                continue
            votes[(inner // per_group, per_group * 64 // planes)] += 1
    return votes.most_common(1)[0][0] if votes else None


def _layout(state_dict) -> tuple[tuple[int, ...], str, tuple[int, int] | None]:
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state_dict:
        m = re.match(r"layer(\d+)\.(\d+)\.(\w+)", str(key))
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) in ("conv3", "bn3")
    stages = max(blocks, default=0)
    counts = tuple(len(blocks.get(i, ())) for i in range(1, stages + 1))
    return counts, "bottleneck" if bottleneck else "basic", _grouping(state_dict, counts)


def guess_arch(state_dict) -> str | None:
    """The torchvision ResNet a state_dict's tensors look like, e.g. 'resnet34' or
    'resnext50_32x4d'; None when no known layout fits.

    Read off the blocks per stage, whether blocks have a ``conv3`` (bottleneck), and the
    channel counts and groups of the blocks' 3x3 ``conv2`` weights (plain, wide or ResNeXt).
    Without readable ``conv2`` weights, the block counts alone decide when they name one
    architecture.
    """
    counts, kind, grouping = _layout(state_dict)
    if grouping is not None:
        return KNOWN_LAYOUTS.get((counts, kind, *grouping))
    names = {name for (c, k, _, _), name in KNOWN_LAYOUTS.items() if (c, k) == (counts, kind)}
    return names.pop() if len(names) == 1 else None


def _describe_layout(state_dict) -> str:
    counts, kind, grouping = _layout(state_dict)
    text = f"{kind} blocks per stage {counts}"
    if grouping is not None:
        text += f", groups={grouping[0]}, width_per_group={grouping[1]}"
    return text


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    *modules, leaf = path
    parts = []
    for m in modules:
        if re.fullmatch(r"layer\d+_\d+", m):
            parts.append(m.replace("_", "."))
        elif m == "downsample_conv":
            parts.append("downsample.0")
        elif m == "downsample_bn":
            parts.append("downsample.1")
        else:
            parts.append(m)
    if collection == "batch_stats":
        suffix = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join([*parts, suffix])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO -> OIHW (grouped: (kh, kw, I/g, O) -> (O, I/g, kh, kw))
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:  # Dense (in, out) -> Linear (out, in)
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _to_flax(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _expected(model, in_channels: int) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
    """torchvision name -> (collection, flax path, torch-layout shape) for ``model``."""
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels)))
    )
    out = {}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(abstract.get(collection, {}))[0]
        for key_path, leaf in flat:
            path = tuple(k.key for k in key_path)
            out[_torch_name(collection, path)] = (collection, path, _torch_shape(leaf.shape))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _check_layout(state: dict, arch: str) -> None:
    """The tensors' layout is torchvision's ``arch`` (not a timm variant, not another arch)."""
    variant = [
        k
        for k in state
        if re.fullmatch(r"conv1\.\d+\.weight|layer\d+\.\d+\.downsample\.2\.\w+", str(k))
    ]
    if variant:
        raise PortError(
            f"this state_dict is not a torchvision {arch}: it has tensors such as "
            f"'{sorted(variant)[0]}', a deep stem ('conv1.0', 'conv1.1', ...) or average-pool "
            f"downsampling ('downsample.1' conv, 'downsample.2' norm), as timm's ResNet "
            f"variants resnet*c/d/s/t have. cka_jax ports torchvision's layout only (which "
            f"timm's plain {', '.join(TORCHVISION_ARCHS)} share)"
        )
    guessed = guess_arch(state)
    if guessed is not None and guessed != arch:
        advice = (
            f"port it as arch '{guessed}'"
            if guessed in ARCHITECTURES
            else f"cka_jax can port {', '.join(sorted(ARCHITECTURES))} only"
        )
        raise PortError(
            f"this state_dict is not a {arch}: its tensors look like a {guessed} "
            f"({_describe_layout(state)}); {advice}"
        )


def _check_tensors(state: dict, expected: dict, model, arch: str, stem: str) -> None:
    """Every tensor ``arch`` needs is there with its shape, and no other."""
    groups = ARCHITECTURES[arch].groups

    problems = []
    for name, (_, _, shape) in expected.items():
        if name not in state:
            problems.append(f"missing tensor '{name}' (expected shape {shape})")
    for name, value in state.items():
        if name not in expected:
            problems.append(f"unexpected tensor '{name}' with shape {tuple(value.shape)}")
        elif tuple(value.shape) != expected[name][2]:
            grouped = (
                f" (a grouped 3x3 convolution: {groups} groups, so its weight is "
                f"(out, in / {groups}, 3, 3))"
                if groups > 1 and name.endswith(".conv2.weight")
                else ""
            )
            problems.append(
                f"tensor '{name}' has shape {tuple(value.shape)} but {arch} expects "
                f"{expected[name][2]}{grouped}"
            )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] * (len(problems) > 20))
        raise PortError(
            f"cannot port this state_dict as a torchvision {arch} (stem {stem!r}, "
            f"{model.num_classes} classes from fc.weight):\n  " + "\n  ".join(shown)
        )


def from_torchvision(state_dict, arch: str, *, stem: str = "imagenet", width: int = 64):
    """Ports a torchvision ResNet state_dict; returns ``(model, variables)``.

    Args:
      state_dict: torchvision parameter names -> arrays (numpy arrays or torch tensors), as
        from `load_state_dict`; nested or ``module.``-prefixed forms are unwrapped.
      arch: one of `cka_jax.models.ARCHITECTURES`: 'resnet18', 'resnet34', 'resnet50',
        'resnet101', 'resnet152', 'wide_resnet50_2', 'wide_resnet101_2', 'resnext50_32x4d',
        'resnext101_32x8d' (or 'resnet10'). The class count is taken from ``fc.weight``; the
        input channel count from ``conv1.weight``.
      stem: 'imagenet' (torchvision's 7x7/2 conv + max-pool) or 'small' (a 3x3/1 ``conv1``
        and the max-pool replaced by ``Identity``, as CIFAR variants do).
      width: channels of the stem and first stage (64 in torchvision).

    Raises:
      PortError: unknown arch; the tensors look like another arch (the message names it); a
        missing, unexpected or mis-shaped tensor (named, with the expected and found shapes;
        for a grouped 3x3 convolution, the groups it is split into).
    """
    if arch not in ARCHITECTURES:
        raise PortError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    state = {
        k: _to_numpy(k, v)
        for k, v in unwrap_state_dict(state_dict).items()
        if not str(k).endswith("num_batches_tracked")
    }
    _check_layout(state, arch)
    fc = state.get("fc.weight")
    if fc is None:
        raise PortError(
            f"state_dict has no 'fc.weight' (the classifier, shape (num_classes, features)); "
            f"{arch} needs it to know the number of classes"
        )
    if fc.ndim != 2:
        raise PortError(
            f"tensor 'fc.weight' has shape {tuple(fc.shape)} but {arch} expects a 2-d "
            f"(num_classes, features) matrix"
        )
    conv1 = state.get("conv1.weight")
    in_channels = int(conv1.shape[1]) if conv1 is not None and conv1.ndim == 4 else 3
    try:
        model = create_model(arch, int(fc.shape[0]), stem=stem, width=width)
    except ValueError as err:
        raise PortError(str(err)) from err
    expected = _expected(model, in_channels)
    _check_tensors(state, expected, model, arch, stem)
    variables: dict = {"params": {}, "batch_stats": {}}
    for name, (collection, path, _) in expected.items():
        array = state[name]
        if not np.issubdtype(array.dtype, np.floating):
            raise PortError(f"tensor '{name}' has dtype {array.dtype}, expected floating point")
        _set(variables[collection], path, jnp.asarray(_to_flax(array), jnp.float32))
    return model, variables


# --- command line -------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's flags (see `main`); bad flags exit with argparse's usage error."""
    parser = argparse.ArgumentParser(
        prog="python -m cka_jax.port",
        description="Port a torchvision ResNet (.pth or .safetensors) to a cka_jax checkpoint.",
    )
    parser.add_argument(
        "--arch",
        choices=TORCHVISION_ARCHS,
        default=None,
        help="torchvision architecture; default: read off the checkpoint's layout",
    )
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help=".pth/.pt or .safetensors file"
    )
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    # Underscores as every command's flags (absl's style); the hyphenated spelling still works.
    parser.add_argument(
        "--image_size",
        "--image-size",
        dest="image_size",
        type=int,
        default=224,
        help="input size the model was trained at (recorded in model.json; default 224)",
    )
    parser.add_argument(
        "--class_names",
        "--class-names",
        dest="class_names",
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
        parser.error(f"--image_size must be positive, got {args.image_size}")
    return args


def read_class_names(path: Path | None, num_classes: int) -> list[str]:
    """The class names listed in ``path`` (one per line), checked against the class count;
    ``class0``, ``class1``, ... without a file."""
    if path is None:
        return [f"class{i}" for i in range(num_classes)]
    if not path.is_file():
        raise ValueError(f"--class_names file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(
            f"--class_names file {path} lists {len(names)} names but the checkpoint's "
            f"classifier (fc.weight) has {num_classes} classes"
        )
    return names


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def port_checkpoint(args: argparse.Namespace) -> dict:
    """Ports ``args.checkpoint`` into ``args.out`` (a cka_jax model checkpoint written by
    `cka_jax.infra.storage.save_model`); returns the meta written to its ``model.json``."""
    from cka_jax.models import storage

    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} already holds files; pass --overwrite to replace it")
    state_dict = load_state_dict(args.checkpoint)
    arch = args.arch or guess_arch(state_dict)
    if arch is None:
        raise PortError(
            f"cannot tell which ResNet {args.checkpoint} holds ({_describe_layout(state_dict)});"
            f" pass --arch (one of {', '.join(TORCHVISION_ARCHS)})"
        )
    model, variables = from_torchvision(state_dict, arch, stem=args.stem)
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
    storage.save_model(out, variables, meta)
    return meta


def main(argv=None) -> int:
    """``python -m cka_jax.port --checkpoint FILE --out DIR [--arch A] [--image_size N]
    [--class_names FILE] [--stem imagenet|small] [--overwrite]``.

    Ports FILE (``.pth``/``.pt``/``.tar``/``.bin``/``.ckpt`` or ``.safetensors``) into DIR,
    a cka_jax model checkpoint that a config can name as a teacher. Returns the exit code:
    0, or 2 after printing ``error: ...`` (an unreadable, untrusted or unportable
    checkpoint, a bad ``--out`` or ``--class_names``); bad flags exit 2 with argparse's
    usage message. Never a traceback for bad input.
    """
    args = parse_args(argv)
    try:
        meta = port_checkpoint(args)
    except (ValueError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {meta['arch']} with {meta['num_classes']} classes "
        f"(stem {meta['stem']}, {meta['channels']} input channels). Name it as a teacher: "
        f"config.teachers = ({{'checkpoint': '{args.out}'}}, ...)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
