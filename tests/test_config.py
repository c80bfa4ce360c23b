"""Config errors name the wrong field or value and list the valid ones."""

import subprocess
import sys
from pathlib import Path

import pytest

from cka_jax.config import base_config, resolve_method, resolve_peers, validate
from tests import tiny_config

REPO = Path(__file__).resolve().parents[1]


def run_main(tmp_path, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cka_jax.main",
            f"--config={REPO / 'tests' / 'tiny_config.py'}",
            f"--workdir={tmp_path / 'w'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_misspelled_override_is_rejected_before_any_work(tmp_path):
    out = run_main(tmp_path, "--config.epochz=3")
    assert out.returncode != 0
    assert "epochz" in out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.epochs=abc", "--config.epochs: expects int, got 'abc'"),
        (
            "--config.loss.kd_temperature=hot",
            "--config.loss.kd_temperature: expects float, got 'hot'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_and_exit_code_2(tmp_path, override, message):
    out = run_main(tmp_path, override)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in out.stderr and "FATAL" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_unknown_method_lists_the_valid_ones(tmp_path):
    out = run_main(tmp_path, "--config.methods=('kd','ckaa')")
    assert out.returncode == 2
    assert "ckaa" in out.stderr
    for valid in ("kd", "cfl", "cka", "cka_intra", "cka_inter", "supervised"):
        assert valid in out.stderr
    assert "Traceback" not in out.stderr


def test_misspelled_field_in_a_config_file_lists_valid_fields():
    cfg = tiny_config.get_config()
    cfg.lossses = {}
    with pytest.raises(ValueError, match=r"unknown config field 'lossses'.*loss"):
        validate(cfg)
    cfg = tiny_config.get_config()
    cfg.loss.margn = 0.3
    with pytest.raises(ValueError, match=r"unknown config field 'loss.margn'.*margin"):
        validate(cfg)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("parallelism", "pmapp", "parallelism"),
        ("seeds", (), "seeds"),
        ("batch_size", 0, "batch_size"),
    ],
)
def test_invalid_values_are_clear_errors(field, value, match):
    cfg = base_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_inter_kind_must_be_a_table3_distance():
    cfg = base_config()
    cfg.loss.inter_kind = "manhattan"
    with pytest.raises(ValueError, match="euclidean"):
        validate(cfg)


@pytest.mark.parametrize(
    "field, value, valid",
    [
        ("inter_normalize", "max", "mean"),
        ("inter_features", "logits", "adapted"),
        ("intra_reduction", "median", "sum"),
        ("inter_reduction", "median", "sum"),
        ("std_direction", "both", "student_teacher"),
        ("inter_temperature", 0.0, "positive"),
    ],
)
def test_loss_readings_must_be_valid_in_the_config_and_in_a_variant(field, value, valid):
    cfg = tiny_config.get_config()
    cfg.loss[field] = value
    with pytest.raises(ValueError, match=f"config.loss.{field}.*{valid}"):
        validate(cfg)
    cfg = tiny_config.get_config()
    cfg.variants = {"cka_x": dict(method="cka", loss={field: value})}
    cfg.methods = ("cka_x",)
    with pytest.raises(ValueError, match=f"config.variants.cka_x.loss.{field}.*{valid}"):
        validate(cfg)


def test_selection_criterion_and_holdout_are_checked():
    cfg = tiny_config.get_config()
    cfg.selection.criterion = "best_test"
    with pytest.raises(ValueError, match="teacher_agreement"):
        validate(cfg)
    cfg.selection.criterion = "teacher_agreement"
    cfg.selection.holdout_fraction = 1.0
    with pytest.raises(ValueError, match="holdout_fraction"):
        validate(cfg)


@pytest.mark.parametrize(
    "name",
    ["default", "mcl_okd", "cars_aircraft", "dogs", "cars", "cub", "aircraft", "study", "readings"],
)
def test_shipped_configs_validate(name, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(REPO))
    module = importlib.import_module(f"configs.{name}")
    args = [None]
    if name == "study":
        args = module.EXPERIMENTS
    elif name == "readings":
        args = ("default", "hard,all", "default,candidates")
    for arg in args:
        validate(module.get_config() if arg is None else module.get_config(arg))


