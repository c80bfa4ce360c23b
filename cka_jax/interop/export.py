r"""Export a trained model (the amalgamated student, a run's selected model, any model
checkpoint) for use outside cka_jax: as a torchvision state_dict, as safetensors with an
architecture description, or as a serialized StableHLO program.

    python -m cka_jax.export --workdir=DIR --format=torchvision --out=student
    python -m cka_jax.export --workdir=DIR --run=cka/0 --format=safetensors --out=cka0
    python -m cka_jax.export --model_dir=CKPT --format=stablehlo --out=model

What is exported: ``DIR/student`` by default, ``DIR/runs/<method>/seed_<s>/selected`` with
``--run=<method>/<s>``, or any model checkpoint directory with ``--model_dir``.

``--format`` (every format writes ``<out>.json``: class names, preprocessing, input layout):

- ``torchvision``: ``<out>.pth`` (a state_dict) and the same tensors as ``<out>.safetensors``,
  loadable with ``strict=True`` into ``torchvision.models.<arch>(num_classes=C)``. Only for
  architectures torchvision builds with the same shapes (width 64, ImageNet stem, 3 input
  channels).
- ``safetensors``: ``<out>.safetensors`` under torchvision's names, for any network;
  ``<out>.json`` describes the architecture, and `cka_jax.interop.torch_resnet.load_resnet`
  builds it in PyTorch.
- ``stablehlo``: ``<out>.stablehlo``, the bytes of `jax.export.Exported.serialize` of the
  eval-mode forward (NHWC float32 images -> logits) with a symbolic batch size; run it with
  `load_stablehlo` (needs only jax).

The tensors are the exact inverse of `cka_jax.interop.port.from_torchvision`: Flax HWIO
kernels become OIHW, Dense (in, out) becomes Linear (out, in), BatchNorm scale/bias become
weight/bias and its batch statistics running_mean/running_var; every BatchNorm also gets the
``num_batches_tracked`` buffer torch's state_dicts hold (0: Flax does not count batches).
Docs: docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

FORMATS = ("torchvision", "safetensors", "stablehlo")
EXPORT_VERSION = 1
DEFAULT_PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's built-in platforms
INSTALL_HINT = "pip install -e '.[port]'"

# torchvision's ResNet constructors: blocks per stage, block type, groups, width_per_group.
# (Their first stage has 64 channels, the stem is the 7x7/2 conv + 3x3/2 max-pool, the input
# has 3 channels.)
TORCHVISION_RESNETS = {
    "resnet18": ((2, 2, 2, 2), "basic", 1, 64),
    "resnet34": ((3, 4, 6, 3), "basic", 1, 64),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 1, 64),
    "resnet101": ((3, 4, 23, 3), "bottleneck", 1, 64),
    "resnet152": ((3, 8, 36, 3), "bottleneck", 1, 64),
    "wide_resnet50_2": ((3, 4, 6, 3), "bottleneck", 1, 128),
    "wide_resnet101_2": ((3, 4, 23, 3), "bottleneck", 1, 128),
    "resnext50_32x4d": ((3, 4, 6, 3), "bottleneck", 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), "bottleneck", 32, 8),
    "resnext101_64x4d": ((3, 4, 23, 3), "bottleneck", 64, 4),
}
BOTTLENECK_EXPANSION = 4
PIXEL_SCALE = 255.0

# Order of a module's children and a tensor's suffixes in torchvision's state_dicts.
_MODULE_ORDER = {
    "conv1": 0,
    "bn1": 1,
    "conv2": 2,
    "bn2": 3,
    "conv3": 4,
    "bn3": 5,
    "downsample": 6,
    "fc": 10_000,
}
_SUFFIX_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ExportError(ValueError):
    """A model that cannot be exported as asked (the message says why and what to do)."""


# --- Flax variables -> torchvision state_dict ----------------------------------------------


def _torch_module_name(flax_module: str) -> str:
    """``layer2_0`` -> ``layer2.0``, ``downsample_conv`` -> ``downsample.0``, ``downsample_bn``
    -> ``downsample.1``; other names stay."""
    if re.fullmatch(r"layer\d+_\d+", flax_module):
        return flax_module.replace("_", ".")
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
        flax_module, flax_module
    )


def _state_dict_order(name: str):
    """Sort key putting tensor names in the order torchvision's ``state_dict()`` has them."""
    *modules, suffix = name.split(".")
    key = []
    for part in modules:
        layer = re.fullmatch(r"layer(\d+)", part)
        if layer:
            key.append((100 + int(layer.group(1)), ""))
        elif part.isdigit():
            key.append((int(part), ""))
        else:
            key.append((_MODULE_ORDER.get(part, 5_000), part))
    return (key, _SUFFIX_ORDER.index(suffix) if suffix in _SUFFIX_ORDER else len(_SUFFIX_ORDER))


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    out = {}

    def walk(node, path):
        if hasattr(node, "items"):
            for key, value in node.items():
                walk(value, (*path, str(key)))
        else:
            out[path] = np.asarray(node)

    walk(tree, ())
    return out


