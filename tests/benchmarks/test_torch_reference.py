"""The PyTorch reference step (scripts/torch_reference.py) computes what the JAX step computes.

* its loss functions equal ``cka_jax.methods.losses`` (values and gradients) on the same inputs;
* its CFL heads have the same parameter shapes as the Flax ``AmalgamationHeads``;
* one ``step()`` returns the loss the JAX loss terms give on the same model outputs, trains
  the student and heads and leaves the teachers (parameters and BatchNorm statistics) alone.

Skipped without torch/torchvision. Tiny shapes, one CPU thread: a few seconds.
"""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from benchmarks import torch_reference as ref  # noqa: E402
from cka_jax.methods import losses  # noqa: E402
from cka_jax.models import AmalgamationHeads  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6

# Jitted: one compile per shape costs far less than eager op-by-op dispatch on a small CPU.
jax_mmd = jax.jit(losses.mmd, static_argnames=("normalize",))
jax_soft_target_kl = jax.jit(losses.soft_target_kl, static_argnames=("temperature",))
jax_reconstruction_loss = jax.jit(losses.reconstruction_loss)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def assert_close_to_scale(actual, expected, rel):
    """Max abs difference within ``rel`` times the largest entry of ``expected``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"max abs diff {err} vs scale {scale}"


def _nchw(nhwc):
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))


def _torch_value_and_grads(fn, *arrays):
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    value = fn(*tensors)
    value.backward()
    return value.detach().numpy(), [t.grad.numpy() for t in tensors]


def _close_pairs(seed, n, m, shape):
    """x (n, *shape), y (m, *shape) with y's rows 1% perturbations of x's rows and y[0] == x[0]
    exactly: small distances, so every kernel width (sigma down to 0.01) contributes, and a
    zero distance exercises the exact-zero path."""
    x = _rand(seed, (n, *shape))
    y = x[np.arange(m) % n] + _rand(seed + 1, (m, *shape), 0.01)
    y[0] = x[0]
    return x, y


# ----------------------------------------------------------------- losses vs cka_jax.methods.losses


@pytest.mark.parametrize("normalize", [True, False])
def test_mmd_matches_jax_on_rows(normalize):
    x, y = _close_pairs(0, 5, 4, (6,))
    if not normalize:  # unnormalised rows must be small for the kernels to see them
        x, y = 0.05 * x, 0.05 * y
    expected, expected_grads = jax.jit(
        jax.value_and_grad(lambda a, b: losses.mmd(a, b, normalize=normalize), argnums=(0, 1))
    )(x, y)
    value, grads = _torch_value_and_grads(lambda a, b: ref.mmd(a, b, normalize=normalize), x, y)
    assert float(expected) > 1e-3  # the sets differ: not a trivial 0 == 0
    np.testing.assert_allclose(value, expected, rtol=RTOL, atol=ATOL)
    for g, eg in zip(grads, expected_grads, strict=True):
        # JAX's analytic gradient uses matrix products (sum_j g_ij a_i - g @ b), which cancel
        # in float32 up to ~2e-5 of the largest entry here; torch's cdist backward does not.
        assert_close_to_scale(g, eg, 1e-4)


def test_mmd_matches_jax_on_feature_maps_flattened_in_nhwc_order():
    x, y = _close_pairs(2, 4, 3, (2, 3, 5))  # NHWC, as the JAX heads' common features
    expected = jax_mmd(x, y)
    value = ref.mmd(torch.tensor(_nchw(x)), torch.tensor(_nchw(y)))
    np.testing.assert_allclose(value.numpy(), expected, rtol=RTOL, atol=ATOL)
    # channels_last tensors (the step's layout) give the same value
    cl = [torch.tensor(_nchw(a)).contiguous(memory_format=torch.channels_last) for a in (x, y)]
    np.testing.assert_allclose(ref.mmd(*cl).numpy(), expected, rtol=RTOL, atol=ATOL)


def test_mmd_of_a_set_with_itself_is_exactly_zero_with_zero_gradient():
    x = _rand(3, (4, 8))
    value, grads = _torch_value_and_grads(lambda a: ref.mmd(a, a), x)
    assert value == 0.0
    assert np.all(np.isfinite(grads[0]))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_kl_matches_jax(temperature):
    s, t = _rand(4, (5, 7), 3.0), _rand(5, (5, 7), 3.0)
    expected, expected_grad = jax.jit(
        jax.value_and_grad(lambda a: losses.soft_target_kl(a, t, temperature=temperature))
    )(s)
    value, grads = _torch_value_and_grads(
        lambda a: ref.soft_target_kl(a, torch.tensor(t), temperature), s
    )
    assert float(expected) > 1e-2
    np.testing.assert_allclose(value, expected, rtol=RTOL, atol=ATOL)
    assert_close_to_scale(grads[0], expected_grad, 1e-5)


def test_reconstruction_loss_matches_jax():
    r, t = _rand(6, (3, 2, 2, 5)), _rand(7, (3, 2, 2, 5))
    expected = jax_reconstruction_loss(r, t)
    value = ref.reconstruction_loss(torch.tensor(_nchw(r)), torch.tensor(_nchw(t)))
    np.testing.assert_allclose(value.numpy(), expected, rtol=RTOL, atol=ATOL)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="logits differ"):
        ref.soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rows differ"):
        ref.mmd(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        ref.reconstruction_loss(torch.zeros(2, 3), torch.zeros(3, 2))


# ----------------------------------------------------------------- heads vs the Flax heads


def test_cfl_heads_have_the_flax_heads_parameter_shapes():
    student_channels, teacher_channels = 512, (512, 2048)
    flax_heads = AmalgamationHeads(
        teacher_channels=teacher_channels, common_space="cfl", reconstruction=True
    )
    student = jax.ShapeDtypeStruct((2, 1, 1, student_channels), jnp.float32)
    teachers = [jax.ShapeDtypeStruct((2, 1, 1, c), jnp.float32) for c in teacher_channels]
    flax_params = jax.eval_shape(flax_heads.init, jax.random.key(0), student, teachers)["params"]
    flax_shapes = sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(flax_params))

    torch_heads = ref.CFLHeads(student_channels, teacher_channels)
    # conv weights OIHW -> Flax's HWIO; biases as they are
    torch_shapes = sorted(
        tuple(p.permute(2, 3, 1, 0).shape) if p.ndim == 4 else tuple(p.shape)
        for p in torch_heads.parameters()
    )
    assert torch_shapes == flax_shapes
    assert sum(p.numel() for p in torch_heads.parameters()) == sum(
        int(np.prod(s)) for s in flax_shapes
    )


def test_cfl_heads_output_shapes():
    heads = ref.CFLHeads(8, (8, 16), adapt_dim=6, common_dim=4)
    out = heads(torch.randn(2, 8, 3, 3), [torch.randn(2, 8, 3, 3), torch.randn(2, 16, 3, 3)])
    assert out["student_common"].shape == (2, 4, 3, 3)
    assert [c.shape for c in out["teacher_common"]] == [(2, 4, 3, 3)] * 2
    assert [r.shape for r in out["reconstruction"]] == [(2, 8, 3, 3), (2, 16, 3, 3)]
    assert torch.all(out["student_common"] >= 0)  # ReLU after the residual sum


# ----------------------------------------------------------------- one train step


def _nhwc_numpy(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def _expected_loss_from_jax(step_obj, images):
    """The step's loss recomputed from copies of its models, with the JAX loss terms and the
    JAX method's weights (kd + w * (sum_t mmd + sum_t recon))."""
    student = copy.deepcopy(step_obj.student).train()
    heads = copy.deepcopy(step_obj.heads)
    with torch.no_grad():
        teacher_out = [t(images) for t in step_obj.teachers]
        logits, features = student(images)
        teacher_logits = np.concatenate([o[0].numpy() for o in teacher_out], axis=-1)
        total = jax_soft_target_kl(logits.numpy(), teacher_logits)
        if heads is not None:
            out = heads(features, [o[1] for o in teacher_out])
            student_common = _nhwc_numpy(out["student_common"])
            align = sum(jax_mmd(student_common, _nhwc_numpy(c)) for c in out["teacher_common"])
            recon = sum(
                jax_reconstruction_loss(_nhwc_numpy(r), _nhwc_numpy(t))
                for r, t in zip(out["reconstruction"], out["reconstruction_target"], strict=True)
            )
            assert float(align) > 0 and float(recon) > 0
            total = total + 10.0 * (align + recon)
    return float(total)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["kd", "cfl"])
