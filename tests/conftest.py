"""Every test process sees two CPU devices, so data-parallel code runs for real.

Compiled programs are cached on disk for the session (JAX's persistent compilation cache),
and the environment variables reach the subprocesses the end-to-end tests start, so the
same train step is compiled once rather than once per process.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cka_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
