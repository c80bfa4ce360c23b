"""Port torchvision ResNet weights to the Flax ResNets of `cka_jax.models`.

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
``layer2.0.downsample.0/1.*``      ``params/layer2_0/downsample_conv`` / ``downsample_bn``
``fc.weight`` (out, in)            ``params/fc/kernel`` (in, out); ``fc.bias`` -> ``fc/bias``

``num_batches_tracked`` entries carry no weights and are ignored. Input normalisation is not
part of the model (it stays in the data pipeline), exactly as in torchvision.

Checkpoints from the internet are untrusted: ``.pth`` files are read with
``torch.load(..., weights_only=True)``, which refuses pickles that would build anything other
than tensors and plain containers, so a file that would run code on load is an error.
"""

from __future__ import annotations

import pickle
import re
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
# Block counts per stage and block type of torchvision's ResNets (only the ones in
# `cka_jax.models.ARCHITECTURES` can be ported; the others are named in errors).
KNOWN_LAYOUTS = {
    ((1, 1, 1, 1), "basic"): "resnet10",
    ((2, 2, 2, 2), "basic"): "resnet18",
    ((3, 4, 6, 3), "basic"): "resnet34",
    ((3, 4, 6, 3), "bottleneck"): "resnet50",
    ((3, 4, 23, 3), "bottleneck"): "resnet101",
    ((3, 8, 36, 3), "bottleneck"): "resnet152",
}
INSTALL_HINT = "pip install -e '.[port]'"


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


def _load_torch(path: Path):
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs PyTorch, which is not installed: install the port extra "
            f"({INSTALL_HINT}), or convert the file to .safetensors, which needs no torch"
        ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(
            f"refused to load {path}: it is an untrusted pickle that builds objects other "
            f"than tensors and plain containers (loading it could run arbitrary code), so "
            f"torch.load(weights_only=True) rejected it. Only plain state_dicts are accepted; "
            f"if you trust the file's origin, re-save its state_dict (torch.save("
            f"model.state_dict(), ...)) or convert it to .safetensors. torch said: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    except Exception as err:  # noqa: BLE001 - corrupt/truncated/not a torch file
        raise PortError(
            f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from err


def _load_safetensors(path: Path) -> dict:
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
            f"could not read {path} as a safetensors file ({type(err).__name__}: {err})"
        ) from err


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a torchvision state_dict from ``.pth``/``.pt`` (torch, weights only) or
    ``.safetensors`` (no torch needed); returns it flat, as float numpy arrays.

    Nested checkpoints and ``module.`` prefixes are unwrapped (`unwrap_state_dict`). A
    ``.pth`` whose unpickling would build anything but tensors raises
    `UntrustedCheckpointError`.
    """
    path = Path(path)
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
    state = unwrap_state_dict(obj)
    return {k: _to_numpy(k, v) for k, v in state.items()}


# --- architecture -------------------------------------------------------------------------


def _layout(state_dict) -> tuple[tuple[int, ...], str]:
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in state_dict:
        m = re.match(r"layer(\d+)\.(\d+)\.(\w+)", str(key))
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) in ("conv3", "bn3")
    stages = max(blocks, default=0)
    counts = tuple(len(blocks.get(i, ())) for i in range(1, stages + 1))
    return counts, "bottleneck" if bottleneck else "basic"


def guess_arch(state_dict) -> str | None:
    """The torchvision ResNet a state_dict's names look like (from blocks per stage and
    whether blocks have a ``conv3``), e.g. 'resnet34'; None when no known layout fits."""
    return KNOWN_LAYOUTS.get(_layout(state_dict))


def _describe_layout(state_dict) -> str:
    counts, kind = _layout(state_dict)
    return f"{'bottleneck' if kind == 'bottleneck' else 'basic'} blocks per stage {counts}"


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
    if len(flax_shape) == 4:  # HWIO -> OIHW
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


def from_torchvision(state_dict, arch: str, *, stem: str = "imagenet", width: int = 64):
    """Ports a torchvision ResNet state_dict; returns ``(model, variables)``.

    Args:
      state_dict: torchvision parameter names -> arrays (numpy arrays or torch tensors), as
        from `load_state_dict`; nested or ``module.``-prefixed forms are unwrapped.
      arch: 'resnet18' | 'resnet34' | 'resnet50' (or 'resnet10'). The class count is taken
        from ``fc.weight``; the input channel count from ``conv1.weight``.
      stem: 'imagenet' (torchvision's 7x7/2 conv + max-pool) or 'small' (a 3x3/1 ``conv1``
        and the max-pool replaced by ``Identity``, as CIFAR variants do).
      width: channels of the first stage (64 in torchvision).

    Raises:
      PortError: unknown arch; the tensors look like another arch (the message names it); a
        missing, unexpected or mis-shaped tensor (named, with the expected and found shapes).
    """
    if arch not in ARCHITECTURES:
        raise PortError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    state = {
        k: _to_numpy(k, v)
        for k, v in unwrap_state_dict(state_dict).items()
        if not str(k).endswith("num_batches_tracked")
    }
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
    model = create_model(arch, int(fc.shape[0]), stem=stem, width=width)
    expected = _expected(model, in_channels)

    problems = []
    for name, (_, _, shape) in expected.items():
        if name not in state:
            problems.append(f"missing tensor '{name}' (expected shape {shape})")
    for name, value in state.items():
        if name not in expected:
            problems.append(f"unexpected tensor '{name}' with shape {tuple(value.shape)}")
        elif tuple(value.shape) != expected[name][2]:
            problems.append(
                f"tensor '{name}' has shape {tuple(value.shape)} but {arch} expects "
                f"{expected[name][2]}"
            )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] * (len(problems) > 20))
        raise PortError(
            f"cannot port this state_dict as a torchvision {arch} (stem {stem!r}, "
            f"{model.num_classes} classes from fc.weight):\n  " + "\n  ".join(shown)
        )

    variables: dict = {"params": {}, "batch_stats": {}}
    for name, (collection, path, _) in expected.items():
        array = state[name]
        if not np.issubdtype(array.dtype, np.floating):
            raise PortError(f"tensor '{name}' has dtype {array.dtype}, expected floating point")
        _set(variables[collection], path, jnp.asarray(_to_flax(array), jnp.float32))
    return model, variables
