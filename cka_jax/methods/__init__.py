"""Methods as data: a loss term declares what it needs, a method is a row of term weights.

Every method trains through the one train step (`cka_jax.train.step`). A **term** is a name,
what it needs from the step, and a function of the step's outputs (`cka_jax.methods.terms`
holds the functions). A **method** is a row: term -> weight, computed from the loss config.
Whatever the step builds for a method (teachers, a second view, heads, peer networks, a
memory bank) follows from the needs of the terms with a non-zero weight.

This module imports no JAX, so the config can validate method names cheaply. New methods
come from user code without editing the package::

    from cka_jax import methods
    methods.register_method("kd_ce", lambda loss: {"kd": 1.0, "ce": 0.5})

and new terms with `cka_jax.methods.terms.register_term` (its function and its needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

# What a term can need from the step.
NEEDS = (
    "teachers",  # the frozen teachers' logits and features on view 1
    "labels",  # the true labels (not label-free)
    "two_views",  # the student's second augmented view
    "projection",  # the projection head on the student's pooled features (both views)
    "common_space",  # the common-space heads (CKA's or CFL's, as the method's row says)
    "reconstruction",  # the teacher-side decoders back from the common space
    "adapted_maps",  # the common space's 1x1-adapted maps (before pooling)
    "peers",  # the student is peer networks (MCL-OKD); the leader is kept
    "memory_bank",  # MCL-OKD's memory bank of every training image's embedding
)
COMMON_SPACES = ("cka", "cfl")

Needs = frozenset[str] | Callable[..., frozenset[str]]  # fixed, or a function of the loss config


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A loss term's name and what it needs (fixed, or a function of the loss config)."""

    name: str
    needs: Needs
    description: str = ""

    def needs_for(self, loss_cfg) -> frozenset[str]:
        return frozenset(self.needs(loss_cfg) if callable(self.needs) else self.needs)


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """A method: its term weights as a function of the loss config, and (for terms that need
    a common space) which one."""

    name: str
    weights: Callable[..., Mapping[str, float]]
    common_space: str = "cka"
    description: str = ""


TERMS: dict[str, TermSpec] = {}
METHODS: dict[str, MethodRow] = {}


def declare_term(name: str, needs, description: str = "") -> TermSpec:
    """Declares term ``name`` and what it needs (a subset of `NEEDS`, or a function of the
    loss config returning one). Its function is attached by `cka_jax.methods.terms`."""
    if not callable(needs):
        needs = frozenset(needs)
        _check_needs(name, needs)
    TERMS[name] = TermSpec(name, needs, description)
    return TERMS[name]


def register_method(
    name: str, weights, *, common_space: str = "cka", description: str = ""
) -> MethodRow:
    """Registers method ``name``: ``weights`` maps the loss config to {term: weight} (or is
    that dict). Terms with weight 0 are left out of the method."""
    if common_space not in COMMON_SPACES:
        raise ValueError(f"common_space={common_space!r}; valid: {COMMON_SPACES}")
    fn = weights if callable(weights) else (lambda loss, w=dict(weights): w)
    METHODS[name] = MethodRow(name, fn, common_space, description)
    return METHODS[name]


def _check_needs(term: str, needs: frozenset[str]) -> None:
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"term {term!r} needs {sorted(unknown)}; known needs: {NEEDS}")


@dataclasses.dataclass(frozen=True)
class Method:
    """A method resolved against a loss config: its non-zero term weights (in row order,
    the order the step sums them in) and the union of their needs. Every flag is derived
    from the needs. Hashable: it keys the compiled-step cache."""

    name: str
    terms: tuple[tuple[str, float], ...]
    needs: frozenset[str]
    common_space_kind: str = "cka"

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.terms)

    @property
    def uses_teachers(self) -> bool:
        return "teachers" in self.needs

    @property
    def uses_labels(self) -> bool:
        return "labels" in self.needs

    @property
    def two_views(self) -> bool:
        return "two_views" in self.needs

    @property
    def projection(self) -> bool:
        return "projection" in self.needs

    @property
    def reconstruction(self) -> bool:
        return "reconstruction" in self.needs

    @property
    def adapted_maps(self) -> bool:
        return "adapted_maps" in self.needs

    @property
    def peers(self) -> bool:
        return "peers" in self.needs

    @property
    def memory_bank(self) -> bool:
        return "memory_bank" in self.needs

    @property
    def common_space(self) -> str | None:
        """Which common space the heads build, or None."""
        return self.common_space_kind if "common_space" in self.needs else None