def torchvision_state_dict(variables) -> dict[str, np.ndarray]:
    """The torchvision state_dict (numpy arrays, torchvision's order) of a cka_jax ResNet's
    ``{'params', 'batch_stats'}``: the exact inverse of `cka_jax.interop.port.from_torchvision`.

    Kernels HWIO -> OIHW, Dense (in, out) -> Linear (out, in), BatchNorm scale/bias ->
    weight/bias, mean/var -> running_mean/running_var, plus an int64 ``num_batches_tracked``
    of 0 for each BatchNorm (torch's state_dicts have one; Flax counts no batches).

    Raises:
      ExportError: a variable with no torchvision counterpart (named).
    """
    state: dict[str, np.ndarray] = {}
    for collection, leaf_names in (
        ("params", {"kernel": "weight", "scale": "weight", "bias": "bias"}),
        ("batch_stats", {"mean": "running_mean", "var": "running_var"}),
    ):
        for path, array in _flat(variables.get(collection, {})).items():
            *modules, leaf = path
            if leaf not in leaf_names or not modules:
                raise ExportError(
                    f"variable {collection}/{'/'.join(path)} has no torchvision counterpart: "
                    f"only ResNets of cka_jax.models (kernels, BatchNorm scale/bias/mean/var, "
                    f"the fc Dense) can be exported"
                )
            module = ".".join(_torch_module_name(m) for m in modules)
            if array.ndim == 4:  # HWIO -> OIHW
                array = array.transpose(3, 2, 0, 1)
            elif array.ndim == 2:  # Dense (in, out) -> Linear (out, in)
                array = array.T
            state[f"{module}.{leaf_names[leaf]}"] = np.ascontiguousarray(array, np.float32)
            if collection == "batch_stats" and leaf == "mean":
                state[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
    return {name: state[name] for name in sorted(state, key=_state_dict_order)}


# --- architecture description ---------------------------------------------------------------


def describe_architecture(variables, meta: dict) -> dict:
    """The JSON architecture description of a cka_jax ResNet (what `cka_jax.interop.torch_resnet`
    builds), read off the variables' shapes and ``meta`` (arch, stem, class names).

    Keys: ``arch``, ``block`` ('basic' | 'bottleneck'), ``stage_sizes``, ``width`` (channels
    of the stem and first stage), ``stem`` ('imagenet' | 'small'), ``in_channels``,
    ``num_classes``, ``groups``, ``width_per_group`` (torchvision's ``base_width``),
    ``stage_widths`` (inner channels of each stage's blocks), ``stage_out_channels`` and
    ``stage_strides`` (the first block's stride of each stage).
    """
    params = variables["params"]
    try:
        stem_kernel = np.shape(params["conv1"]["kernel"])
        fc_kernel = np.shape(params["fc"]["kernel"])
    except KeyError as err:
        raise ExportError(
            f"these variables are not a cka_jax ResNet: no params/{err.args[0]} "
            f"(expected conv1, bn1, layerN_M blocks and fc)"
        ) from err
    stem = meta.get("stem", "imagenet")
    expected_kernel = {"imagenet": 7, "small": 3}.get(stem)
    if expected_kernel is None:
        raise ExportError(f"model.json has unknown stem {stem!r}: expected 'imagenet' or 'small'")
    if stem_kernel[0] != expected_kernel:
        raise ExportError(
            f"model.json says stem {stem!r} ({expected_kernel}x{expected_kernel} conv1) but "
            f"conv1's kernel is {stem_kernel[0]}x{stem_kernel[1]}"
        )
    blocks: dict[int, set[int]] = {}
    for name in params:
        m = re.fullmatch(r"layer(\d+)_(\d+)", name)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    num_stages = max(blocks, default=0)
    stage_sizes = [len(blocks.get(s, ())) for s in range(1, num_stages + 1)]
    if not stage_sizes or any(blocks.get(s) != set(range(n)) for s, n in enumerate(stage_sizes, 1)):
        raise ExportError(
            f"these variables are not a cka_jax ResNet: blocks {sorted(blocks.items())} do not "
            f"form stages layer1.._N with blocks numbered from 0"
        )
    block = "bottleneck" if "conv3" in params["layer1_0"] else "basic"
    last_conv = "conv3" if block == "bottleneck" else "conv2"
    widths, outs, groups = [], [], set()
    for s in range(1, num_stages + 1):
        first = params[f"layer{s}_0"]
        inner = int(np.shape(first["conv1"]["kernel"])[3])
        widths.append(inner)
        outs.append(int(np.shape(first[last_conv]["kernel"])[3]))
        for i in range(stage_sizes[s - 1]):
            conv2 = np.shape(params[f"layer{s}_{i}"]["conv2"]["kernel"])
            groups.add(inner // int(conv2[2]) if block == "bottleneck" else 1)
    if len(groups) != 1:
        raise ExportError(f"blocks use different group counts {sorted(groups)}")
    (group_count,) = groups
    width = int(stem_kernel[3])
    return {
        "arch": meta.get("arch"),
        "block": block,
        "stage_sizes": stage_sizes,
        "width": width,
        "stem": stem,
        "in_channels": int(stem_kernel[2]),
        "num_classes": int(fc_kernel[1]),
        "groups": group_count,
        "width_per_group": widths[0] * 64 // (group_count * width),
        "stage_widths": widths,
        "stage_out_channels": outs,
        "stage_strides": [1] + [2] * (num_stages - 1),
    }


def torchvision_architecture(arch: str, num_classes: int) -> dict:
    """The description (as `describe_architecture`) of ``torchvision.models.<arch>``."""
    stage_sizes, block, groups, width_per_group = TORCHVISION_RESNETS[arch]
    expansion = BOTTLENECK_EXPANSION if block == "bottleneck" else 1
    planes = [64 * 2**s for s in range(len(stage_sizes))]
    return {
        "arch": arch,
        "block": block,
        "stage_sizes": list(stage_sizes),
        "width": 64,
        "stem": "imagenet",
        "in_channels": 3,
        "num_classes": num_classes,
        "groups": groups,
        "width_per_group": width_per_group,
        "stage_widths": [
            p * width_per_group // 64 * groups if block == "bottleneck" else p for p in planes
        ],
        "stage_out_channels": [p * expansion for p in planes],
        "stage_strides": [1, 2, 2, 2],
    }


def torchvision_mismatch(architecture: dict) -> str | None:
    """Why ``torchvision.models.<arch>`` cannot load this architecture's weights (None when
    it can)."""
    arch = architecture.get("arch")
    if arch not in TORCHVISION_RESNETS:
        return f"torchvision has no {arch!r} (it has {', '.join(TORCHVISION_RESNETS)})"
    reference = torchvision_architecture(arch, architecture["num_classes"])
    differences = [
        f"{key} {architecture[key]!r} (torchvision's: {reference[key]!r})"
        for key in reference
        if architecture.get(key) != reference[key]
    ]
    if differences:
        return f"torchvision's {arch} differs from this model: " + ", ".join(differences)
    return None


# --- what is exported -------------------------------------------------------------------


def model_directory(workdir=None, run: str | None = None, model_dir=None) -> Path:
    """The model checkpoint directory the flags name: ``model_dir``, else
    ``workdir/runs/<method>/seed_<s>/selected`` for ``run='<method>/<s>'``, else
    ``workdir/student``. Raises `ExportError` for contradictory or malformed flags."""
    if model_dir is not None:
        if workdir is not None or run is not None:
            raise ExportError("give either --model_dir, or --workdir (with --run), not both")
        return Path(model_dir)
    if workdir is None:
        raise ExportError("give --workdir=DIR (a finished run's workdir) or --model_dir=DIR")
    workdir = Path(workdir)
    if run is None:
        return workdir / "student"
    method, sep, seed = run.rpartition("/")
    if not sep or not method or not seed.isdigit():
        raise ExportError(f"--run={run!r} is not METHOD/SEED (e.g. --run=cka/0)")
    return workdir / "runs" / method / f"seed_{int(seed)}" / "selected"


def _available_runs(workdir: Path) -> list[str]:
    runs = sorted((workdir / "runs").glob("*/seed_*/selected/model.json"))
    return [f"{p.parents[2].name}/{p.parents[1].name.removeprefix('seed_')}" for p in runs]


def load_source(directory, *, workdir=None):
    """``(model, variables, meta)`` of the model checkpoint ``directory``
    (`cka_jax.infra.storage.load_model`); a missing one is an `ExportError` that says what to
    give instead (the runs of ``workdir`` that have a selected model)."""
    from cka_jax.infra.checkpoint import CheckpointError
    from cka_jax.models.storage import load_model

    directory = Path(directory)
    try:
        return load_model(directory)
    except CheckpointError as err:
        if workdir is None:
            raise ExportError(str(err)) from err
        runs = _available_runs(Path(workdir))
        hint = (
            f"export one of its runs with --run=METHOD/SEED ({', '.join(runs)})"
            if runs
            else f"{workdir} holds no run with a selected model either"
        )
        raise ExportError(
            f"nothing to export at {directory}: no model checkpoint there (expected "
            f"model.json and variables/; has the run finished?); {hint}, or give "
            f"--model_dir=DIR"
        ) from err


# --- the written files -------------------------------------------------------------------


def preprocessing(meta: dict) -> dict:
    """How images must be prepared for the model, from ``model.json``."""
    pre = dict(meta.get("preprocess") or {})
    channels = int(pre.get("channels", meta.get("channels", 3)))
    size = int(pre.get("out_size", meta.get("image_size", 0)) or 0) or None
    mean, std = pre.get("mean"), pre.get("std")
    return {
        "image_size": size,
        "channels": channels,
        "mean": None if mean is None else [float(v) for v in list(mean)[:channels]],
        "std": None if std is None else [float(v) for v in list(std)[:channels]],
        "pixel_scale": PIXEL_SCALE,
        "crop_fraction": float(pre.get("crop_fraction", 0.875)),
        "source_image_size": meta.get("source_image_size", size),
        "recipe": (
            "decode to RGB (3 channels) or gray (1), resize the shorter side to "
            "source_image_size and center-crop it square, take the central crop_fraction of "
            "it resized to image_size x image_size, divide by pixel_scale, then subtract "
            "mean and divide by std per channel"
        ),
    }


def _paths(out, suffixes) -> dict[str, Path]:
    """``<out><suffix>`` for each suffix (a suffix already on ``out`` is dropped first)."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(
            f"--out={out} is a directory: give a path without suffix inside it, e.g. "
            f"--out={out / 'student'} (writes {out / 'student'}.json and the weights)"
        )
    if out.suffix in (".pth", ".pt", ".safetensors", ".stablehlo", ".json"):
        out = out.with_suffix("")
    return {s: out.with_name(out.name + s) for s in suffixes}


def _check_writable(paths, overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise ExportError(f"{path} already exists; pass --overwrite to replace it")
        if path.parent.exists() and not path.parent.is_dir():
            raise ExportError(f"cannot write {path}: {path.parent} is a file")


def _write_atomic(path: Path, write, size: int | None = None) -> None:
    """Calls ``write(tmp_path)`` and moves the complete file to ``path``. A disk without
    space for it (about ``size`` bytes) is an `ExportError` naming both; the partial file is
    removed and a file already at ``path`` is left as it was."""
    from cka_jax.infra.files import disk_full_message, is_disk_full

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if not is_disk_full(err):
            raise
        tmp.unlink(missing_ok=True)  # first, so that the message counts the space it held
        kept = f"A file already at {path.name} is unchanged."
        raise ExportError(disk_full_message("the export", path, size, kept)) from err
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    _write_atomic(path, lambda tmp: tmp.write_text(text), len(text.encode()))


def _nbytes(state: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in state.values())


def _require(fmt: str) -> None:
    """Fails early, before any loading, when a package ``fmt`` writes with is missing."""
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"--format={fmt} needs the safetensors package: pip install safetensors"
        ) from err
    if fmt == "torchvision":
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise ExportError(
                f"writing a .pth needs PyTorch, which is not installed: install the port "
                f"extra ({INSTALL_HINT}), or use --format=safetensors, which needs no torch"
            ) from err


def _write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    _write_atomic(
        path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}), _nbytes(state)
    )


def _write_pth(path: Path, state: dict[str, np.ndarray]) -> None:
    from collections import OrderedDict

    import torch

    tensors = OrderedDict((k, torch.from_numpy(v.copy())) for k, v in state.items())
    _write_atomic(path, lambda tmp: torch.save(tensors, tmp), _nbytes(state))


def _description(fmt: str, source: Path, meta: dict, architecture: dict, files: dict) -> dict:
    return {
        "cka_jax_export": EXPORT_VERSION,
        "format": fmt,
        "files": {k: Path(v).name for k, v in files.items()},
        "source": str(Path(source).absolute()),
        "arch": meta.get("arch"),
        "num_classes": architecture["num_classes"],
        "class_names": list(meta.get("class_names") or []),
        "architecture": architecture,
        "preprocess": preprocessing(meta),
    }


def export_torch(
    source, out, *, fmt: str = "safetensors", overwrite: bool = False, workdir=None
) -> dict[str, Path]:
    """Writes the model checkpoint ``source`` as torchvision-named tensors; returns the
    written files by role.

    ``fmt='torchvision'``: ``<out>.pth`` + ``<out>.safetensors`` (the same tensors) that
    ``torchvision.models.<arch>(num_classes=C)`` loads with ``strict=True``, and ``<out>.json``;
    an `ExportError` when torchvision has no model of these shapes. ``fmt='safetensors'``:
    ``<out>.safetensors`` and ``<out>.json`` (with the architecture description that
    `cka_jax.interop.torch_resnet.load_resnet` builds), for any cka_jax ResNet.
    """
    if fmt not in ("torchvision", "safetensors"):
        raise ExportError(f"export_torch writes 'torchvision' or 'safetensors', not {fmt!r}")
    suffixes = (".pth", ".safetensors", ".json") if fmt == "torchvision" else (".safetensors",)
    paths = _paths(out, suffixes + ((".json",) if fmt == "safetensors" else ()))
    _check_writable(paths.values(), overwrite)
    _require(fmt)
    _, variables, meta = load_source(source, workdir=workdir)
    architecture = describe_architecture(variables, meta)
    if fmt == "torchvision":
        why = torchvision_mismatch(architecture)
        if why is not None:
            raise ExportError(
                f"cannot export {source} as a torchvision model: {why}. Use "
                f"--format=safetensors, which writes the weights under torchvision's names "
                f"with an architecture description that cka_jax/interop/torch_resnet.py builds"
            )
    state = torchvision_state_dict(variables)
    files = {"weights": paths[".safetensors"]}
    if fmt == "torchvision":
        files = {"state_dict": paths[".pth"], **files}
        _write_pth(paths[".pth"], state)
    _write_safetensors(paths[".safetensors"], state)
    description = _description(fmt, Path(source), meta, architecture, files)
    if fmt == "torchvision":
        description["torchvision"] = {
            "constructor": f"torchvision.models.{architecture['arch']}",
            "num_classes": architecture["num_classes"],
        }
    else:
        description["loader"] = "cka_jax.interop.torch_resnet.load_resnet"
        if torchvision_mismatch(architecture) is None:
            description["torchvision"] = {
                "constructor": f"torchvision.models.{architecture['arch']}",
                "num_classes": architecture["num_classes"],
            }
    description["input"] = _input_spec(description["preprocess"], "NCHW")
    files["description"] = paths[".json"]
    _write_json(paths[".json"], description)
    return files


def _input_spec(pre: dict, layout: str) -> dict:
    size, channels = pre["image_size"], pre["channels"]
    shape = ["batch", size, size, channels] if layout == "NHWC" else ["batch", channels, size, size]
    return {"layout": layout, "shape": shape, "dtype": "float32", "output": "logits"}


# --- StableHLO ----------------------------------------------------------------------------


def _need_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401 - jax.export's serialization needs it
    except ImportError as err:
        raise ExportError(
            "serializing or reading StableHLO (jax.export) needs the flatbuffers package, "
            "which is not installed: pip install flatbuffers"
        ) from err


def export_stablehlo(
    source, out, *, platforms=DEFAULT_PLATFORMS, overwrite: bool = False, workdir=None
) -> dict[str, Path]:
    """Writes the eval-mode forward of the model checkpoint ``source`` as ``<out>.stablehlo``
    (`jax.export`, symbolic batch size, NHWC float32 images of the model's image size ->
    float32 logits, the weights inside) and ``<out>.json``; returns the files by role.

    ``platforms``: what the program is lowered for (it runs only there), default CPU and
    CUDA GPUs.
    """
    import jax
    import jax.numpy as jnp
    from jax import export as jax_export

    _need_flatbuffers()
    paths = _paths(out, (".stablehlo", ".json"))
    _check_writable(paths.values(), overwrite)
    model, variables, meta = load_source(source, workdir=workdir)
    architecture = describe_architecture(variables, meta)
    pre = preprocessing(meta)
    if pre["image_size"] is None:
        raise ExportError(f"{source}/model.json records no image size (image_size)")
    size, channels = pre["image_size"], architecture["in_channels"]
    variables = jax.device_get(variables)

    def forward(images):
        logits, _ = model.apply(variables, images, train=False)
        return logits

    (batch,) = jax_export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    try:
        exported = jax_export.export(jax.jit(forward), platforms=tuple(platforms))(spec)
    except Exception as err:  # noqa: BLE001 - e.g. a platform jax cannot lower for
        raise ExportError(
            f"jax.export failed for platforms {list(platforms)}: {type(err).__name__}: {err}"
        ) from err
    blob = exported.serialize()
    _write_atomic(paths[".stablehlo"], lambda tmp: tmp.write_bytes(bytes(blob)), len(blob))
    files = {"program": paths[".stablehlo"], "description": paths[".json"]}
    description = _description("stablehlo", Path(source), meta, architecture, files)
    description["input"] = _input_spec(pre, "NHWC")
    description["platforms"] = list(exported.platforms)
    description["jax_version"] = jax.__version__
    description["loader"] = "cka_jax.interop.export.load_stablehlo"
    _write_json(paths[".json"], description)
    return files


def load_stablehlo(path):
    """Loads ``<out>.stablehlo`` (or ``<out>``) written by `export_stablehlo`; returns a
    function from NHWC float32 images (any batch size, the exported height, width and
    channels) to logits, as a jax array.

    Needs jax (and flatbuffers) only: neither cka_jax's models nor flax. The program runs on
    the platforms it was exported for (``<out>.json``'s ``platforms``).
    """
    import jax.numpy as jnp
    from jax import export as jax_export

    _need_flatbuffers()
    path = Path(path)
    if path.suffix != ".stablehlo":
        path = path.with_name(path.name + ".stablehlo")
    if not path.is_file():
        raise FileNotFoundError(f"no exported program at {path} (written by --format=stablehlo)")
    exported = jax_export.deserialize(bytearray(path.read_bytes()))
    (aval,) = exported.in_avals
    expected = tuple(aval.shape[1:])

    def run(images):
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{path.name} takes NHWC images of shape (batch, {', '.join(map(str, expected))})"
                f", got shape {tuple(images.shape)}"
            )
        return exported.call(images)

    run.exported = exported
    return run


# --- command line -------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cka_jax.export",
        description="Export a cka_jax model (the amalgamated student by default) for PyTorch "
        "or as a StableHLO program. Docs: docs/export.md.",
    )
    parser.add_argument("--workdir", help="workdir of a run (exports WORKDIR/student)")
    parser.add_argument(
        "--run",
        help="METHOD/SEED: export WORKDIR/runs/METHOD/seed_SEED/selected instead (e.g. cka/0)",
    )
    parser.add_argument(
        "--model_dir", "--model-dir", dest="model_dir", help="any model checkpoint directory"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--out",
        required=True,
        help="output path without suffix: writes <out>.pth/.safetensors/.stablehlo + .json",
    )
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help="stablehlo: comma-separated platforms to lower for (default cpu,cuda)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    args.platforms = tuple(dict.fromkeys(p.strip() for p in args.platforms.split(",") if p.strip()))
    unknown = [p for p in args.platforms if p not in KNOWN_PLATFORMS]
    if unknown or not args.platforms:
        parser.error(
            f"--platforms={','.join(args.platforms)}: "
            + (f"unknown platform {unknown[0]!r}; " if unknown else "no platform; ")
            + f"name some of {', '.join(KNOWN_PLATFORMS)} (e.g. --platforms=cpu,cuda)"
        )
    return args


def export(args: argparse.Namespace) -> dict[str, Path]:
    """Runs the export the parsed flags ask for; returns the written files by role."""
    source = model_directory(args.workdir, args.run, args.model_dir)
    common = dict(overwrite=args.overwrite, workdir=None if args.model_dir else args.workdir)
    if args.format == "stablehlo":
        return export_stablehlo(source, args.out, platforms=args.platforms, **common)
    return export_torch(source, args.out, fmt=args.format, **common)


def main(argv=None) -> int:
    """The command line; returns the exit code (2 with ``error: ...`` on bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: bad flags (2, message printed) or --help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        files = export(args)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for role, path in files.items():
        print(f"wrote {path} ({role})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
