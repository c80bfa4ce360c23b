"""MCL-OKD inside the one train step: the memory bank is updated in the step from the
peers' embeddings of the batch, the step's loss is Eq. 12, and a run resumes from a
checkpoint with its memory bank (bit-identical to an uninterrupted run)."""

import functools

import jax
import numpy as np

from cka_jax.train import step as train_step
from cka_jax.train.runtime import Runner
from tests.methods.test_okd import mcl_okd_loss
from tests.train.test_step_parallel import BATCH, NUM_DATA, build


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_step_updates_the_bank_rows_of_its_batch_and_its_loss_is_eq_12():
    spec, state, _, batch = build("mcl_okd")
    runner = Runner(spec, "single")
    new_state, metrics = runner.step(runner.put_state(state), [], runner.put_batch(batch))
    new_state = runner.get_state(new_state)

    # The peers' embeddings of the step's view, recomputed outside the step.
    keys = train_step.sample_keys(state.rng, state.step, batch["index"], 1)
    view = spec.augment(keys, batch["image"])
    variables = {"params": state.params["student"], "batch_stats": state.batch_stats}
    apply = jax.jit(functools.partial(spec.student.apply, train=True, mutable=["batch_stats"]))
    (logits, embeddings), _ = apply(variables, view)
    memory = np.float64(state.memory)
    want = memory.copy()
    for v in range(memory.shape[0]):
        for k, i in enumerate(batch["index"]):
            mixed = 0.5 * memory[v, i] + 0.5 * unit(np.float64(embeddings[v, k]))
            want[v, i] = unit(mixed)
    np.testing.assert_allclose(new_state.memory, want, rtol=1e-4, atol=1e-5)

    negatives = train_step.negatives(state, BATCH, spec)
    assert negatives.shape == (3, 3, 16)  # (M, M, S) with S = nce_negatives = 16 <= N
    assert NUM_DATA == state.memory.shape[1]
    total, terms = mcl_okd_loss(
        logits, batch["label"], embeddings, state.memory, batch["index"], negatives
    )
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss/contrast"], terms["contrast"], rtol=1e-4)
    # The next step draws other negatives.
    later = train_step.negatives(new_state, BATCH, spec)
    assert not np.array_equal(np.asarray(later), np.asarray(negatives))
