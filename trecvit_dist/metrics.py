"""The TensorBoard writer and the chips' peak FLOP/s behind perf/mfu (tasks own their metrics)."""

from __future__ import annotations

import os

import jax

# CLU's writer imports TensorFlow, only to write event files: its C++ notices are noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def create_writer(workdir: str):
  """TensorBoard event files in the workdir from process 0; plain logging elsewhere (a CLU
  MetricWriter). TensorFlow is imported here, not at start-up (4 s): bad input fails first."""
  from clu import metric_writers  # noqa: PLC0415

  return metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )


# Dense bf16 peak FLOP/s per chip (vendor figures). Used for perf/mfu; unknown kinds skip it.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,  # v5p reports "TPU v5"
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100 80GB HBM3": 989e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return float(override)
  return PEAK_FLOPS.get(jax.devices()[0].device_kind)
