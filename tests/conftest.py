"""Test setup: 8 fake CPU devices for sharding tests, strict rank promotion, and a persistent
XLA compilation cache for the session (subprocess runs of the CLI share compiled steps)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="engram-jax-test-xla-cache-"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
