"""XLA flags for the test processes and every process a test starts.

The tests compile many small programs that run for milliseconds: LLVM's optimisation of
them costs more than it saves (about 30% of the suite's time). Every process gets the same
flags, so runs compared bit for bit are compiled alike. (No jax import: conftest sets the
environment before jax is imported.)
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a process with ``devices`` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
