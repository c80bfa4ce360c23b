"""Porting torchvision ResNets: exact outputs (every architecture, against torchvision's own
models), file formats, bad files, errors, untrusted pickles, the command line
(``python -m cka_jax.port``), and a ported teacher amalgamated end to end.

These tests need torch and torchvision (the ``[port]`` extra); without them the module fails
to import with a message saying so, rather than being skipped.
"""

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

try:
    import safetensors.torch
    import torch
    import torchvision
except ImportError as err:  # fail loudly: these tests must run in CI
    raise ImportError(
        "tests/interop/test_port.py needs torch, torchvision and safetensors: "
        "pip install -e '.[port,test]'"
    ) from err

from cka_jax.data import eval_kwargs, eval_preprocess
from cka_jax.interop import port
from cka_jax.models.storage import load_model
from cka_jax.stages import experiment, inputs
from tests import tiny_config

ARCHS = ("resnet18", "resnet34", "resnet50")
NUM_CLASSES = 10
REPO = Path(__file__).resolve().parents[2]


def torchvision_model(arch, num_classes=NUM_CLASSES, seed=0, size=64):
    """torchvision's own model, random weights, non-trivial BatchNorm statistics, eval mode
    (statistics from three training-mode batches of 4 random ``size`` x ``size`` images)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # defaults are 1 and 0: make them count
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):  # running statistics move away from 0 and 1
            model(torch.randn(4, 3, size, size) * 1.5 + 0.3)
    return model.eval()


def torch_forward(model, x_nchw):
    """torchvision's logits and last feature map (layer4 output), the map as NHWC."""
    captured = []
    hook = model.layer4.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = model(x_nchw)
    finally:
        hook.remove()
    return logits.numpy(), captured[0].permute(0, 2, 3, 1).numpy()


def numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def shape_state_dict(arch, num_classes=NUM_CLASSES):
    """Zeros named and shaped as torchvision's ``arch`` (built on the meta device: no weights,
    no initialisation cost; untouched zeros take no memory): for layout checks."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return {k: np.zeros(tuple(v.shape), np.float32) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = torchvision_model(arch)
        return cache[arch]

    return get


def assert_close(actual, expected, what):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, what
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max())
    assert scale > 0, what
    assert err < 1e-4 * scale, f"{what}: max abs diff {err} vs scale {scale}"


@pytest.mark.parametrize("arch", ARCHS)
def test_ported_model_computes_what_torchvision_computes(arch, models, tmp_path):
    model_t = models(arch)
    pth = tmp_path / f"{arch}.pth"
    st = tmp_path / f"{arch}.safetensors"
    torch.save(model_t.state_dict(), pth)
    safetensors.torch.save_file(model_t.state_dict(), st)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits_t, features_t = torch_forward(model_t, x)
    x_nhwc = x.permute(0, 2, 3, 1).numpy()
    reference = numpy_state_dict(model_t)

    forward = None
    for path in (pth, st):
        state_dict = port.load_state_dict(path)
        assert state_dict.keys() == reference.keys()
        for name, value in reference.items():
            np.testing.assert_array_equal(state_dict[name], value, err_msg=name)
        assert port.guess_arch(state_dict) == arch
        model, variables = port.from_torchvision(state_dict, arch)
        assert model.num_classes == NUM_CLASSES
        if forward is None:
            forward = jax.jit(model.apply)
        logits, features = forward(variables, x_nhwc)
        assert_close(logits, logits_t, f"{arch} logits from {path.suffix}")
        assert_close(features, features_t, f"{arch} features from {path.suffix}")
    # Parameter counts agree (torch's BatchNorm statistics are buffers, ours batch_stats).
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    assert n_params == sum(p.numel() for p in model_t.parameters())


# The deeper, wide and ResNeXt nets: (arch, input size, batch, file formats). The three
# largest run on one 32 x 32 image (their last stage sees a 1 x 1 map: im2col paths).
NEW_ARCHS = [
    ("resnet101", 64, 2, (".safetensors",)),
    ("wide_resnet50_2", 64, 2, (".safetensors",)),
    ("resnext50_32x4d", 64, 2, (".safetensors", ".pth")),
    pytest.param("resnet152", 32, 1, (".safetensors",), marks=pytest.mark.slow),
    pytest.param("wide_resnet101_2", 32, 1, (".safetensors",), marks=pytest.mark.slow),
    pytest.param("resnext101_32x8d", 32, 1, (".safetensors",), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "size", "batch", "formats"), NEW_ARCHS)
def test_deep_wide_and_resnext_ports_compute_what_torchvision_computes(
    arch, size, batch, formats, tmp_path
):
    model_t = torchvision_model(arch, size=size)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    logits_t, features_t = torch_forward(model_t, x)
    for suffix in formats:
        path = tmp_path / f"{arch}{suffix}"
        if suffix == ".pth":
            torch.save(model_t.state_dict(), path)
        else:
            safetensors.torch.save_file(model_t.state_dict(), path)
        state_dict = port.load_state_dict(path)
        assert port.guess_arch(state_dict) == arch
        model, variables = port.from_torchvision(state_dict, arch)
        del state_dict
        logits, features = model.apply(variables, x.permute(0, 2, 3, 1).numpy())
        assert_close(logits, logits_t, f"{arch} logits from {suffix}")
        assert_close(features, features_t, f"{arch} features from {suffix}")
        path.unlink()
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    assert n_params == sum(p.numel() for p in model_t.parameters())
    if arch.startswith("resnext"):  # the grouped 3x3 kernel is torch's (O, I/g, 3, 3), HWIO
        kernel = np.asarray(variables["params"]["layer3_1"]["conv2"]["kernel"])
        weight = model_t.layer3[1].conv2.weight.detach().numpy()
        assert model_t.layer3[1].conv2.groups == 32 and weight.shape[1] * 32 == weight.shape[0]
        np.testing.assert_array_equal(kernel, weight.transpose(2, 3, 1, 0))


def test_every_architecture_is_told_apart_by_its_tensors():
    """Block counts, conv3 (bottleneck) and conv2's channels and groups name each of
    torchvision's ResNets, and the table agrees with the models cka_jax builds."""
    from cka_jax.models import ARCHITECTURES

    for arch in port.TORCHVISION_ARCHS + ("resnext101_64x4d",):
        assert port.guess_arch(shape_state_dict(arch)) == arch
    for name, a in ARCHITECTURES.items():
        kind = "bottleneck" if a.block.expansion == 4 else "basic"
        assert port.KNOWN_LAYOUTS[(a.stage_sizes, kind, a.groups, a.width_per_group)] == name


