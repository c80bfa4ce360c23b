"""The job timing: exclusive section times, compile time and counts from JAX's own events."""

import json
import time

import jax
import jax.numpy as jnp
import pytest

from cka_jax.infra import timing


def test_nested_sections_count_each_second_once_in_the_innermost_section():
    job = timing.Timing()
    with job.active():
        with timing.stage("teachers"):
            time.sleep(0.05)  # the stage's own time: 'other'
            with timing.run("teacher task0"), timing.measure("train_steps"):
                time.sleep(0.1)
                with timing.measure("evaluation"):
                    time.sleep(0.2)
        time.sleep(0.05)  # outside every section
    runs = job.to_dict()["by_run"]
    assert runs["teachers"]["other"] == pytest.approx(0.05, abs=0.03)
    assert runs["teachers/teacher task0"]["train_steps"] == pytest.approx(0.1, abs=0.03)
    assert runs["teachers/teacher task0"]["evaluation"] == pytest.approx(0.2, abs=0.03)
    breakdown = job.to_dict()
    assert breakdown["unaccounted_s"] == pytest.approx(0.05, abs=0.03)
    assert sum(c["seconds"] for c in breakdown["cells"]) + breakdown[
        "unaccounted_s"
    ] == pytest.approx(breakdown["total_s"], abs=0.01)


def test_compilation_is_charged_to_compile_and_counted_once_per_compiled_function(tmp_path):
    def chain(x):
        for i in range(60):
            x = jnp.tanh(x @ x) + i
        return x

    fn, x = jax.jit(chain), jnp.ones((16, 16))
    job = timing.Timing()
    with job.active(), timing.stage("s"), timing.measure("train_steps"):
        fn(x).block_until_ready()  # compiles
        fn(x).block_until_ready()  # cached
    breakdown = job.write(tmp_path / "timing.json")
    assert json.loads((tmp_path / "timing.json").read_text()) == breakdown
    assert breakdown["compilations"] == 1
    stage = breakdown["by_run"]["s"]
    assert stage["compile"] > 0 and stage["compilations"] == 1
    text = timing.breakdown_text(breakdown)
    assert "1 compilations" in text and "s: " in text


def test_without_an_active_timing_sections_do_nothing():
    with timing.stage("x"), timing.run("y"), timing.measure("z"):
        pass
    assert timing._active is None
