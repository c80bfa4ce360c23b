"""Exporting models (`cka_jax.interop.export`): real round trips through torchvision's own models,
the PyTorch loader `cka_jax.interop.torch_resnet`, and StableHLO run in a fresh process.

These tests need torch, torchvision, safetensors and flatbuffers; without them the module
fails to import with a message saying so, rather than being skipped.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    import flatbuffers  # noqa: F401 - jax.export's serialization
    import safetensors.numpy
    import torch
    import torchvision
except ImportError as err:  # fail loudly: these tests must run in CI
    raise ImportError(
        "tests/interop/test_export.py needs torch, torchvision, safetensors and flatbuffers: "
        "pip install -e '.[port,test]' flatbuffers"
    ) from err

from cka_jax.interop import export, port, torch_resnet
from cka_jax.models import create_model
from cka_jax.models.storage import save_model

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 5
CLASS_NAMES = [f"kind{i}" for i in range(NUM_CLASSES)]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def meta_for(arch, *, stem="imagenet", width=64, channels=3, size=64) -> dict:
    """A model.json as the training writes it."""
    return {
        "arch": arch,
        "num_classes": NUM_CLASSES,
        "width": width,
        "stem": stem,
        "channels": channels,
        "image_size": size,
        "class_names": CLASS_NAMES,
        "preprocess": {
            "out_size": size,
            "channels": channels,
            "mean": MEAN,
            "std": STD,
            "crop_fraction": 0.875,
        },
    }


def torchvision_model(arch, seed=0):
    """torchvision's own model, random weights, random BatchNorm weights and running
    statistics (its defaults, 1 and 0, would hide a mix-up), eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def random_flax_model(arch, *, stem, width, channels, size, seed=0):
    """A Flax ResNet with random kernels (He-scaled) and random BatchNorm scale, bias, mean
    and var, drawn with numpy (no compiled init)."""
    model = create_model(arch, NUM_CLASSES, stem=stem, width=width)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.2, shape)
        else:  # conv (kh, kw, in, out) with std sqrt(2 / fan_out); Dense (in, out)
            fan = np.prod(shape[:2]) * shape[-1] / 2 if len(shape) == 4 else shape[0]
            value = rng.normal(0.0, 1.0 / np.sqrt(fan), shape)
        return value.astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, dict(shapes))
    return model, variables


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert scale > 0, what
    assert err < 1e-4 * scale, f"{what}: max abs diff {err} vs scale {scale}"


def assert_same_variables(actual, expected):
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=str(path))


def run_cli(*args, timeout=300):
    """``python -m cka_jax.export ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cka_jax.interop.export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A resnet10 of width 8 with the 'small' stem (what torchvision cannot build), saved."""
    model, variables = random_flax_model("resnet10", stem="small", width=8, channels=3, size=16)
    directory = tmp_path_factory.mktemp("small") / "model"
    save_model(directory, variables, meta_for("resnet10", stem="small", width=8, size=16))
    return model, variables, directory