def test_numpy_state_dict_and_torch_tensors_port_the_same(models):
    model_t = models("resnet18")
    _, from_numpy = port.from_torchvision(numpy_state_dict(model_t), "resnet18")
    _, from_tensors = port.from_torchvision(model_t.state_dict(), "resnet18")
    jax.tree.map(np.testing.assert_array_equal, from_numpy, from_tensors)
    kernel = np.asarray(from_numpy["params"]["layer2_0"]["downsample_conv"]["kernel"])
    torch_weight = model_t.layer2[0].downsample[0].weight.detach().numpy()
    np.testing.assert_array_equal(kernel, torch_weight.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    np.testing.assert_array_equal(
        np.asarray(from_numpy["batch_stats"]["layer1_1"]["bn2"]["var"]),
        model_t.layer1[1].bn2.running_var.numpy(),
    )


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model_state": sd, "epoch": 7},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_acc": 0.5},
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["model_state", "state_dict+module", "model", "module"],
)
def test_nested_and_dataparallel_checkpoints_are_unwrapped(wrap, models, tmp_path):
    model_t = models("resnet18")
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(model_t.state_dict()), path)
    state_dict = port.load_state_dict(path)
    reference = numpy_state_dict(model_t)
    assert state_dict.keys() == reference.keys()
    np.testing.assert_array_equal(state_dict["fc.weight"], reference["fc.weight"])


def test_real_dataparallel_state_dict_ports(models):
    wrapped = torch.nn.DataParallel(models("resnet18"))
    assert next(iter(wrapped.state_dict())).startswith("module.")
    model, _ = port.from_torchvision(wrapped.state_dict(), "resnet18")
    assert model.num_classes == NUM_CLASSES


@pytest.fixture
def resnet18_state(models):
    return numpy_state_dict(models("resnet18"))


def test_missing_tensor_is_named_with_its_shape(resnet18_state):
    del resnet18_state["layer2.1.bn2.running_var"]
    with pytest.raises(
        port.PortError,
        match=r"missing tensor 'layer2\.1\.bn2\.running_var' \(expected shape \(128,\)\)",
    ):
        port.from_torchvision(resnet18_state, "resnet18")


