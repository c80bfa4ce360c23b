"""Methods as data: each one is a set of weighted loss terms plus the heads those terms need.

Every method trains through the same step (`cka_jax.train.step`); nothing here runs a loop.
A loss term is a plain function of the step's `outputs` dict (global-batch arrays) and the
loss config, selected by name, as in big_vision.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from cka_jax import losses, okd

# Amalgamation (label-free) methods and the labelled ones: the supervised reference and
# MCL-OKD's online distillation among peer networks, with its baselines (`cka_jax.okd`).
AMALGAMATION_METHODS = ("kd", "cfl", "cka", "cka_intra", "cka_inter")
PEER_METHODS = ("independent", "dml", "mcl_okd", "mcl_okd_kd")
TRAINED_METHODS = (*AMALGAMATION_METHODS, "supervised", *PEER_METHODS)
INTER_KINDS = losses.DISTANCE_KINDS
INTER_FEATURES = ("backbone", "adapted")  # what Eqs. 5-6 compare (see `inter_features`)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: loss weights by term name, and which heads the terms need."""

    name: str
    weights: dict[str, float]
    common_space: str | None = None  # None | 'cka' | 'cfl'
    projection: bool = False
    uses_teachers: bool = True
    peers: bool = False  # the student is `PeerNetworks`; the terms see every peer
    adapted_maps: bool = False  # the heads output the adapted (pre-pooling) feature maps

    def __hash__(self):  # part of the StepSpec that keys the compiled-step cache
        return hash((self.name, tuple(sorted(self.weights.items())), self.common_space,
                     self.projection, self.uses_teachers, self.peers,
                     self.adapted_maps))  # fmt: skip

    @property
    def two_views(self) -> bool:
        return self.weights.get("intra", 0.0) > 0

    @property
    def reconstruction(self) -> bool:
        return self.weights.get("recon", 0.0) > 0

    @property
    def memory_bank(self) -> bool:
        """Whether the train state carries MCL-OKD's memory bank."""
        return "contrast" in self.weights


def uses_labels(name: str) -> bool:
    """Whether method ``name`` trains on labels (not an amalgamation of teachers)."""
    return name not in AMALGAMATION_METHODS


def build_method(name: str, loss_cfg: ml_collections.ConfigDict) -> Method:
    """Returns the `Method` called ``name`` with weights from ``loss_cfg``."""
    if name == "kd":
        return Method(name, {"kd": 1.0})
    if name == "cfl":
        # Luo et al.'s code: soft target + 10 * (MMD + reconstruction).
        w = loss_cfg.cfl_weight
        return Method(name, _nonzero({"kd": 1.0, "align": w, "recon": w}), common_space="cfl")
    if name in ("cka", "cka_intra", "cka_inter"):
        weights = {
            "intra": loss_cfg.intra_weight if name != "cka_inter" else 0.0,
            "inter": loss_cfg.inter_weight if name != "cka_intra" else 0.0,
            "align": loss_cfg.align_weight,
            "std": loss_cfg.std_weight,
            "recon": loss_cfg.recon_weight,
        }
        weights = _nonzero(weights)
        return Method(
            name,
            weights,
            common_space="cka",
            projection="intra" in weights,
            adapted_maps="inter" in weights and loss_cfg.inter_features == "adapted",
        )
    if name == "supervised":
        return Method(name, {"ce": 1.0}, uses_teachers=False)
    if name in PEER_METHODS:
        # MCL-OKD Eq. 12, its network-trained-alone-M-times baseline, DML, and MCL-OKD with
        # a teacher (Table 4): KD from the teachers' union logits to the leader.
        weights = {"peer_ce": 1.0}
        if name == "dml":
            weights["mutual_kl"] = loss_cfg.mutual_weight
        if name in ("mcl_okd", "mcl_okd_kd"):
            weights.update(leader_kl=1.0, contrast=loss_cfg.contrast_weight)
        if name == "mcl_okd_kd":
            weights["kd"] = 1.0
        return Method(name, _nonzero(weights), uses_teachers="kd" in weights, peers=True)
    raise ValueError(f"unknown method {name!r}; valid methods are {', '.join(TRAINED_METHODS)}")


