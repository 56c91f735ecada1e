"""Test-wide settings: 8 simulated CPU devices, strict rank promotion, shared config helpers."""

import os

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TPU AOT tests load libtpu; let a subprocess (compile_check's CLI test) load it as well.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