def test_unexpected_tensor_is_named_with_its_shape(resnet18_state):
    resnet18_state["layer1.0.se.weight"] = np.zeros((3, 5), np.float32)
    with pytest.raises(
        port.PortError,
        match=r"unexpected tensor 'layer1\.0\.se\.weight' with shape \(3, 5\)",
    ):
        port.from_torchvision(resnet18_state, "resnet18")


def test_misshaped_tensor_names_both_shapes(resnet18_state):
    resnet18_state["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    with pytest.raises(
        port.PortError,
        match=r"'layer3\.0\.conv2\.weight' has shape \(256, 256, 1, 1\) but resnet18 expects "
        r"\(256, 256, 3, 3\)",
    ):
        port.from_torchvision(resnet18_state, "resnet18")
    resnet18_state["layer3.0.conv2.weight"] = np.zeros((256, 256, 3, 3), np.float32)
    resnet18_state["fc.bias"] = np.zeros(11, np.float32)
    with pytest.raises(port.PortError, match=r"'fc\.bias' has shape \(11,\) but .* \(10,\)"):
        port.from_torchvision(resnet18_state, "resnet18")


def test_misshaped_grouped_convolution_names_the_tensor_and_both_shapes():
    state_dict = shape_state_dict("resnext50_32x4d")
    assert state_dict["layer2.0.conv2.weight"].shape == (256, 8, 3, 3)  # 32 groups of 8
    state_dict["layer2.0.conv2.weight"] = np.zeros((256, 256, 3, 3), np.float32)  # ungrouped
    with pytest.raises(
        port.PortError,
        match=r"tensor 'layer2\.0\.conv2\.weight' has shape \(256, 256, 3, 3\) but "
        r"resnext50_32x4d expects \(256, 8, 3, 3\) \(a grouped 3x3 convolution: 32 groups",
    ):
        port.from_torchvision(state_dict, "resnext50_32x4d")


def test_missing_classifier_is_a_clear_error(resnet18_state):
    del resnet18_state["fc.weight"]
    with pytest.raises(port.PortError, match=r"no 'fc\.weight'"):
        port.from_torchvision(resnet18_state, "resnet18")


@pytest.mark.parametrize(
    ("actual", "claimed"),
    [("resnet34", "resnet18"), ("resnet50", "resnet34"), ("resnet18", "resnet50")],
)
def test_wrong_arch_says_which_arch_the_tensors_look_like(actual, claimed, models):
    state_dict = models(actual).state_dict()
    with pytest.raises(port.PortError, match=rf"not a {claimed}: .*look like a {actual}"):
        port.from_torchvision(state_dict, claimed)


@pytest.mark.parametrize(
    ("actual", "claimed", "layout"),
    [
        ("wide_resnet50_2", "resnet50", "groups=1, width_per_group=128"),
        ("resnet50", "wide_resnet50_2", "groups=1, width_per_group=64"),
        ("resnext50_32x4d", "resnet50", "groups=32, width_per_group=4"),
        ("resnet50", "resnext50_32x4d", "groups=1, width_per_group=64"),
        ("wide_resnet101_2", "resnext101_32x8d", "groups=1, width_per_group=128"),
        ("resnext101_32x8d", "resnet101", "groups=32, width_per_group=8"),
        ("resnet152", "resnet101", r"\(3, 8, 36, 3\)"),
    ],
)
def test_wide_resnext_and_plain_nets_are_told_apart(actual, claimed, layout):
    with pytest.raises(
        port.PortError,
        match=rf"not a {claimed}: its tensors look like a {actual} \(.*{layout}.*\); port it as "
        rf"arch '{actual}'",
    ):
        port.from_torchvision(shape_state_dict(actual), claimed)


def test_unsupported_torchvision_arch_is_named():
    state_dict = shape_state_dict("resnext101_64x4d")
    assert port.guess_arch(state_dict) == "resnext101_64x4d"
    with pytest.raises(port.PortError, match="look like a resnext101_64x4d.*can port"):
        port.from_torchvision(state_dict, "resnext101_32x8d")


def timm_variant(state_dict):
    """``state_dict`` renamed the way timm's resnet*d variants name their deep stem
    (``conv1.0`` ...) and average-pool downsampling (``downsample.1`` conv, ``.2`` norm)."""
    renamed = {}
    for name, value in state_dict.items():
        if name == "conv1.weight":
            name = "conv1.0.weight"
        name = name.replace(".downsample.1.", ".downsample.2.")
        renamed[name.replace(".downsample.0.", ".downsample.1.")] = value
    return renamed