# --- torchvision --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "where"), [("resnet18", "student"), ("resnet50", "runs/cka/seed_0/selected")]
)
def test_torchvision_export_loads_strictly_into_torchvisions_own_model(arch, where, tmp_path):
    model_t = torchvision_model(arch)
    model, variables = port.from_torchvision(model_t.state_dict(), arch)
    workdir = tmp_path / "work"
    save_model(workdir / where, variables, meta_for(arch))
    out = tmp_path / "exported" / arch
    flags = [f"--workdir={workdir}", "--format=torchvision", f"--out={out}"]
    if where != "student":
        flags.append("--run=cka/0")
    assert export.main(flags) == 0

    # torchvision's own constructor loads the .pth strictly and computes the same logits.
    state = torch.load(f"{out}.pth", weights_only=True)
    loaded = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
    loaded.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(loaded.eval()(x).numpy(), model_t(x).numpy(), f"{arch} logits")

    # Tensor for tensor, in torchvision's order: the original state_dict (num_batches_tracked
    # is 0: Flax does not count batches).
    reference = model_t.state_dict()
    assert list(state) == list(reference)
    for name, value in reference.items():
        if name.endswith("num_batches_tracked"):
            assert state[name].dtype == torch.int64 and state[name].shape == () == value.shape
            assert int(state[name]) == 0
        else:
            assert state[name].dtype == torch.float32, name
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)

    # The .safetensors beside it holds the same tensors; porting it back gives the variables.
    tensors = safetensors.numpy.load_file(f"{out}.safetensors")
    assert tensors.keys() == state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)
    _, back = port.from_torchvision(port.load_state_dict(f"{out}.safetensors"), arch)
    assert_same_variables(back, variables)

    description = json.loads(Path(f"{out}.json").read_text())
    assert description["format"] == "torchvision"
    assert description["torchvision"] == {
        "constructor": f"torchvision.models.{arch}",
        "num_classes": NUM_CLASSES,
    }
    assert description["class_names"] == CLASS_NAMES
    pre = description["preprocess"]
    assert (pre["image_size"], pre["channels"], pre["mean"], pre["std"]) == (64, 3, MEAN, STD)
    assert description["input"]["layout"] == "NCHW"
    assert description["files"] == {
        "state_dict": f"{arch}.pth",
        "weights": f"{arch}.safetensors",
    }


@pytest.mark.parametrize(
    ("arch", "stem", "width", "why"),
    [
        ("resnet10", "small", 8, "torchvision has no 'resnet10'"),
        ("resnet18", "imagenet", 16, "width 16 (torchvision's: 64)"),
        ("resnet18", "small", 64, "stem 'small' (torchvision's: 'imagenet')"),
    ],
)
def test_torchvision_format_refuses_what_torchvision_cannot_build(arch, stem, width, why, tmp_path):
    model = create_model(arch, NUM_CLASSES, stem=stem, width=width)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
    description = export.describe_architecture(variables, meta_for(arch, stem=stem, width=width))
    assert why in export.torchvision_mismatch(description)


# --- safetensors + torch_resnet -----------------------------------------------------------


def check_torch_resnet_round_trip(model, variables, directory, out, *, arch, stem, width, size):
    assert export.main([f"--model_dir={directory}", "--format=safetensors", f"--out={out}"]) == 0
    description = json.loads(Path(f"{out}.json").read_text())
    assert description["format"] == "safetensors" and "torchvision" not in description
    assert description["loader"] == "cka_jax.interop.torch_resnet.load_resnet"
    channels = description["architecture"]["in_channels"]

    torch_model = torch_resnet.load_resnet(f"{out}.json")  # strict=True inside
    x = np.random.default_rng(2).normal(size=(2, size, size, channels)).astype(np.float32)
    logits, features = jax.jit(model.apply)(variables, x)
    with torch.no_grad():
        x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
        logits_t = torch_model(x_nchw).numpy()
        features_t = torch_model.features(x_nchw).permute(0, 2, 3, 1).numpy()
    assert_close(logits_t, logits, f"{arch} logits")
    assert_close(features_t, features, f"{arch} features")

    # The tensors are the exact inverse of port.from_torchvision.
    state = port.load_state_dict(f"{out}.safetensors")
    _, back = port.from_torchvision(state, arch, stem=stem, width=width)
    assert_same_variables(back, variables)
    assert set(state) == set(torch_resnet.build_resnet(description).state_dict())
    return description


