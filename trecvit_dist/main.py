"""Entry point: python -m trecvit_dist.main --config configs/NAME.py[:ARG] --workdir DIR.

Parses flags, joins the multi-process job, logs devices, and calls train.train_and_evaluate.
The workdir is the run's identity: the same command again resumes. Exit codes: 0 completed,
42 preempted (checkpoint saved; run the same command again), 1 failed.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trecvit_dist import checkpointing, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARG]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (local or gs://); rerun resumes")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("COORDINATOR_ADDRESS"), "HOST:PORT (multi-process CPU/GPU)"
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", int(os.environ.get("NUM_PROCESSES", "0")) or None, "processes in the job"
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id",
  int(os.environ["PROCESS_ID"]) if "PROCESS_ID" in os.environ else None,
  "this process's index",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if _COORDINATOR.value:
    # Cross-process collectives on CPU (tests, laptops); no effect on TPU/GPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # TPU pods: everything comes from the environment
  logging.info(
    "Process %d/%d, %d local / %d global devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    sys.exit(checkpointing.EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main)