def test_timm_checkpoint_files_port_and_timm_variants_are_named(resnet18_state, tmp_path):
    # timm's plain ResNets use torchvision's names; its hub files are model.safetensors and
    # pytorch_model.bin holding the bare state_dict.
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = tmp_path / name
        if name.endswith(".bin"):
            torch.save({k: torch.from_numpy(v) for k, v in resnet18_state.items()}, path)
        else:
            safetensors.torch.save_file(
                {k: torch.from_numpy(v) for k, v in resnet18_state.items()}, path
            )
        _, variables = port.from_torchvision(port.load_state_dict(path), "resnet18")
        np.testing.assert_array_equal(
            variables["params"]["fc"]["kernel"], resnet18_state["fc.weight"].T
        )
    with pytest.raises(port.PortError, match=r"'conv1\.0\.weight', a deep stem .*timm"):
        port.from_torchvision(timm_variant(resnet18_state), "resnet18")
    only_downsample = timm_variant(resnet18_state)
    only_downsample["conv1.weight"] = only_downsample.pop("conv1.0.weight")
    with pytest.raises(port.PortError, match=r"'layer2\.0\.downsample\.2\..*average-pool"):
        port.from_torchvision(only_downsample, "resnet18")


def test_unknown_extension_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        port.load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(port.PortError, match=r"\.safetensors"):
        port.load_state_dict(tmp_path / "weights.npz")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(port.PortError, match=r"dir\.pth is a directory; expected a \.pth"):
        port.load_state_dict(tmp_path / "dir.pth")


def torch_zip_bytes(state):
    """What ``torch.save`` writes (a zip archive)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def npz_bytes(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def legacy_pickle_bytes(state):
    """What ``torch.save`` wrote before PyTorch 1.6 (a pickle followed by the storages)."""
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


SMALL = {"conv1.weight": torch.ones(4, 3, 3, 3), "fc.weight": torch.ones(2, 4)}
# name -> (file name, its bytes, what the error must say). Each is a real, unreadable file.
BAD_FILES = {
    "truncated_zip": (
        "t.pth",
        lambda: torch_zip_bytes(SMALL)[:-300],
        r"could not read .*t\.pth as a PyTorch checkpoint: it is truncated, corrupt",
    ),
    "truncated_legacy": (
        "t.pt",
        lambda: legacy_pickle_bytes(SMALL)[:-100],
        r"could not read .*t\.pt as a PyTorch checkpoint: it is truncated, corrupt",
    ),
    "truncated_safetensors": (
        "t.safetensors",
        lambda: safetensors.torch.save(SMALL)[:-20],
        r"could not read .*t\.safetensors as a safetensors file: it is truncated, corrupt",
    ),
    "random_pth": (
        "r.pth",
        lambda: np.random.default_rng(0).bytes(4096),
        r"r\.pth is not a PyTorch checkpoint: torch\.save writes a zip archive .*is neither",
    ),
    "random_safetensors": (
        "r.safetensors",
        lambda: np.random.default_rng(0).bytes(4096),
        r"could not read .*r\.safetensors as a safetensors file",
    ),
    "empty_pth": ("e.pth", lambda: b"", r"e\.pth is empty \(0 bytes\); expected a PyTorch"),
    "empty_safetensors": (
        "e.safetensors",
        lambda: b"",
        r"e\.safetensors is empty \(0 bytes\); expected a safetensors file",
    ),
    "torch_zip_named_safetensors": (
        "w.safetensors",
        lambda: torch_zip_bytes(SMALL),
        r"w\.safetensors is not a safetensors file: it holds a PyTorch checkpoint .*rename it "
        r"to end in \.pth",
    ),
    "legacy_pickle_named_safetensors": (
        "w.safetensors",
        lambda: legacy_pickle_bytes(SMALL),
        r"w\.safetensors is not a safetensors file: it holds a pickle",
    ),
    "text_named_pth": (
        "w.pth",
        lambda: b"conv1.weight: [[0.1, 0.2]]\nfc.weight: [1, 2]\n",
        r"w\.pth is not a PyTorch checkpoint: .*this file holds text",
    ),
    "safetensors_named_pth": (
        "w.pth",
        lambda: safetensors.torch.save(SMALL),
        r"w\.pth holds safetensors data, not a PyTorch checkpoint: rename it to end in "
        r"\.safetensors",
    ),
    "numpy_npz_named_pth": (  # a zip archive, but not torch.save's
        "w.pth",
        lambda: npz_bytes({"conv1.weight": np.ones((4, 3, 3, 3))}),
        r"could not read .*w\.pth as a PyTorch checkpoint: it is truncated, corrupt or not "
        r"written by torch\.save",
    ),
    "tensor_not_state_dict": (
        "w.pth",
        lambda: torch_zip_bytes(torch.ones(3)),
        r"w\.pth: expected a state_dict \(a mapping of names to tensors\), got a Tensor",
    ),
    "bad_safetensors_header": (
        "w.safetensors",
        lambda: (16).to_bytes(8, "little") + b'{"a": 1}' + b" " * 8,
        r"could not read .*w\.safetensors as a safetensors file: it is truncated, corrupt",
    ),
    "plain_pickle_protocol_5": (
        "w.pth",
        lambda: pickle.dumps({"fc.weight": np.ones(2)}, protocol=5),
        r"could not read .*w\.pth as a PyTorch checkpoint: .*a pickle that torch\.save did "
        r"not write",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_checkpoint_files_are_one_line_errors_naming_the_file(case, tmp_path, capsys):
    name, contents, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(contents())
    with pytest.raises(port.PortError, match=message) as info:
        port.load_state_dict(path)
    assert type(info.value) is port.PortError  # not the untrusted-pickle refusal
    assert str(path) in str(info.value) and "\n" not in str(info.value)

    out = tmp_path / "out"
    assert port.main(["--checkpoint", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {info.value}\n"  # one line, no traceback
    assert not out.exists()


def run_command_line(args):
    """``python ARGS`` in a fresh process from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


