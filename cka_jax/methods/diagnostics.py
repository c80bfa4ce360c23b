"""What shows that a loss term does something: its share of the gradient that reaches the
student network, and, for CKA's inter-model term, how peaked its transport maps are.

A term that is in the sum but moves nothing is a bug even when it matches its formula; the
training loop logs these numbers beside the loss values (`config.diagnostics`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def transport_peakedness(pi) -> dict[str, jax.Array]:
    r"""How far the rows of a transport map (B, B) are from uniform.

    * ``peak`` = mean_i max_j pi_ij * (B - 1): 1 for uniform rows (over the B - 1 other
      samples), B - 1 for one-hot rows;
    * ``entropy`` = mean_i H(pi_i) / log(B - 1): 1 for uniform rows, 0 for one-hot rows
      (0 log 0 = 0, so the excluded diagonal counts for nothing).
    """
    pi = jnp.asarray(pi, jnp.float32)
    b = pi.shape[0]
    if b < 3:
        raise ValueError("peakedness needs a batch of at least 3 samples (B - 1 >= 2)")
    peak = jnp.mean(jnp.max(pi, axis=-1)) * (b - 1)
    plogp = jnp.where(pi > 0, pi * jnp.log(jnp.where(pi > 0, pi, 1.0)), 0.0)
    entropy = jnp.mean(-jnp.sum(plogp, axis=-1)) / np.log(b - 1)
    return {"peak": peak, "entropy": entropy}


def tree_norm(tree) -> jax.Array:
    """The L2 norm of all leaves of a pytree together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def gradient_shares(norms: dict[str, float]) -> dict[str, float]:
    """Each term's share ``n_k / sum_j n_j`` of the summed gradient norms (0 for every term
    when all norms are 0). Works on numbers or jnp scalars."""
    total = sum(norms.values())
    safe = jnp.maximum(total, 1e-30)
    return {k: jnp.where(total > 0, v / safe, 0.0) for k, v in norms.items()}


def median_shares(records: list[dict]) -> dict[str, float]:
    """Per term, the median of its gradient share over the logged steps of a run.

    ``records`` are the per-step diagnostics dicts (keys ``grad_share/<term>``)."""
    terms = sorted({k for r in records for k in r if k.startswith("grad_share/")})
    return {
        t.removeprefix("grad_share/"): round(float(np.median([r[t] for r in records if t in r])), 4)
        for t in terms
    }
