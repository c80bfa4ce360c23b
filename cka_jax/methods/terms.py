"""The loss terms' functions, one per term declared in `cka_jax.methods`, selected by name
(as big_vision selects its losses).

A term is a plain function ``(outputs, loss_cfg) -> scalar`` of the step's ``outputs`` dict
(global-batch arrays) and the loss config. `register_term` adds one from user code, with
its needs (`cka_jax.methods.NEEDS`)::

    from cka_jax.methods import losses
    from cka_jax.methods import terms

    def logit_l2(o, cfg):  # a toy term: keep the student's logits small
        return jnp.mean(jnp.square(o["logits"]))

    terms.register_term("logit_l2", logit_l2, needs=())
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from cka_jax import methods
from cka_jax.methods import losses, okd

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
        losses.inter_contrast(student, t, **kwargs, reduction=cfg.inter_reduction) for t in teachers
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
        o["embeddings"],
        o["memory"],
        o["index"],
        o["negative_index"],
        temperature=cfg.nce_temperature,
        num_data=o["memory"].shape[1],
    )


FUNCTIONS: dict[str, Callable] = {
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
assert set(FUNCTIONS) == set(methods.TERMS), "every declared term has a function"


def register_term(name: str, fn: Callable, *, needs=(), description: str = "") -> None:
    """Adds loss term ``name``: ``fn(outputs, loss_cfg) -> scalar`` and what it needs from
    the step (`cka_jax.methods.NEEDS`, or a function of the loss config returning them)."""
    methods.declare_term(name, needs, description)
    FUNCTIONS[name] = fn


def loss_terms(method: methods.Method, outputs, loss_cfg) -> dict:
    """``{term_k: value}`` over the method's terms (unweighted), in the method's order."""
    missing = [name for name, _ in method.terms if name not in FUNCTIONS]
    if missing:
        raise ValueError(f"terms {missing} have no function: use train.terms.register_term")
    return {name: FUNCTIONS[name](outputs, loss_cfg) for name, _ in method.terms}


def total_loss(method: methods.Method, outputs, loss_cfg):
    """Returns ``(sum_k w_k * term_k, {term_k: value})`` over the method's terms."""
    terms = loss_terms(method, outputs, loss_cfg)
    weights = method.weights
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