@pytest.mark.parametrize(
    "peers, message",
    [
        (dict(num_peers=1), "num_peers >= 2"),
        (dict(shared_stages=4), "shared_stages < 4"),
        (dict(embed_dim=0), "embed_dim >= 1"),
    ],
)
def test_bad_peers_name_the_field_in_the_config_and_in_a_variant(peers, message):
    cfg = tiny_config.get_config()
    cfg.peers.update(peers)
    with pytest.raises(ValueError, match=f"config.peers needs .*{message}"):
        validate(cfg)
    cfg = tiny_config.get_config()
    cfg.variants = {"okd_b": dict(method="mcl_okd", peers=peers)}
    cfg.methods = ("okd_b",)
    with pytest.raises(ValueError, match=f"config.variants.okd_b.peers needs .*{message}"):
        validate(cfg)


def test_peer_methods_refuse_a_student_checkpoint():
    cfg = tiny_config.get_config()
    cfg.student.checkpoint = "/some/student"
    cfg.methods = ("kd", "mcl_okd")
    with pytest.raises(ValueError, match="'mcl_okd' trains its peers from scratch"):
        validate(cfg)


def test_a_variant_changes_the_peers_of_its_own_runs_only():
    cfg = tiny_config.get_config()
    cfg.variants = {"okd_b": dict(method="mcl_okd", peers=dict(shared_stages=3))}
    validate(cfg)
    assert resolve_peers(cfg, "okd_b").shared_stages == 3
    assert resolve_peers(cfg, "okd_b").num_peers == cfg.peers.num_peers
    assert resolve_peers(cfg, "mcl_okd").shared_stages == 0 == cfg.peers.shared_stages


def test_paper_config_without_data_stops_with_the_data_layers_error(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cka_jax.main",
            f"--config={REPO / 'configs' / 'aircraft.py'}",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.root={tmp_path / 'nowhere'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2
    assert "nowhere" in out.stderr and "images_variant_trainval.txt" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "variant, message",
    [
        (dict(method="kdd"), "kdd"),
        (dict(method="cka", loss=dict(inter_kindd="mmd")), "inter_kindd"),
        (dict(method="cka", loss=dict(inter_kind="manhattan")), "manhattan"),
        (dict(method="cka", student=dict(arch="vgg")), "vgg"),
        (dict(method="cka", optimizer=dict(learning_rate=1.0)), "optimizer"),
    ],
)
def test_a_wrong_variant_is_named_with_the_valid_choices(variant, message):
    cfg = tiny_config.get_config()
    cfg.variants = {"mine": variant}
    cfg.methods = ("mine",)
    with pytest.raises(ValueError, match=message) as err:
        validate(cfg)
    assert "config.variants.mine" in str(err.value)


def test_variants_resolve_over_the_base_config_and_may_not_shadow_a_method():
    cfg = tiny_config.get_config()
    cfg.variants = {"cka_cos": dict(method="cka_inter", loss=dict(inter_kind="cosine"))}
    cfg.methods = ("kd", "cka_cos")
    validate(cfg)
    method, loss, student = resolve_method(cfg, "cka_cos")
    assert (method, loss.inter_kind, loss.margin) == ("cka_inter", "cosine", cfg.loss.margin)
    assert student.width == cfg.student.width and cfg.loss.inter_kind == "euclidean"
    assert resolve_method(cfg, "kd") == ("kd", cfg.loss, cfg.student)
    cfg.variants = {"cka": dict(method="kd")}
    with pytest.raises(ValueError, match="built-in method"):
        validate(cfg)


def test_an_unknown_compute_dtype_lists_the_valid_ones():
    cfg = tiny_config.get_config()
    cfg.compute_dtype = "float16"
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        validate(cfg)