def _nonzero(weights):
    return {k: float(v) for k, v in weights.items() if v}


# Loss terms. `o` holds global-batch arrays: 'logits', 'features' (student, view 1), 'labels',
# 'teacher_logits' / 'teacher_features' (lists, task order) and the heads' outputs. With peer
# networks, 'logits' is the leader's and 'peer_logits' (M, B, C), 'embeddings' (M, B, d),
# 'index' (B,), 'memory' (M, N, d) and 'negative_index' (M, M, [B,] S) are there too.


def term_ce(o, cfg):
    return losses.cross_entropy(o["logits"], o["labels"])


def term_kd(o, cfg):
    teacher_logits = jnp.concatenate(o["teacher_logits"], axis=-1)
    return losses.soft_target_kl(o["logits"], teacher_logits, temperature=cfg.kd_temperature)


def term_std(o, cfg):
    """CKA's soft-target term (Eq. 11), in the KL direction ``loss.std_direction``."""
    teacher_logits = jnp.concatenate(o["teacher_logits"], axis=-1)
    return losses.soft_target_kl(
        o["logits"], teacher_logits, temperature=cfg.kd_temperature, direction=cfg.std_direction
    )


def term_intra(o, cfg):
    return losses.intra_contrast(
        o["projection"], o["projection_view2"], margin=cfg.margin, reduction=cfg.intra_reduction
    )


def inter_features(o, cfg):
    """``(student, [teachers])`` feature maps that Eqs. 5-6 compare: the backbones' last
    stage (``loss.inter_features='backbone'``) or the 1x1-adapted 256-channel maps of the
    common space (``'adapted'``: every model's P has the same c x h x w, as Eq. 5 has it)."""
    if cfg.inter_features == "adapted":
        return o["student_adapted"], o["teacher_adapted"]
    return o["features"], o["teacher_features"]


def transport_kwargs(cfg) -> dict:
    """The Eq. 5 reading of the loss config: distance kind, temperature and scale."""
    return dict(
        kind=cfg.inter_kind, temperature=cfg.inter_temperature, normalize=cfg.inter_normalize
    )


def term_inter(o, cfg):
    student, teachers = inter_features(o, cfg)
    kwargs = transport_kwargs(cfg)
    return sum(
        losses.inter_contrast(student, t, **kwargs, reduction=cfg.inter_reduction)
        for t in teachers
    )


def term_align(o, cfg):
    return sum(losses.mmd(o["student_common"], t) for t in o["teacher_common"])


def term_recon(o, cfg):
    return sum(
        losses.reconstruction_loss(r, t)
        for r, t in zip(o["reconstruction"], o["reconstruction_target"], strict=True)
    )


def term_peer_ce(o, cfg):
    return okd.peer_cross_entropy(o["peer_logits"], o["labels"])


def term_leader_kl(o, cfg):
    return okd.ensemble_to_leader_kl(o["peer_logits"], temperature=cfg.okd_temperature)


def term_mutual_kl(o, cfg):
    return okd.mutual_kl(o["peer_logits"])


def term_contrast(o, cfg):
    return okd.multi_view_contrast(
        o["embeddings"], o["memory"], o["index"], o["negative_index"],
        temperature=cfg.nce_temperature, num_data=o["memory"].shape[1],
    )  # fmt: skip


LOSS_TERMS = {
    "ce": term_ce,
    "peer_ce": term_peer_ce,
    "leader_kl": term_leader_kl,
    "mutual_kl": term_mutual_kl,
    "contrast": term_contrast,
    "kd": term_kd,
    "std": term_std,
    "intra": term_intra,
    "inter": term_inter,
    "align": term_align,
    "recon": term_recon,
}


def loss_terms(method: Method, outputs, loss_cfg) -> dict:
    """``{term_k: value}`` over the method's terms (unweighted)."""
    return {name: LOSS_TERMS[name](outputs, loss_cfg) for name in method.weights}


def total_loss(method: Method, outputs, loss_cfg):
    """Returns ``(sum_k w_k * term_k, {term_k: value})`` over the method's terms."""
    terms = loss_terms(method, outputs, loss_cfg)
    total = sum(method.weights[name] * value for name, value in terms.items())
    return total, terms
