"""The compiled-step cache (equal specs share one step) and the bfloat16 compute mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cka_jax import methods
from cka_jax.config import resolve_method
from cka_jax.models import AmalgamationHeads, ResNet, create_model, init_variables
from cka_jax.models.resnet import BasicBlock
from cka_jax.train.runtime import Runner
from cka_jax.train.spec import step_spec
from cka_jax.train.step import StepSpec, build_heads, create_train_state
from tests import tiny_config
from tests.train.test_step_parallel import BATCH, SHAPE, loss_config, noisy_views


def spec_from_config(cfg, method_name="cka"):
    base, loss_cfg, student_cfg = resolve_method(cfg, method_name)
    method = methods.build_method(base, loss_cfg)
    student = create_model(student_cfg.arch, 10, stem=student_cfg.stem, width=student_cfg.width)
    teachers = tuple(create_model("resnet10", 5, stem="small", width=4) for _ in range(2))
    return step_spec(cfg, method, loss_cfg, student, teachers, cfg.optimizer, 100)


def test_equal_specs_share_one_compiled_step_and_different_ones_do_not():
    cfg = tiny_config.get_config()
    first, second = spec_from_config(cfg), spec_from_config(cfg)
    assert first == second and first is not second
    assert Runner(first, "mesh")._step is Runner(second, "mesh")._step
    assert Runner(first, "mesh")._step is not Runner(first, "single")._step
    cfg.loss.margin = 0.5
    assert Runner(spec_from_config(cfg), "mesh")._step is not Runner(first, "mesh")._step
    cfg = tiny_config.get_config()
    cfg.augment.crop_scale = (0.5, 1.0)
    assert Runner(spec_from_config(cfg), "mesh")._step is not Runner(first, "mesh")._step


def one_step(dtype):
    def resnet(num_classes, width):
        return ResNet(
            stage_sizes=(1, 1),
            block=BasicBlock,
            num_classes=num_classes,
            width=width,
            stem="small",
            dtype=dtype,
        )

    loss_cfg = loss_config()
    method = methods.build_method("kd", loss_cfg)  # the heads' dtype is checked below
    teachers = (resnet(3, 4), resnet(2, 8))
    student = resnet(5, 4)
    init = lambda m, seed: init_variables(m, seed, (1, *SHAPE))  # noqa: E731
    teacher_vars = [init(t, 10 + i) for i, t in enumerate(teachers)]
    spec = StepSpec(
        student=student,
        teachers=teachers,
        heads=build_heads(method, teachers, dtype=dtype),
        method=method,
        loss_cfg=loss_cfg,
        augment=noisy_views,
        view_shape=SHAPE,
        tx=optax.adam(1e-3),
    )
    state = create_train_state(spec, init(student, 0), teacher_vars, jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8),
        "index": np.arange(BATCH, dtype=np.int32),
    }
    runner = Runner(spec, "single")
    state, metrics = runner.step(runner.put_state(state), teacher_vars, runner.put_batch(batch))
    # The convolutions run in `dtype`; the model hands back float32 logits and features.
    forward = jax.make_jaxpr(student.apply)(init(student, 0), jnp.zeros((2, *SHAPE)))
    return runner.get_state(state), jax.device_get(metrics), "bf16[" in str(forward)


def test_bfloat16_computes_in_bfloat16_but_keeps_float32_parameters_and_losses():
    state32, metrics32, bf16_in_32 = one_step(jnp.float32)
    state16, metrics16, bf16_in_16 = one_step(jnp.bfloat16)
    assert (bf16_in_32, bf16_in_16) == (False, True)
    leaves = jax.tree.leaves((state16.params, state16.batch_stats, state16.opt_state))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)
    assert all(np.asarray(v).dtype == np.float32 for v in metrics16.values())
    for key, value in metrics32.items():
        np.testing.assert_allclose(metrics16[key], value, rtol=0.05, atol=2e-3, err_msg=key)


def test_bfloat16_heads_compute_in_bfloat16_and_keep_float32_parameters():
    for common_space in ("cka", "cfl"):
        heads = AmalgamationHeads(
            teacher_channels=(8, 16),
            common_space=common_space,
            projection=True,
            reconstruction=True,
            dtype=jnp.bfloat16,
        )
        features = (jnp.zeros((4, 2, 2, 8)), [jnp.zeros((4, 2, 2, 8)), jnp.zeros((4, 2, 2, 16))])
        params = jax.eval_shape(heads.init, jax.random.key(0), *features)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
        forward = str(jax.make_jaxpr(heads.apply)(params, *features))
        assert "bf16[4,2,2,256]" in forward or "bf16[4,256]" in forward, common_space