def test_one_step_trains_the_student_and_leaves_the_teachers_alone(method):
    step_obj = ref.TorchAmalgamationStep(
        method, ["resnet18", "resnet50"], "resnet18", classes_per_teacher=3
    )
    assert [t.feature_channels for t in step_obj.teachers] == [512, 2048]
    assert step_obj.student.resnet.fc.out_features == 6
    assert (step_obj.heads is None) == (method == "kd")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _expected_loss_from_jax(step_obj, images)
    teachers_before = [_snapshot(t) for t in step_obj.teachers]
    student_before = _snapshot(step_obj.student)
    heads_before = _snapshot(step_obj.heads) if step_obj.heads is not None else {}

    loss = step_obj.step(images)

    assert loss.shape == () and not loss.requires_grad
    assert np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), expected, rtol=RTOL)
    for teacher, before in zip(step_obj.teachers, teachers_before, strict=True):
        assert not teacher.training
        for name, value in teacher.state_dict().items():  # parameters and BN statistics
            assert torch.equal(value, before[name]), name
        assert all(p.grad is None for p in teacher.parameters())
    student_after = step_obj.student.state_dict()
    for name, value in student_before.items():
        if name.endswith("num_batches_tracked"):
            assert student_after[name] == value + 1, name
        else:  # parameters (Adam) and BN running statistics (train mode) all move
            assert not torch.equal(student_after[name], value), name
    trainable = list(step_obj.student.parameters())
    if step_obj.heads is not None:
        for name, value in step_obj.heads.state_dict().items():
            assert not torch.equal(value, heads_before[name]), name
        trainable += list(step_obj.heads.parameters())
    # every trainable tensor got a finite, non-zero loss gradient (not just weight decay)
    for p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad.abs().sum() > 0 for p in trainable)


