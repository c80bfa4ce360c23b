"""The training loop on a tiny step, in this process: its options come from the config,
it evaluates and checkpoints on its cadence, logs its metrics, and resumes where it
stopped."""

import json

from cka_jax.config import base_config
from cka_jax.train.loop import FitOptions, MetricsLog, fit
from tests.stages.test_selection import tiny_split
from tests.train.test_step_parallel import BATCH, build


def test_options_come_from_the_config():
    cfg = base_config()
    cfg.update(parallelism="single", batch_size=8, log_every=3, eval_every=2, diagnostics=False)
    options = FitOptions.from_config(cfg)
    assert options == FitOptions(
        parallelism="single",
        batch_size=8,
        log_every=3,
        eval_every=2,
        checkpoint_every=0,
        keep_checkpoints=3,
        diagnostics=False,
    )


def run(tmp_path, epochs, evaluated):
    spec, state, teacher_vars, _ = build("kd")
    return fit(
        name="t",
        spec=spec,
        options=FitOptions(parallelism="single", batch_size=BATCH, log_every=3, eval_every=2),
        student_variables={"params": state.params["student"], "batch_stats": state.batch_stats},
        teacher_variables=teacher_vars,
        split=tiny_split(3 * BATCH),  # 3 steps per epoch
        epochs=epochs,
        seed=0,
        run_dir=tmp_path,
        evaluate=lambda v: evaluated.append(1) or {"merged_acc": 50.0},
    )


def test_cadence_of_evaluation_checkpoints_and_logs_and_resume(tmp_path):
    evaluated = []
    result = run(tmp_path, 3, evaluated)
    # eval_every=2 over 3 epochs: epoch 2 and the last.
    assert [h["epoch"] for h in result.history] == [2, 3] and len(evaluated) == 2
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6, 9]  # each epoch end (checkpoint_every=0)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == list(range(1, 10))
    assert [m["step"] for m in logged if "eval/merged_acc" in m] == [6, 9]
    # Asked for more epochs, it resumes at step 9 and trains only what is new.
    more = []
    longer = run(tmp_path, 5, more)
    assert [h["epoch"] for h in longer.history] == [2, 3, 4, 5] and len(more) == 2
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == list(range(1, 16))


def test_resumed_metrics_keep_the_steps_up_to_the_checkpoint_and_drop_a_torn_line(tmp_path):
    """A process killed mid-write leaves a torn last line; the resumed log starts after the
    checkpoint's step as if the later steps had never been written."""
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 6, "lo')
    log = MetricsLog(tmp_path, resume_step=3)
    log.write(4, {"loss": 0.5})
    log.close()
    got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == [*rows[:3], {"step": 4, "loss": 0.5}]
