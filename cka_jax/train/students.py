"""The student kinds: one network, or MCL-OKD's peer networks (`cka_jax.models.PeerNetworks`).

Everything that differs between the two lives here, behind one interface: how the student
is built, what its outputs mean to the loss terms, the batch axis of those outputs, its
BatchNorm under pmap, the extra train state (the memory bank), what is deployed, and how it
is scored and reported. The step, the loop and the experiment ask the kind of their method
(`student_kind`) and never look at the model's type.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cka_jax.evaluation import evaluate
from cka_jax.methods import okd
from cka_jax.models import PeerNetworks, create_model
from cka_jax.models.build import init_model, init_variables_of, param_count


class PlainStudent:
    """A single network: its logits and last feature map are the terms' 'logits' and
    'features'; it is what is deployed and scored."""

    name = "plain"

    def build(self, student_cfg, peers_cfg, num_classes, seed, view_shape, dtype):
        """``(model, variables)``: a fresh student, or one starting from its checkpoint."""
        return init_model(student_cfg, num_classes, seed, view_shape, "student", dtype)

    def outputs(self, logits, features, batch, b: int) -> dict:
        """The terms' view of the student's outputs on a batch of ``b`` images (the first b
        rows are view 1; more rows, if any, view 2)."""
        return {"logits": logits[:b], "features": features[:b], "labels": batch.get("label")}

    def batch_axis(self, key: str) -> int:
        return 0

    def with_bn_axis(self, model, axis_name):
        """``model`` with BatchNorm statistics averaged over ``axis_name`` (pmap)."""
        return model.clone(bn_axis_name=axis_name)

    def init_memory(self, model, num_data: int, rng):
        return {}

    def deploy(self, model, variables) -> dict:
        """The variables of the network that is kept and exported."""
        return variables

    def eval_logits(self, logits):
        """The eval-mode forward's logits, batch first."""
        return logits

    def scores(self, logits: np.ndarray, labels, taskset) -> dict:
        return evaluate.accuracies(logits, labels, taskset)

    def result_extras(self, model, variables, final_eval: dict) -> dict:
        """Fields of a run's result row beyond the kept network's."""
        return {}

    def report_rows(self, row: dict) -> list[dict]:
        """The report's rows of a run's result row."""
        return [row]


class PeerStudent(PlainStudent):
    """M peer networks: the terms see every peer's logits (M, B, C) and embeddings
    (M, B, d); the leader (the last peer) is deployed and reported, and the naive ensemble
    of all peers (mean logits, MCL-OKD Eq. 4) is reported beside it."""

    name = "peers"
    ENSEMBLE_SUFFIX = ":ensemble"
    PEER_MAJOR = ("peer_logits", "embeddings")  # (M, B, ...): the batch is axis 1

    def build(self, student_cfg, peers_cfg, num_classes, seed, view_shape, dtype):
        peer = create_model(
            student_cfg.arch,
            num_classes,
            stem=student_cfg.stem,
            width=student_cfg.width,
            dtype=dtype,
        )
        model = PeerNetworks(
            peer,
            num_peers=int(peers_cfg.num_peers),
            embed_dim=int(peers_cfg.embed_dim),
            shared_stages=int(peers_cfg.shared_stages),
        )
        return model, init_variables_of(model, seed, view_shape)

    def outputs(self, logits, features, batch, b: int) -> dict:
        out = {"logits": logits[-1], "peer_logits": logits, "embeddings": features}
        return {**out, "labels": batch.get("label"), "index": batch["index"]}

    def batch_axis(self, key: str) -> int:
        return 1 if key in self.PEER_MAJOR else 0

    def with_bn_axis(self, model, axis_name):
        return model.clone(peer=model.peer.clone(bn_axis_name=axis_name))

    def init_memory(self, model, num_data: int, rng):
        return okd.init_memory_bank(rng, model.num_peers, num_data, model.embed_dim)

    def deploy(self, model, variables) -> dict:
        return model.leader_variables(variables)

    def eval_logits(self, logits):
        return jnp.moveaxis(logits, 0, 1)  # (M, B, C) -> (B, M, C)

    def scores(self, logits: np.ndarray, labels, taskset) -> dict:
        """The leader's accuracies, and under 'ensemble' the naive ensemble's (mean logits).
        ``logits`` (N, M, C)."""
        result = evaluate.accuracies(logits[:, -1], labels, taskset)
        result["ensemble"] = evaluate.accuracies(logits.mean(axis=1), labels, taskset)
        return result

    def result_extras(self, model, variables, final_eval: dict) -> dict:
        # Every peer's network (a shared trunk once), without the embeddings used in training.
        networks = {k: v for k, v in variables["params"].items() if not k.startswith("embed")}
        return {
            "ensemble": final_eval["ensemble"],
            "ensemble_params": param_count({"params": networks}),
        }

    def report_rows(self, row: dict) -> list[dict]:
        """The leader's row, and the ensemble's (``<method>:ensemble``)."""
        ensemble = {**row, **row["ensemble"], "method": row["method"] + self.ENSEMBLE_SUFFIX}
        ensemble["params"] = row["ensemble_params"]
        ensemble["selection"] = None  # only the leader is kept
        del ensemble["ensemble"], ensemble["ensemble_params"]
        return [row, ensemble]

    @classmethod
    def is_ensemble_row(cls, row: dict) -> bool:
        return row["method"].endswith(cls.ENSEMBLE_SUFFIX)


PLAIN, PEERS = PlainStudent(), PeerStudent()


def student_kind(method) -> PlainStudent:
    """The kind of student ``method`` (a `cka_jax.methods.Method`) trains."""
    return PEERS if method.peers else PLAIN


def is_deployable_row(row: dict) -> bool:
    """Whether a report row is a network that was kept (not a peer ensemble)."""
    return not PeerStudent.is_ensemble_row(row)
