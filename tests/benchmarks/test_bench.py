"""The step benchmark (scripts/benchmark.py) runs end to end on tiny shapes (a smoke test,
not a timing): its report has the documented fields, --two_views really adds the second
student pass, and --against times a second method in the same process."""

from benchmarks import step_benchmark as benchmark

TINY = [
    "--teacher=resnet10",
    "--student=resnet10",
    "--width=4",
    "--stem=small",
    "--image_size=16",
    "--classes_per_teacher=3",
    "--batch_size=8",
    "--steps=2",
]


def test_benchmark_reports_flops_memory_and_an_interleaved_ratio(tmp_path, capsys):
    one_view = benchmark.main([*TINY, "--method=kd", "--peak_tflops=2"])
    both = benchmark.main([*TINY, "--method=kd", "--two_views", "--against=kd"])
    for result in (one_view, both):
        assert result["step_s_median"] > 0 and result["images_per_s"] > 0
        assert result["compile_s"] > 0 and result["xla_memory_mb"]
    # The student's forward and backward dominate: a second view adds most of their FLOPs.
    assert both["step_gflops"] > 1.3 * one_view["step_gflops"]
    assert both["against"]["method"] == "kd" and both["against"]["step_s_median"] > 0
    assert both["over_against_time"] == both["step_s_median"] / both["against"]["step_s_median"]
    # The fraction of peak against a given peak (a GPU's, say); the CPU kernels chosen.
    assert one_view["peak_source"] == "--peak_tflops"
    assert one_view["fraction_of_peak"] == one_view["achieved_tflops"] / 2
    assert one_view["cpu_convolutions"] == "ynnpack"  # 'auto' at 16 px
