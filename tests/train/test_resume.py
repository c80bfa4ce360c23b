"""A loss that becomes NaN stops the run with the last good checkpoint kept. (Real processes
stopped, killed and rerun to the same result: test_preemption.py.)"""

import jax
import numpy as np
import pytest

from cka_jax.infra.checkpoint import RunCheckpoints
from cka_jax.stages import experiment
from cka_jax.train.loop import NonFiniteLossError
from tests import tiny_config


def test_nan_loss_stops_with_term_and_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config.get_config()
    cfg.teacher_epochs = 1
    cfg.epochs = 2
    cfg.checkpoint_every = 1
    cfg.optimizer.learning_rate = 1e30  # parameters overflow after the first update
    cfg.log_every = 1
    with pytest.raises(NonFiniteLossError, match=r"loss term '.+' became (nan|inf) at step \d+"):
        experiment.run(cfg, tmp_path)
    ckpts = RunCheckpoints(tmp_path / "runs" / "kd" / "seed_0" / "checkpoints")
    try:
        steps = ckpts.manager.all_steps()
        assert steps, "the last good checkpoint was kept"
        restored = ckpts.manager.restore(max(steps))
    finally:
        ckpts.close()
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
