"""Entry point: python -m trecvit_dist.main --config configs/NAME.py[:ARG] --workdir DIR.

Parses flags, joins the multi-process job, logs devices, and calls train.train_and_evaluate.
The workdir is the run's identity: the same command again resumes.

Exit codes: 0 completed; 42 preempted (SIGTERM at any moment: at most the work since the last
complete checkpoint is lost; run the same command again); 1 failed (the error is the last line
printed; for the supervisor, the step and a digest of the error go to $TRECVIT_FAILURE_FILE when
set); 130 interrupted (Ctrl-C).

Output: quiet by default. This project's messages from INFO, everyone else's (Orbax, absl, CLU,
Grain, JAX) from WARNING, TensorFlow's C++ notices off, errors as one message without the
traceback. `--verbosity=0` (or any value) shows everything, tracebacks included. Each run's
whole log (every INFO line, the traceback of a failure) is written to WORKDIR/logs/ at exit.
"""

import os
import signal
import sys

# Nothing has run before the trainer installs its own handler: a SIGTERM is a clean preemption.
signal.signal(signal.SIGTERM, lambda *_: os._exit(42))

VERBOSE = any(arg.split("=")[0] in ("--verbosity", "-v", "--v") for arg in sys.argv[1:])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if VERBOSE else "3")
if not VERBOSE:
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only writes event files here

import collections  # noqa: E402
import hashlib  # noqa: E402
import logging as std_logging  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trecvit_dist import checkpointing, train  # noqa: E402

signal.signal(signal.SIGTERM, lambda *_: checkpointing.exit_preempted())  # the same, saying so

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

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
_OURS = tuple(
  str(pathlib.Path(__file__).resolve().parents[1] / package) + os.sep
  for package in ("trecvit_dist", "data_pipelines", "kernels")
)


class _Quiet(std_logging.Filter):
  """This project's records from INFO, Orbax's from ERROR (its warnings are about its own
  options, e.g. a read-only manager), everyone else's from WARNING."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.pathname.startswith(_OURS):
      return True
    orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return record.levelno >= (std_logging.ERROR if orbax else std_logging.WARNING)


class _RunLog(std_logging.Handler):
  """Every record of this run, unfiltered (the newest lines), for WORKDIR/logs/ at exit."""

  def __init__(self, max_lines: int = 50_000):
    super().__init__()
    self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
    self.setFormatter(logging.PythonFormatter())
    self.started = time.strftime("%Y%m%d-%H%M%S", time.gmtime())

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      self.lines.append(self.format(record))
    except Exception:  # noqa: BLE001 (logging must never raise)
      self.handleError(record)

  def write(self, workdir: str) -> str | None:
    """Writes the lines to WORKDIR/logs/TIME.process_I.log; None when the workdir does not exist
    (an input error stopped the run before creating it) or cannot be written."""
    try:
      if not epath.Path(workdir).is_dir():
        return None
      path = epath.Path(workdir) / "logs" / f"{self.started}.process_{jax.process_index()}.log"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("\n".join(self.lines) + "\n")
      return str(path)
    except Exception:  # noqa: BLE001 (the run's own outcome matters more than its log file)
      return None


def _cpu_only_host() -> bool:
  """No TPU, NVIDIA or AMD device attached (JAX's own checks, from /sys and /dev)."""
  try:
    from jax._src import hardware_utils  # noqa: PLC0415

    tpus, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return not (
      tpus or hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(1)
    )
  except Exception:  # noqa: BLE001 (a JAX without these helpers: leave the platforms alone)
    return False


def _message(error: BaseException) -> str:
  """The error as a user reads it: the message alone for the errors that explain themselves."""
  explained = (ValueError, FileNotFoundError, FloatingPointError, checkpointing.CheckpointError)
  text = str(error) if isinstance(error, explained) else f"{type(error).__name__}: {error}"
  return text or type(error).__name__


def _report_failure(error: BaseException, workdir: str, run_log: _RunLog) -> int:
  """Logs the traceback (to the run log; to the console too with --verbosity), writes the
  supervisor's failure record, prints the error last; returns the exit code."""
  code = EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else EXIT_FAILED
  step = train.failed_step(error)
  message = "Interrupted." if code == EXIT_INTERRUPTED else _message(error)
  tb = "".join(traceback.format_exception(error))
  run_log.lines.append(f"Failed at step {step}:\n{tb}")
  if VERBOSE:
    sys.stderr.write(tb)
  if failure_file := os.environ.get("TRECVIT_FAILURE_FILE"):
    digest = hashlib.sha256(f"{type(error).__name__}: {error}".encode()).hexdigest()[:12]
    try:
      pathlib.Path(failure_file).write_text(f"step={step} error={digest}\n{message}\n")
    except OSError as e:
      logging.warning("Could not write the failure record %s: %s", failure_file, e)
  log_path = run_log.write(workdir)
  std_logging.shutdown()
  if log_path:
    sys.stderr.write(f"Full log and traceback: {log_path}\n")
  elif not VERBOSE:
    sys.stderr.write("(--verbosity=0 shows the traceback)\n")
  sys.stderr.write(f"Error: {message}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  return code


def main(argv):
  del argv
  run_log = _RunLog()
  std_logging.getLogger().addHandler(run_log)
  if not flags.FLAGS["verbosity"].present:
    logging.get_absl_handler().addFilter(_Quiet())
  workdir = _WORKDIR.value
  try:
    if not os.environ.get("JAX_PLATFORMS") and _cpu_only_host():
      # With the `tpu` extra installed, JAX's plugin discovery starts libtpu on every host; on
      # one without TPUs it queries the TPU metadata of a cloud VM and prints "E0000 ...
      # unexpected worker hostname". JAX_PLATFORMS=cpu does the same.
      jax.config.update("jax_platforms", "cpu")
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
    result = train.train_and_evaluate(_CONFIG.value, workdir)
  except BaseException as error:  # noqa: BLE001 (every failure ends as one message and a code)
    code = _report_failure(error, workdir, run_log)
    # Not sys.exit: interpreter shutdown would wait in jax.distributed's shutdown barrier for
    # processes that are stuck in a collective, and print their threads' complaints.
    os._exit(code)
  code = checkpointing.EXIT_PREEMPTED if result.preempted else 0
  if not checkpointing.preemption_service_running():  # that service's handler already says 42
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))  # the outcome is decided: keep it
  run_log.write(workdir)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