def test_small_stem_resnet10_runs_in_pytorch(small_model, tmp_path):
    model, variables, directory = small_model
    out = tmp_path / "resnet10"
    description = check_torch_resnet_round_trip(
        model, variables, directory, out, arch="resnet10", stem="small", width=8, size=16
    )
    assert description["architecture"] == {
        "arch": "resnet10",
        "block": "basic",
        "stage_sizes": [1, 1, 1, 1],
        "width": 8,
        "stem": "small",
        "in_channels": 3,
        "num_classes": NUM_CLASSES,
        "groups": 1,
        "width_per_group": 64,
        "stage_widths": [8, 16, 32, 64],
        "stage_out_channels": [8, 16, 32, 64],
        "stage_strides": [1, 2, 2, 2],
    }
    assert description["class_names"] == CLASS_NAMES
    assert description["input"] == {
        "layout": "NCHW",
        "shape": ["batch", 3, 16, 16],
        "dtype": "float32",
        "output": "logits",
    }
    # Existing files are kept unless --overwrite is given.
    flags = [f"--model_dir={directory}", "--format=safetensors", f"--out={out}"]
    assert export.main(flags) == 2
    assert export.main([*flags, "--overwrite"]) == 0


def test_narrow_gray_bottleneck_resnet_runs_in_pytorch(tmp_path):
    """Bottleneck blocks, the ImageNet stem with its max-pool, and 1-channel input."""
    model, variables = random_flax_model(
        "resnet50", stem="imagenet", width=8, channels=1, size=32, seed=3
    )
    directory = tmp_path / "model"
    save_model(directory, variables, meta_for("resnet50", width=8, channels=1, size=32))
    description = check_torch_resnet_round_trip(
        model,
        variables,
        directory,
        tmp_path / "r50",
        arch="resnet50",
        stem="imagenet",
        width=8,
        size=32,
    )
    arch = description["architecture"]
    assert arch["block"] == "bottleneck" and arch["in_channels"] == 1
    assert arch["stage_widths"] == [8, 16, 32, 64]
    assert arch["stage_out_channels"] == [32, 64, 128, 256]
    assert description["preprocess"]["mean"] == MEAN[:1]


