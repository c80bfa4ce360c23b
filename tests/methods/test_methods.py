"""Methods as data: every flag follows from the terms' needs, the built-in rows are the
papers' objectives, and a new method (with a new term) is registered from user code alone
and trains end to end."""

import json

import jax.numpy as jnp
import pytest

from cka_jax import methods
from cka_jax.config import base_config, validate
from cka_jax.methods import terms
from cka_jax.stages import experiment
from tests import tiny_config


def loss(**overrides):
    cfg = base_config().loss
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize(
    "name, weights, flags",
    [
        ("kd", {"kd": 1.0}, {"uses_teachers"}),
        ("supervised", {"ce": 1.0}, {"uses_labels"}),
        ("cfl", {"kd": 1.0, "align": 10.0, "recon": 10.0}, {"uses_teachers", "reconstruction"}),
        (
            "cka",
            {"intra": 1.0, "inter": 1.0, "align": 10.0, "std": 1.0, "recon": 10.0},
            {"uses_teachers", "two_views", "projection", "reconstruction"},
        ),
        (
            "cka_intra",
            {"intra": 1.0, "align": 10.0, "std": 1.0, "recon": 10.0},
            {"uses_teachers", "two_views", "projection", "reconstruction"},
        ),
        (
            "cka_inter",
            {"inter": 1.0, "align": 10.0, "std": 1.0, "recon": 10.0},
            {"uses_teachers", "reconstruction"},
        ),
        ("dml", {"peer_ce": 1.0, "mutual_kl": 1.0}, {"uses_labels", "peers"}),
        (
            "mcl_okd",
            {"peer_ce": 1.0, "leader_kl": 1.0, "contrast": 0.025},
            {"uses_labels", "peers", "memory_bank"},
        ),
        (
            "mcl_okd_kd",
            {"peer_ce": 1.0, "leader_kl": 1.0, "contrast": 0.025, "kd": 1.0},
            {"uses_labels", "peers", "memory_bank", "uses_teachers"},
        ),
    ],
)
def test_built_in_rows_and_their_derived_flags(name, weights, flags):
    method = methods.build_method(name, loss())
    assert method.weights == weights
    assert list(method.weights) == list(weights)  # the order the step sums them in
    all_flags = (
        "uses_teachers",
        "uses_labels",
        "two_views",
        "projection",
        "reconstruction",
        "adapted_maps",
        "peers",
        "memory_bank",
    )
    assert {f for f in all_flags if getattr(method, f)} == flags
    expected_space = {"cfl": "cfl"}.get(name, "cka") if "align" in weights else None
    assert method.common_space == expected_space


def test_zero_weights_drop_terms_and_what_they_need():
    method = methods.build_method("cka", loss(recon_weight=0.0, intra_weight=0.0))
    assert "recon" not in method.weights and "intra" not in method.weights
    assert not method.reconstruction and not method.two_views and not method.projection
    adapted = methods.build_method("cka", loss(inter_features="adapted"))
    assert adapted.adapted_maps and adapted.common_space == "cka"


def test_methods_are_hashable_values():
    a, b = methods.build_method("cka", loss()), methods.build_method("cka", loss())
    assert a == b and hash(a) == hash(b)
    assert a != methods.build_method("cka", loss(std_weight=2.0))


def test_unknown_method_and_need_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'kdd'.*kd"):
        methods.build_method("kdd", loss())
    with pytest.raises(ValueError, match="known needs"):
        methods.declare_term("bad", {"teacher"})


@pytest.fixture
def toy_method():
    """A user's method with a term of its own, registered from here and removed after."""

    def logit_l2(o, cfg):  # keeps the student's logits small
        return jnp.mean(jnp.square(o["logits"]))

    terms.register_term("logit_l2", logit_l2, needs=())
    methods.register_method("kd_l2", lambda cfg: {"kd": 1.0, "logit_l2": 0.01})
    yield "kd_l2"
    for registry, key in (
        (methods.METHODS, "kd_l2"),
        (methods.TERMS, "logit_l2"),
        (terms.FUNCTIONS, "logit_l2"),
    ):
        registry.pop(key)


@pytest.mark.slow
def test_a_method_registered_from_user_code_trains_end_to_end(toy_method, tmp_path):
    method = methods.build_method(toy_method, loss())
    assert method.uses_teachers and not method.uses_labels  # from the kd term's needs
    cfg = tiny_config.get_config()
    cfg.methods = (toy_method,)
    cfg.epochs = 1
    validate(cfg)
    experiment.run(cfg, tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[-1]["method"] == toy_method
    run = tmp_path / "runs" / toy_method / "seed_0"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss/logit_l2" in m]
    assert steps and all(
        abs(m["loss"] - (m["loss/kd"] + 0.01 * m["loss/logit_l2"])) < 1e-5 for m in steps
    )
    # Two terms: the diagnostics decompose its gradient; both terms move the student.
    shares = json.loads((run / "result.json").read_text())["grad_share_median"]
    assert set(shares) == {"kd", "logit_l2"} and all(v > 0 for v in shares.values())
    assert (tmp_path / "student").is_dir()  # label-free: exported
