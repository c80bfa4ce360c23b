"""MCL-OKD inside the one train step: the memory bank is updated in the step from the
peers' embeddings of the batch, the step's loss is Eq. 12, and a run resumes from a
checkpoint with its memory bank (bit-identical to an uninterrupted run)."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest

from cka_jax import checkpoint, evaluate, experiment, okd
from cka_jax.models import ResNet
from cka_jax.train import step as train_step
from cka_jax.train.runtime import Runner
from cka_jax.train.students import PLAIN
from tests.main_process import final_state
from tests.test_okd import mcl_okd_loss
from tests.test_step_parallel import BATCH, NUM_DATA, build


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


@pytest.mark.slow
def test_mcl_okd_run_resumes_from_its_checkpoint_with_the_memory_bank(all_methods_run, tmp_path):
    cfg, reference, _ = all_methods_run  # 2 branch-based peers, 20 steps, checkpoints every 2
    run = "runs/mcl_okd/seed_0"
    step, ref_state = final_state(reference / run)
    assert step == 20
    ref_rows = json.loads((reference / "results.json").read_text())["rows"]
    # What is kept is the leader alone, as a plain ResNet scoring the reported accuracy.
    model, leader, _ = checkpoint.load_model(reference / run / "selected")
    taskset, dataset = experiment.prepare_data(cfg)
    scorer = evaluate.Scorer(model, cfg.augment, 64, PLAIN.eval_logits)
    scores = scorer.logits(leader, dataset.test)
    row = next(r for r in ref_rows if r["method"] == "mcl_okd")
    kept = evaluate.accuracies(scores, dataset.test.labels, taskset)["merged_acc"]
    assert isinstance(model, ResNet) and kept == row["merged_acc"]  # the final leader
    assert row["selection"] == {
        "criterion": "final",
        "epoch": cfg.epochs,
        "score": None,
        "merged_acc": row["merged_acc"],
    }
    evals = [json.loads(line) for line in (reference / run / "metrics.jsonl").open()]
    last = [m for m in evals if "eval/merged_acc" in m][-1]
    ensemble_acc = next(r for r in ref_rows if r["method"] == "mcl_okd:ensemble")["merged_acc"]
    assert last["eval/ensemble/merged_acc"] == ensemble_acc  # logged beside the leader's
    student_params = sum(np.size(x) for x in jax.tree.leaves(leader["params"]))
    ensemble = next(r for r in ref_rows if r["method"] == "mcl_okd:ensemble")
    assert row["params"] == student_params < ensemble["params"] < 2 * student_params  # 1 trunk

    # The same run stopped after its checkpoint at step 16: later ones and the result gone.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for later in ("18", "20"):
        shutil.rmtree(resumed / run / "checkpoints" / later)
    (resumed / run / "result.json").unlink()
    step, at_16 = final_state(resumed / run)
    assert step == 16 and at_16["memory"].shape == (2, 200, 128)
    fresh = okd.init_memory_bank(jax.random.fold_in(jax.random.key(0), 3), 2, 200, 128)
    assert not np.allclose(at_16["memory"], fresh), "the checkpoint holds the trained bank"

    experiment.run(cfg, resumed)  # every other run is done: only mcl_okd resumes
    step, got_state = final_state(resumed / run)
    assert step == 20
    jax.tree.map(np.testing.assert_array_equal, ref_state, got_state)
    got_rows = json.loads((resumed / "results.json").read_text())["rows"]
    for ref, got in zip(ref_rows, got_rows, strict=True):
        ref.pop("wall_s", None), got.pop("wall_s", None)
        assert ref == got