# --- StableHLO ----------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import cka_jax.interop.torch_resnet  # noqa: F401 - must not import torch
    from cka_jax.interop.export import load_stablehlo

    program, images, out = sys.argv[1:]
    forward = load_stablehlo(program)
    x = np.load(images)
    np.save(out + "_1.npy", np.asarray(forward(x[:1])))
    np.save(out + "_3.npy", np.asarray(forward(x)))
    try:
        forward(x[:, :8])
    except ValueError as err:
        print("refused:", err)
    loaded = sorted(m for m in ("flax", "torch", "cka_jax.models", "orbax") if m in sys.modules)
    print("loaded:", loaded)
    """
)


def test_stablehlo_runs_in_a_fresh_process_at_any_batch_size(small_model, tmp_path):
    model, variables, directory = small_model
    out = tmp_path / "student"
    assert export.main([f"--model_dir={directory}", "--format=stablehlo", f"--out={out}"]) == 0
    description = json.loads(Path(f"{out}.json").read_text())
    assert description["format"] == "stablehlo"
    assert description["input"]["layout"] == "NHWC"
    assert description["input"]["shape"] == ["batch", 16, 16, 3]
    assert description["platforms"] == ["cpu", "cuda"]
    assert description["class_names"] == CLASS_NAMES
    assert description["preprocess"]["mean"] == MEAN
    assert description["files"] == {"program": "student.stablehlo", "description": "student.json"}

    x = np.random.default_rng(5).normal(size=(3, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run_exported.py"
    script.write_text(FRESH_PROCESS)
    result = subprocess.run(
        [sys.executable, str(script), f"{out}.stablehlo", tmp_path / "x.npy", tmp_path / "y"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "refused: student.stablehlo takes NHWC images of shape (batch, 16, 16, 3)" in (
        result.stdout
    )
    assert "loaded: []" in result.stdout  # the program needs neither flax nor cka_jax's models

    logits, _ = jax.jit(model.apply)(variables, x)
    y1, y3 = np.load(tmp_path / "y_1.npy"), np.load(tmp_path / "y_3.npy")
    assert y1.shape == (1, NUM_CLASSES) and y3.shape == (3, NUM_CLASSES)
    assert_close(y1, np.asarray(logits)[:1], "batch of 1")
    assert_close(y3, logits, "batch of 3")


# --- command-line errors ------------------------------------------------------------------


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_command_line_errors_are_clear(small_model, tmp_path):
    _, _, directory = small_model
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = tmp_path / "out"
    assert_usage_error(
        run_cli(f"--workdir={workdir}", "--format=torchvision", f"--out={out}"),
        f"nothing to export at {workdir / 'student'}",
        "--model_dir",
    )
    assert_usage_error(
        run_cli(f"--workdir={workdir}", "--format=onnx", f"--out={out}"),
        "argument --format: invalid choice: 'onnx'",
    )
    assert_usage_error(
        run_cli(f"--model_dir={directory}", "--format=torchvision", f"--out={out}"),
        "torchvision has no 'resnet10'",
        "Use --format=safetensors",
    )
    assert not list(tmp_path.glob("out*"))  # nothing written


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workdir=w", "--run=cka"], "--run='cka' is not METHOD/SEED"),
        (["--workdir=w", "--run=cka/first"], "--run='cka/first' is not METHOD/SEED"),
        (["--workdir=w", "--model_dir=m"], "give either --model_dir, or --workdir"),
        ([], "give --workdir=DIR"),
        (["--workdir=w", "--platforms=cpu,gpu"], "--platforms=cpu,gpu: unknown platform 'gpu'"),
    ],
)
def test_contradictory_or_malformed_flags(flags, message, tmp_path, capsys):
    assert export.main([*flags, "--format=safetensors", f"--out={tmp_path / 'o'}"]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_a_missing_run_lists_the_runs_that_exist(small_model, tmp_path, capsys):
    _, variables, _ = small_model
    workdir = tmp_path / "work"
    meta = meta_for("resnet10", stem="small", width=8, size=16)
    save_model(workdir / "runs" / "kd" / "seed_1" / "selected", variables, meta)
    flags = [f"--workdir={workdir}", "--run=cka/0", "--format=safetensors", f"--out={tmp_path}/o"]
    assert export.main(flags) == 2
    err = capsys.readouterr().err
    assert "nothing to export at" in err and "--run=METHOD/SEED (kd/1)" in err


@pytest.mark.parametrize("arch", sorted(export.TORCHVISION_RESNETS))
def test_torchvision_table_has_torchvisions_shapes(arch):
    """`torch_resnet` builds, from the table's description, torchvision's exact tensors."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        reference = getattr(torchvision.models, arch)(weights=None, num_classes=NUM_CLASSES)
        built = torch_resnet.build_resnet(export.torchvision_architecture(arch, NUM_CLASSES))
    shapes = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in built.state_dict().items()] == shapes


def test_grouped_bottlenecks_compute_what_torchvision_computes():
    """ResNeXt's grouped 3x3 convolutions: torchvision's weights in `torch_resnet`'s model."""
    model_t = torchvision_model("resnext50_32x4d")
    built = torch_resnet.build_resnet(export.torchvision_architecture("resnext50_32x4d", 5))
    built.load_state_dict(model_t.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_close(built.eval()(x).numpy(), model_t(x).numpy(), "resnext50_32x4d logits")


def test_out_naming_a_directory_is_refused(small_model, tmp_path, capsys):
    _, _, directory = small_model
    flags = [f"--model_dir={directory}", "--format=safetensors", f"--out={tmp_path}"]
    assert export.main(flags) == 2
    assert f"--out={tmp_path} is a directory" in capsys.readouterr().err


def test_torchvision_format_without_torch_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    flags = [f"--model_dir={tmp_path / 'm'}", "--format=torchvision", f"--out={tmp_path / 'o'}"]
    assert export.main(flags) == 2
    err = capsys.readouterr().err
    assert "error: writing a .pth needs PyTorch" in err and "--format=safetensors" in err
