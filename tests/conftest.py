"""Every test process sees two CPU devices, so data-parallel code runs for real.

(JAX's persistent compilation cache is deliberately not used: on the CPU backend of
jax 0.10 a cached train step aborted the process when its outputs were fetched.)
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
