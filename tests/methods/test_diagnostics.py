"""The per-term diagnostics: transport-map peakedness and gradient shares, on inputs whose
answer is known, and the diagnostic step against the train step it decomposes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax.methods import Method, diagnostics, losses
from cka_jax.train import step as step_module
from cka_jax.train.runtime import Runner
from tests.train.test_step_parallel import build

B = 6


def test_uniform_rows_have_peakedness_one():
    # Identical samples: every distance is 0, so each row is uniform over the other B - 1.
    pi = np.asarray(jax.jit(losses.transport_map)(np.ones((B, 4), np.float32)))
    stats = jax.device_get(diagnostics.transport_peakedness(pi))
    np.testing.assert_allclose(stats["peak"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats["entropy"], 1.0, rtol=1e-6)


def test_one_hot_rows_have_peakedness_b_minus_one():
    pi = np.roll(np.eye(B, dtype=np.float32), 1, axis=1)  # each row on its next sample
    stats = jax.device_get(diagnostics.transport_peakedness(pi))
    np.testing.assert_allclose(stats["peak"], B - 1, rtol=1e-6)
    assert stats["entropy"] == 0.0


def test_half_mass_rows():
    # Two neighbours at 1/2 each: peak (B-1)/2, entropy log 2 / log(B-1).
    pi = (np.roll(np.eye(B), 1, axis=1) + np.roll(np.eye(B), 2, axis=1)) / 2
    stats = jax.device_get(diagnostics.transport_peakedness(pi))
    np.testing.assert_allclose(stats["peak"], (B - 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(stats["entropy"], np.log(2) / np.log(B - 1), rtol=1e-6)


def test_shares_sum_to_one_and_zero_norms_give_zero_shares():
    shares = jax.device_get(diagnostics.gradient_shares({"a": 3.0, "b": 1.0, "c": 0.0}))
    assert shares == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0})
    zero = jax.device_get(diagnostics.gradient_shares({"a": 0.0, "b": 0.0}))
    assert zero == {"a": 0.0, "b": 0.0}


def test_median_shares_over_logged_steps():
    records = [{"grad_share/a": v, "grad_share/b": 1 - v, "grad/a": 9.0} for v in (0.1, 0.5, 0.2)]
    assert diagnostics.median_shares(records) == {"a": 0.2, "b": 0.8}


def _diagnose(spec, state, teacher_vars, batch, parallelism="single"):
    runner = Runner(spec, parallelism)
    state = runner.put_state(state)
    out = runner.diagnose(state, runner.put_replicated(teacher_vars), runner.put_batch(batch))
    return {k: float(v) for k, v in jax.device_get(out).items()}, runner, state


def test_single_term_norm_is_the_steps_gradient_norm():
    # kd's only parameters are the student's: its term's gradient is the whole gradient.
    spec, state, teacher_vars, batch = build("kd")
    diag, runner, placed = _diagnose(spec, state, teacher_vars, batch)
    _, metrics = runner.step(placed, runner.put_replicated(teacher_vars), runner.put_batch(batch))
    assert diag["grad_share/kd"] == 1.0
    np.testing.assert_allclose(diag["grad/kd"], float(metrics["grad_norm"]), rtol=1e-5)


def test_zero_weight_term_has_zero_share():
    spec, state, teacher_vars, batch = build("kd")
    # 'ce' in the sum with weight 0: computed, but it moves nothing.
    method = Method("kd_ce0", (("kd", 1.0), ("ce", 0.0)), frozenset({"teachers", "labels"}))
    spec = spec.__class__(**{**spec.__dict__, "method": method})
    diag, *_ = _diagnose(spec, state, teacher_vars, batch)
    assert diag["grad_share/ce"] == 0.0 and diag["grad/ce"] == 0.0
    assert diag["grad_share/kd"] == 1.0


@pytest.mark.parametrize("parallelism", ["single", "mesh", "pmap"])
def test_cka_diagnostics(parallelism):
    spec, state, teacher_vars, batch = build("cka")
    diag, *_ = _diagnose(spec, state, teacher_vars, batch, parallelism)
    shares = {k[11:]: v for k, v in diag.items() if k.startswith("grad_share/")}
    assert set(shares) == set(spec.method.weights)
    np.testing.assert_allclose(sum(shares.values()), 1.0, rtol=1e-5)
    # The reconstruction guard trains the teacher-side heads only: no gradient on the student.
    assert shares["recon"] == 0.0
    assert all(shares[t] > 0 for t in ("intra", "inter", "align", "std"))
    for model in ("student", "teacher0", "teacher1"):
        assert 1.0 <= diag[f"inter/{model}_peak"] <= B + 2 - 1
        assert 0.0 <= diag[f"inter/{model}_entropy"] <= 1.0 + 1e-6
    if parallelism != "single":
        ref, *_ = _diagnose(spec, state, teacher_vars, batch, "single")
        for key, value in ref.items():
            np.testing.assert_allclose(diag[key], value, rtol=2e-3, atol=1e-6, err_msg=key)


def test_per_term_gradients_sum_to_the_step_gradient():
    """The decomposition is exact: sum_k w_k grad(term_k) is the gradient the step applies
    to the student network."""
    spec, state, teacher_vars, batch = build("cka")
    batch = jax.tree.map(jnp.asarray, batch)

    def total(student_params):
        params = {**state.params, "student": student_params}
        return step_module.loss_fn(params, state, teacher_vars, batch, spec)[0]

    whole = jax.jit(jax.grad(total))(state.params["student"])
    grads, _ = jax.jit(lambda s: step_module.term_gradients(s, teacher_vars, batch, spec))(state)
    summed = jax.tree.map(lambda *g: sum(g), *grads.values())
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
        summed,
        whole,
    )