@pytest.mark.parametrize("case", ["truncated_zip", "random_pth", "safetensors_named_pth"])
def test_command_line_reports_a_bad_file_in_one_line_with_exit_code_2(tmp_path, case):
    """``python -m cka_jax.port``, and the scripts/ file that wraps it, in a fresh process, on
    a truncated file, random bytes and a file of another format."""
    name, contents, message = BAD_FILES[case]
    path = tmp_path / f"teacher{Path(name).suffix}"
    path.write_bytes(contents())
    commands = [["-m", "cka_jax.interop.port"]]
    if case == "truncated_zip":
        commands.append([str(REPO / "scripts" / "port_torch_resnet.py")])
    for command in commands:
        result = run_command_line(
            [*command, "--checkpoint", str(path), "--out", str(tmp_path / "out")]
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert re.search(message.replace(name.replace(".", r"\."), ""), lines[0]), lines[0]
        assert str(path) in lines[0] and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_safetensors_needs_no_torch_and_pth_asks_for_the_port_extra(
    resnet18_state, tmp_path, monkeypatch
):
    from safetensors.numpy import save_file

    st = tmp_path / "t.safetensors"
    save_file(resnet18_state, str(st))
    (tmp_path / "t.pth").write_bytes(torch_zip_bytes(SMALL))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    state_dict = port.load_state_dict(st)
    np.testing.assert_array_equal(state_dict["conv1.weight"], resnet18_state["conv1.weight"])
    with pytest.raises(ImportError, match=r"\[port\]"):
        port.load_state_dict(tmp_path / "t.pth")


class Payload:
    """Unpickling this object runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused_and_does_not_run(writer, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "teacher.pth"
    obj = {"state_dict": {"conv1.weight": torch.zeros(1), "fc.weight": Payload(marker)}}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    with pytest.raises(
        port.UntrustedCheckpointError,
        match=r"refused to load .*teacher\.pth.*untrusted pickle",
    ):
        port.load_state_dict(path)
    assert not marker.exists()

    code = port.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refused to load") and "untrusted pickle" in err
    assert "Unsupported global" in err and err.count("\n") == 1
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # The file really is malicious: plain unpickling runs the payload.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)  # demonstrating the attack
    assert marker.read_text() == "pwned"


def test_command_line_writes_a_loadable_checkpoint_with_its_meta(models, tmp_path, capsys):
    model_t = models("resnet18")
    path = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(model_t.state_dict(), path)
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"digit{i}\n" for i in range(NUM_CLASSES)))
    out = tmp_path / "ported"
    argv = [
        "--checkpoint",
        str(path),
        "--out",
        str(out),
        "--class-names",
        str(names),
        "--image-size",
        "64",
    ]
    # In a fresh process, as users run it; --arch is read off the layout.
    result = run_command_line(["-m", "cka_jax.interop.port", *argv])
    assert result.returncode == 0, result.stderr
    assert "resnet18 with 10 classes" in result.stdout

    model, variables, meta = load_model(out)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == NUM_CLASSES
    assert meta["width"] == 64 and meta["stem"] == "imagenet" and meta["channels"] == 3
    assert meta["image_size"] == 64 and meta["source"] == "torchvision"
    assert meta["class_names"] == [f"digit{i}" for i in range(NUM_CLASSES)]
    assert meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    _, expected = port.from_torchvision(numpy_state_dict(model_t), "resnet18")
    jax.tree.map(np.testing.assert_array_equal, dict(variables), expected)

    # An existing output is not overwritten without --overwrite; a wrong --arch is explained.
    assert port.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert port.main([*argv, "--overwrite", "--arch", "resnet34"]) == 2
    assert "look like a resnet18" in capsys.readouterr().err
    names.write_text("a\nb\n")
    assert port.main([*argv, "--overwrite"]) == 2
    assert "lists 2 names" in capsys.readouterr().err


def test_command_line_ports_a_resnext(tmp_path, capsys):
    """A grouped-convolution net through `port.main`: detected, written, loaded, exact."""
    model_t = torchvision_model("resnext50_32x4d", num_classes=3, size=32)
    path = tmp_path / "resnext.pth"
    torch.save({"state_dict": model_t.state_dict(), "epoch": 1}, path)
    out = tmp_path / "ported"
    assert port.main(["--checkpoint", str(path), "--out", str(out), "--image_size", "32"]) == 0
    assert "resnext50_32x4d with 3 classes" in capsys.readouterr().out
    model, variables, meta = load_model(out)
    assert meta["arch"] == "resnext50_32x4d"
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    logits_t, _ = torch_forward(model_t, x)
    logits, _ = model.apply(variables, x.permute(0, 2, 3, 1).numpy())
    assert_close(logits, logits_t, "resnext50_32x4d logits after the command line")


@pytest.mark.slow
def test_ported_teachers_are_amalgamated_end_to_end(tmp_path):
    """Two torchvision teachers (digits 0-4 and 5-9) ported with `port.main` and named in a
    config: the run uses them as they are (no teacher training) and trains a student."""
    cfg = tiny_config.get_config()
    cfg.epochs = 1
    cfg.methods = ("kd",)
    cfg.checkpoint_every = 0  # once, at the epoch's end
    teachers_t, entries = [], []
    for t in range(2):
        model_t = torchvision_model("resnet18", num_classes=5, seed=10 + t, size=16)
        path = tmp_path / f"teacher{t}.pth"
        torch.save({"model_state": model_t.state_dict(), "epoch": 3}, path)
        out = tmp_path / f"ported{t}"
        argv = ["--arch", "resnet18", "--checkpoint", str(path), "--out", str(out)]
        assert port.main([*argv, "--image-size", "16"]) == 0
        teachers_t.append(model_t)
        entries.append(
            {"checkpoint": str(out), "arch": "resnet18", "stem": "imagenet", "width": 64}
        )
    cfg.teachers = tuple(entries)
    workdir = tmp_path / "run"
    experiment.run(cfg, workdir)

    # Nothing was trained: no teacher run directories, and any teacher checkpoint in the
    # workdir is the ported one.
    teachers_dir = workdir / "teachers"
    assert not list(teachers_dir.glob("*.run"))  # (empty when the directory is absent)
    for meta_file in teachers_dir.glob("*/model.json"):
        assert json.loads(meta_file.read_text())["source"] == "torchvision"
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "teacher:task0",
        "teacher:task1",
        "ensemble",
        "oracle_routing",
        "kd",
    ]
    assert 0 <= rows[-1]["merged_acc"] <= 100
    assert rows[0]["params"] == sum(p.numel() for p in teachers_t[0].parameters())

    # The teacher rows score what the torchvision models score on the same test images,
    # normalised as the ported teachers record (ImageNet's mean/std), not as the run's views.
    taskset, dataset = inputs.prepare_data(cfg)
    own = {**eval_kwargs(cfg.augment), "mean": port.IMAGENET_MEAN, "std": port.IMAGENET_STD}
    x = np.asarray(eval_preprocess(dataset.test.images, **own))
    labels = np.asarray(dataset.test.labels)
    for t, model_t in enumerate(teachers_t):
        with torch.no_grad():
            logits = model_t(torch.from_numpy(x.copy()).permute(0, 3, 1, 2)).numpy()
        sl = taskset.slices[t]
        in_task = (labels >= sl.start) & (labels < sl.stop)
        acc = np.mean(np.argmax(logits[in_task], -1) + sl.start == labels[in_task]) * 100
        assert rows[t]["task_acc"][taskset.names[t]] == pytest.approx(acc)