def test_step_uses_channels_last_and_the_method_weights():
    step_obj = ref.TorchAmalgamationStep("cfl", ["resnet10"], "resnet10", 2, cfl_weight=3.0)
    assert step_obj.weights == {"kd": 1.0, "align": 3.0, "recon": 3.0}
    conv = step_obj.student.resnet.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    total, terms = step_obj.loss_terms(torch.randn(2, 3, 32, 32))
    expected = terms["kd"] + 3.0 * (terms["align"] + terms["recon"])
    torch.testing.assert_close(total, expected)
    with pytest.raises(ValueError, match="unknown method"):
        ref.TorchAmalgamationStep("cka", ["resnet10"], "resnet10", 2)


@pytest.mark.parametrize("stem, side", [("imagenet", 1), ("small", 4)])
def test_resnet_returns_logits_and_the_layer4_map(stem, side):
    model = ref.make_resnet("resnet10", 5, stem=stem).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    assert features.shape == (2, 512, side, side)
    np.testing.assert_allclose(
        logits.numpy(), model.resnet.fc(features.mean(dim=(2, 3))).detach().numpy(), rtol=1e-5
    )


def test_main_prints_a_benchmark_json(capsys):
    argv = "--method kd --batch_size 2 --teacher_archs resnet10 resnet10 --student_arch resnet10"
    result = ref.main([*argv.split(), "--warmup", "1", "--repeats", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    assert result["step_seconds_median"] > 0
    assert result["images_per_second"] == pytest.approx(2 / result["step_seconds_median"])
    assert result["num_threads"] == torch.get_num_threads()
    assert result["torch_version"] == torch.__version__
    assert np.isfinite(result["final_loss"])


def test_step_benchmark_interleaves_the_torch_step(monkeypatch):
    """`scripts/benchmark.py --compare_torch` times PyTorch's steps between JAX's, one each
    per round, and reports the ratio of the two medians."""
    from benchmarks import step_benchmark

    order = []
    jax_time_one, torch_time_one = step_benchmark.StepTimer.time_one, ref.StepTimer.time_one
    monkeypatch.setattr(
        step_benchmark.StepTimer, "time_one", lambda s: order.append("jax") or jax_time_one(s)
    )
    monkeypatch.setattr(
        ref.StepTimer, "time_one", lambda s: order.append("torch") or torch_time_one(s)
    )
    tiny = (
        "--teacher=resnet10 --student=resnet10 --teachers=1 --image_size=16 --classes_per_teacher=2"
    )
    result = step_benchmark.main(
        [*tiny.split(), "--method=kd", "--batch_size=2", "--steps=3", "--compare_torch"]
    )
    # StepTimer's two warm-up steps, then the three timed rounds alternate.
    assert order == ["jax", "jax"] + ["jax", "torch"] * 3
    assert result["torch"]["repeats"] == 3 and result["torch"]["step_seconds_median"] > 0
    assert result["jax_over_torch_time"] == pytest.approx(
        result["step_s_median"] / result["torch"]["step_seconds_median"]
    )