def build_method(name: str, loss_cfg) -> Method:
    """The `Method` called ``name`` with weights from ``loss_cfg``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods are {', '.join(METHODS)}")
    row = METHODS[name]
    terms = tuple((t, float(w)) for t, w in row.weights(loss_cfg).items() if w)
    unknown = [t for t, _ in terms if t not in TERMS]
    if unknown:
        raise ValueError(f"method {name!r} uses undeclared terms {unknown}; declare them first")
    needs = frozenset().union(*(TERMS[t].needs_for(loss_cfg) for t, _ in terms))
    _check_needs(name, needs)
    return Method(name, terms, needs, row.common_space)


def uses_labels(name: str, loss_cfg) -> bool:
    """Whether method ``name`` trains on labels (not an amalgamation of teachers)."""
    return build_method(name, loss_cfg).uses_labels


# --- the built-in terms -------------------------------------------------------------------


def _inter_needs(loss) -> frozenset[str]:
    adapted = loss.inter_features == "adapted"
    return frozenset({"teachers", *(("common_space", "adapted_maps") if adapted else ())})


declare_term("ce", {"labels"}, "cross-entropy with the true labels")
declare_term("kd", {"teachers"}, "Hinton's KD from the teachers' concatenated logits")
declare_term("std", {"teachers"}, "CKA's soft-target distillation (Eq. 11)")
declare_term("intra", {"two_views", "projection"}, "CKA's intra-model contrast (Eq. 3)")
declare_term("inter", _inter_needs, "CKA's inter-model contrast (Eqs. 5-6), summed over teachers")
declare_term("align", {"teachers", "common_space"}, "MMD in the common space (CKA Eq. 10)")
declare_term("recon", {"teachers", "common_space", "reconstruction"}, "reconstruction (CFL Eq. 4)")
declare_term("peer_ce", {"peers", "labels"}, "every peer's cross-entropy")
declare_term("leader_kl", {"peers"}, "KL from the peers' ensemble to the leader (MCL-OKD)")
declare_term("mutual_kl", {"peers"}, "DML's mutual KL between peers")
declare_term("contrast", {"peers", "memory_bank"}, "MCL-OKD's NCE contrast (Eq. 12)")


# --- the built-in methods -----------------------------------------------------------------


def _cka(drop: str | None):
    def weights(loss):
        row = {
            "intra": loss.intra_weight,
            "inter": loss.inter_weight,
            "align": loss.align_weight,
            "std": loss.std_weight,
            "recon": loss.recon_weight,
        }
        if drop:
            row[drop] = 0.0
        return row

    return weights


def _peer_row(mutual: bool = False, okd: bool = False, kd: bool = False):
    def weights(loss):
        row = {"peer_ce": 1.0}
        if mutual:
            row["mutual_kl"] = loss.mutual_weight
        if okd:
            row.update(leader_kl=1.0, contrast=loss.contrast_weight)
        if kd:
            row["kd"] = 1.0
        return row

    return weights


register_method("kd", {"kd": 1.0}, description="vanilla KD (Hinton et al.)")
# Luo et al.'s code: soft target + 10 * (MMD + reconstruction), in CFL's common space.
register_method(
    "cfl",
    lambda loss: {"kd": 1.0, "align": loss.cfl_weight, "recon": loss.cfl_weight},
    common_space="cfl",
    description="CFL (Luo et al. 2019)",
)
register_method("cka", _cka(None), description="CKA (Eq. 12)")
register_method("cka_intra", _cka("inter"), description="CKA without the inter term")
register_method("cka_inter", _cka("intra"), description="CKA without the intra term")
register_method("supervised", {"ce": 1.0}, description="the supervised reference")
# MCL-OKD (Eq. 12), its network-trained-alone-M-times baseline, DML, and MCL-OKD with a
# teacher (its Table 4): KD from the teachers' union logits to the leader.
register_method("independent", _peer_row(), description="M peers trained alone")
register_method("dml", _peer_row(mutual=True), description="Deep Mutual Learning")
register_method("mcl_okd", _peer_row(okd=True), description="MCL-OKD (Yang et al.)")
register_method("mcl_okd_kd", _peer_row(okd=True, kd=True), description="MCL-OKD + KD")

BUILT_IN_METHODS = tuple(METHODS)
