"""Test setup: 8 fake CPU devices for sharding tests, strict rank promotion, and a persistent
XLA compilation cache for the session (subprocess runs of the CLI share compiled steps), deleted
when the session ends unless the caller set JAX_COMPILATION_CACHE_DIR."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="engram-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
