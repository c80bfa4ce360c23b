"""Benchmarks of the train step (`step_benchmark`) and the PyTorch reference step it is
compared with (`torch_reference`, needs torch). Scripts in scripts/ run them."""
