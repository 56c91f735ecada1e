"""Orbax checkpoints under WORKDIR/checkpoints, and preemption (SIGTERM) handling.

One directory per step with items `state` (params, opt_state, step, rng), `data_iter` (the
input iterator's state after exactly `step` batches) and `config` (the run's config as JSON).
Saves are asynchronous: the loop only waits for the device-to-host copy.

Resume order, written once: existing checkpoint in the workdir -> config.init_from -> scratch.
A checkpoint a process died in the middle of writing stays a temporary directory that Orbax
never lists; it is reported and skipped. If checkpoints exist and none can be read, we fail.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Exit code that tells launchers "preempted, checkpoint saved, run the same command again".
EXIT_PREEMPTED = 42


class CheckpointError(RuntimeError):
  pass


def check_workdir_writable(workdir: str) -> None:
  """Fails fast (before any compile) when the workdir cannot be written."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(
      f"Workdir {workdir} is not writable ({e}). Pick a --workdir you can write to."
    ) from e


class Checkpointer:
  """Async Orbax CheckpointManager with the project's items and resume policy."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, keep_every_steps: int = 0):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.every_steps = every_steps
    preservation = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every_steps:
      preservation.append(ocp.checkpoint_managers.EveryNSteps(keep_every_steps))
    options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation),
      cleanup_tmp_directories=False,  # we report torn checkpoints ourselves, then leave them
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data_iter", "config")
    )
    self.blocking_ms: list[float] = []

  def incomplete(self) -> list[str]:
    """Step directories that a killed process left half-written."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if "tmp" in p.name)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force=False) -> bool:
    """Starts an async save; returns whether one started. Records how long the loop blocked."""
    if not force and (not self.every_steps or step % self.every_steps):
      return False
    if step in self.manager.all_steps():
      return False
    start = time.perf_counter()
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json),
      ),
      force=True,
    )
    self.blocking_ms.append((time.perf_counter() - start) * 1e3)
    return True

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint; None when there is none."""
    for name in self.incomplete():
      logging.warning(
        "Skipping incomplete checkpoint %s (the process died while saving it).",
        self.directory / name,
      )
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore(),
          ),
        )
        return step, restored.state, restored.data_iter
      except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the previous one)
        logging.warning("Checkpoint step %d in %s is unreadable: %s", step, self.directory, e)
        errors.append(f"step {step}: {type(e).__name__}: {e}")
    if steps:
      raise CheckpointError(
        f"Checkpoints exist in {self.directory} (steps {steps}) but none can be read:\n  "
        + "\n  ".join(errors)
        + "\nRefusing to start over silently. Fix or move the checkpoints directory."
      )
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """SIGTERM -> every process stops at the same step, after which the loop saves and exits 42.

  Uses JAX's preemption sync service where it runs (TPU pods); elsewhere a SIGTERM handler sets
  a flag that all processes OR together every `sync_every` steps, so they agree on the step.
  """

  def __init__(self, sync_every: int = 1):
    self.flag = False
    self.sync_every = max(1, sync_every)
    self.use_service = jax.default_backend() == "tpu" and _preemption_service_running()
    if not self.use_service:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing the current step, then saving.")
    self.flag = True

  def should_stop(self, step: int) -> bool:
    if self.use_service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.flag
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
    return bool(np.any(flags))


def _preemption_service_running() -> bool:
  from jax._src import distributed  # noqa: PLC0415

  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
