"""Porting torchvision ResNets: exact outputs, file formats, errors, untrusted pickles, and a
ported teacher amalgamated end to end.

These tests need torch and torchvision (the ``[port]`` extra); without them the module fails
to import with a message saying so, rather than being skipped.
"""

import json
import pickle
import sys

import jax
import numpy as np
import pytest

try:
    import safetensors.torch
    import torch
    import torchvision
except ImportError as err:  # fail loudly: these tests must run in CI
    raise ImportError(
        "tests/test_port.py needs torch, torchvision and safetensors: pip install -e '.[port,test]'"
    ) from err

from cka_jax import experiment, port
from cka_jax.checkpoint import load_model
from tests import tiny_config
from tests.script_loader import load_script

ARCHS = ("resnet18", "resnet34", "resnet50")
NUM_CLASSES = 10


script = load_script("port_torch_resnet")


def torchvision_model(arch, num_classes=NUM_CLASSES, seed=0, size=64):
    """torchvision's own model, random weights, non-trivial BatchNorm statistics, eval mode."""
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


def test_unsupported_torchvision_arch_is_named():
    names = ["conv1.weight", "fc.weight"] + [
        f"layer{i}.{j}.conv3.weight" for i, n in enumerate((3, 4, 23, 3), 1) for j in range(n)
    ]
    state_dict = {k: np.zeros((1, 1, 1, 1), np.float32) for k in names}
    assert port.guess_arch(state_dict) == "resnet101"
    with pytest.raises(port.PortError, match="look like a resnet101.*can port"):
        port.from_torchvision(state_dict, "resnet50")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        port.load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(port.PortError, match=r"\.safetensors"):
        port.load_state_dict(tmp_path / "weights.npz")


def test_safetensors_needs_no_torch_and_pth_asks_for_the_port_extra(
    resnet18_state, tmp_path, monkeypatch
):
    from safetensors.numpy import save_file

    st = tmp_path / "t.safetensors"
    save_file(resnet18_state, str(st))
    (tmp_path / "t.pth").write_bytes(b"not read")
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

    code = script.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert code == 1
    assert "untrusted pickle" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    # The file really is malicious: plain unpickling runs the payload.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)  # demonstrating the attack
    assert marker.read_text() == "pwned"


def test_script_writes_a_loadable_checkpoint_with_its_meta(models, tmp_path, capsys):
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
    assert script.main(argv) == 0  # --arch read off the layout
    assert "resnet18 with 10 classes" in capsys.readouterr().out

    model, variables, meta = load_model(out)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == NUM_CLASSES
    assert meta["width"] == 64 and meta["stem"] == "imagenet" and meta["channels"] == 3
    assert meta["image_size"] == 64 and meta["source"] == "torchvision"
    assert meta["class_names"] == [f"digit{i}" for i in range(NUM_CLASSES)]
    assert meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    _, expected = port.from_torchvision(numpy_state_dict(model_t), "resnet18")
    jax.tree.map(np.testing.assert_array_equal, dict(variables), expected)

    # An existing output is not overwritten without --overwrite; a wrong --arch is explained.
    assert script.main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert script.main([*argv, "--overwrite", "--arch", "resnet34"]) == 1
    assert "look like a resnet18" in capsys.readouterr().err
    names.write_text("a\nb\n")
    assert script.main([*argv, "--overwrite"]) == 1
    assert "lists 2 names" in capsys.readouterr().err


@pytest.mark.slow
def test_ported_teachers_are_amalgamated_end_to_end(tmp_path):
    """Two torchvision teachers (digits 0-4 and 5-9) ported with the script and named in a
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
        assert script.main([*argv, "--image-size", "16"]) == 0
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
    assert [r["method"] for r in rows] == ["teacher:task0", "teacher:task1", "ensemble", "kd"]
    assert 0 <= rows[-1]["merged_acc"] <= 100
    assert rows[0]["params"] == sum(p.numel() for p in teachers_t[0].parameters())

    # The teacher rows score what the torchvision models score on the same test images.
    taskset, dataset = experiment.prepare_data(cfg)
    x = np.asarray(experiment.make_preprocess(cfg.augment)(dataset.test.images))
    labels = np.asarray(dataset.test.labels)
    for t, model_t in enumerate(teachers_t):
        with torch.no_grad():
            logits = model_t(torch.from_numpy(x.copy()).permute(0, 3, 1, 2)).numpy()
        sl = taskset.slices[t]
        in_task = (labels >= sl.start) & (labels < sl.stop)
        acc = np.mean(np.argmax(logits[in_task], -1) + sl.start == labels[in_task]) * 100
        assert rows[t]["task_acc"][taskset.names[t]] == pytest.approx(acc)
