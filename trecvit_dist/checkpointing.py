"""Orbax checkpoints under WORKDIR/checkpoints, and preemption (SIGTERM) handling.

One directory per step with items `state` (params, opt_state, step, rng), `data_iter` (the
input iterator's state after exactly `step` batches) and `config` (the run's config as JSON).
Saves are asynchronous: the loop only waits for the device-to-host copy; every process writes
the shards it holds. The iterator state depends only on the global example position (see
data_pipelines/pipeline.py), so it is the same on every process and one copy is saved; a run
saved with P processes resumes with any other number.

Resume order, written once: existing checkpoint in the workdir -> config.init_from -> scratch.
A checkpoint a process died in the middle of writing is an Orbax temporary directory that is
never listed as a step: it is reported by name and removed. If checkpoints exist and none can
be read, we fail rather than start over.

Multi-process agreement (same save steps, same restored step, same iterator state) goes through
the jax.distributed coordination service with a timeout; a timeout names the missing processes.
The save benchmark is `python -m trecvit_dist.checkpoint_bench`.
"""

from __future__ import annotations

import hashlib
import json
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
BARRIER_TIMEOUT_S = 300  # Orbax's own default for its barriers


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


# ----------------------------------------------------------------------------- agreement


def _client():
  from jax._src import distributed  # noqa: PLC0415 (the only handle on the coordination service)

  return distributed.global_state.client


def agree(name: str, value: str, timeout_s: float = BARRIER_TIMEOUT_S) -> list[str]:
  """Every process's `value` for barrier `name` (unique per use), in process order.

  Uses the coordination service, not a device collective, so it has a timeout: when some
  processes do not arrive in time, the error names them. Single process: [value].
  """
  if jax.process_count() == 1:
    return [value]
  client = _client()
  if client is None:
    # Multi-process without jax.distributed (not used by main.py): a collective, no timeout.
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
    return [str(v) for v in multihost_utils.process_allgather(digest).reshape(-1)]
  prefix = f"trecvit/{name}/"
  client.key_value_set(prefix + str(jax.process_index()), value)
  try:
    client.wait_at_barrier(f"trecvit/{name}", int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 (the service raises a generic runtime error)
    arrived = {int(k.rsplit("/", 1)[-1]) for k, _ in client.key_value_dir_get(prefix)}
    missing = sorted(set(range(jax.process_count())) - arrived)
    raise CheckpointError(
      f"Processes {missing} of {jax.process_count()} did not reach '{name}' within "
      f"{timeout_s:.0f}s (this is process {jax.process_index()}). They crashed, hang, or took a "
      f"different path; see their logs. ({type(e).__name__}: {e})"
    ) from e
  values = dict(client.key_value_dir_get(prefix))
  return [values[prefix + str(p)] for p in range(jax.process_count())]


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{"a/b": leaf} of nested mappings (dicts or Orbax tree metadata)."""
  flat = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      flat.update(_flatten(v, f"{prefix}{k}/"))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  from flax import traverse_util  # noqa: PLC0415

  return traverse_util.unflatten_dict(flat, sep="/")


def _short(error: Exception) -> str:
  """The error without TensorStore's multi-kilobyte spec dumps."""
  return f"{type(error).__name__}: {str(error).split(' [tensorstore_spec')[0]}"


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- checkpointer


def _type_handlers():
  """The default Orbax type handlers, with replica-parallel array saving only on TPU.

  Replica-parallel saving slices every replicated array with a compiled op per shape, on the
  loop's thread: on CPU that blocked the first save of the data-parallel tiny model for 7 s
  (Orbax already turns it off on GPU; see docs/benchmarks.md). Without it, replica 0 of each
  shard is written by the process holding it, so every process still writes its own shards.
  """
  types = ocp.type_handlers
  registry = types.create_type_handler_registry(
    *((ty, types.get_type_handler(ty)) for ty in types.supported_types())
  )
  if jax.default_backend() != "tpu":
    default = types.get_type_handler(jax.Array)
    registry.add(
      jax.Array,
      types.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=getattr(default, "_array_metadata_store", None),
      ),
      override=True,
      ignore_warnings=True,
    )
  return registry


class Checkpointer:
  """Async Orbax CheckpointManager with the project's items and resume policy."""

  def __init__(
    self,
    workdir: str,
    *,
    every_steps: int,
    keep: int,
    keep_every_steps: int = 0,
    barrier_timeout_s: float = BARRIER_TIMEOUT_S,
    read_only: bool = False,
  ):
    """read_only: another run's checkpoints (init_from): nothing is created or removed."""
    self.directory = epath.Path(workdir) / "checkpoints"
    self.every_steps = every_steps
    self.barrier_timeout_s = barrier_timeout_s
    # Listed before the manager exists: it removes them when it starts.
    self.skipped = [] if read_only else self.incomplete()
    if not read_only:
      self.directory.mkdir(parents=True, exist_ok=True)
    # With active_processes set, Orbax's barriers go through the coordination service with a
    # timeout (instead of a device collective that waits forever for a dead process).
    multiprocessing = ocp.options.MultiprocessingOptions(
      active_processes=set(range(jax.process_count())) if jax.process_count() > 1 else None
    )
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.handlers.PyTreeCheckpointHandler(
      multiprocessing_options=multiprocessing, type_handler_registry=_type_handlers()
    )
    registry.add("state", ocp.args.PyTreeSave, state_handler)
    registry.add("state", ocp.args.PyTreeRestore, state_handler)
    for item in ("data_iter", "config"):
      handler = ocp.handlers.JsonCheckpointHandler(multiprocessing_options=multiprocessing)
      registry.add(item, ocp.args.JsonSave, handler)
      registry.add(item, ocp.args.JsonRestore, handler)
    preservation = [ocp.checkpoint_managers.LatestN(keep)]
    if keep_every_steps:
      preservation.append(ocp.checkpoint_managers.EveryNSteps(keep_every_steps))
    options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation),
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=False,  # made above; Orbax refuses create=True with active_processes
      multiprocessing_options=multiprocessing,
      async_options=ocp.options.AsyncOptions(timeout_secs=int(barrier_timeout_s)),
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
    self.blocking_ms: list[float] = []  # per save: how long the training loop waited
    self._reported = 0

  def incomplete(self) -> list[str]:
    """Step directories that a killed process left half-written (Orbax temporary dirs)."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force=False) -> bool:
    """Starts an async save; returns whether one started. Records how long the loop blocked.

    Every process must call this with the same arguments at every step; a process that
    decides differently (or sees another iterator state) stops the run with an error.
    """
    if not force and (not self.every_steps or step % self.every_steps):
      return False
    if step in self.manager.all_steps():
      return False
    start = time.perf_counter()
    mine = _digest([step, data_state])
    values = agree(f"save_{step}", mine, self.barrier_timeout_s)
    if len(set(values)) > 1:
      raise CheckpointError(
        f"Processes disagree on the checkpoint of step {step} (digests of step and iterator "
        f"state by process: {values}); refusing to write a checkpoint mixing them."
      )
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data_iter=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_json),
      ),
      force=True,
    )
    self.blocking_ms.append((time.perf_counter() - start) * 1e3)
    return True

  def take_blocking_ms(self) -> float | None:
    """The longest blocking time of the saves since the last call (None: no new save)."""
    new = self.blocking_ms[self._reported :]
    self._reported = len(self.blocking_ms)
    return max(new) if new else None

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint; None when there is none.

    abstract_state: jax.ShapeDtypeStructs with the shardings to restore onto (any mesh).
    """
    for name in self.skipped:
      logging.warning(
        "Skipping incomplete checkpoint %s (its save never finished: the process died or a "
        "write failed); removing it.",
        self.directory / name,
      )
    steps = self.steps()
    errors = []
    result = None
    for step in reversed(steps):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
              item=abstract_state,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            ),
            data_iter=ocp.args.JsonRestore(),
          ),
        )
        result = step, restored.state, restored.data_iter
        break
      except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the previous one)
        logging.warning(
          "Checkpoint step %d in %s is unreadable, trying the previous one: %s",
          step,
          self.directory,
          _short(e),
        )
        errors.append(f"step {step}: {_short(e)}")
    if steps and result is None:
      raise CheckpointError(
        f"Checkpoints exist in {self.directory} (steps {steps}) but none can be read:\n  "
        + "\n  ".join(errors)
        + "\nRefusing to start over silently. Fix or move the checkpoints directory."
      )
    restored_step = "none" if result is None else str(result[0])
    values = agree("restore", restored_step, self.barrier_timeout_s)
    if len(set(values)) > 1:
      raise CheckpointError(
        f"Processes restored different checkpoints (step by process: {values}) from "
        f"{self.directory}; a process cannot read what the others can."
      )
    return result

  def read(self, step: int | None = None) -> tuple[int, dict, dict]:
    """(step, state as numpy arrays, data_state) of a step (default: newest), on any host."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint under {self.directory}.")
    tree = self.manager.item_metadata(step)["state"].tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=tree, restore_args=as_numpy),
        data_iter=ocp.args.JsonRestore(),
      ),
    )
    return step, restored.state, restored.data_iter

  def load_params(self, like: dict[str, jax.Array]) -> tuple[int, dict[str, jax.Array]]:
    """(step, params) of the newest checkpoint: only `params`, only keys of `like` (flat, "/"
    separated) whose saved shape equals theirs, restored straight onto their shardings."""
    step = self.manager.latest_step()
    if step is None:
      raise CheckpointError(f"No checkpoint under {self.directory}.")
    saved = _flatten(self.manager.item_metadata(step)["state"]["params"])
    wanted = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
      for k, v in like.items()
      if k in saved and tuple(saved[k].shape) == tuple(v.shape)
    }
    item = {"params": _unflatten(wanted)}
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      ),
    )
    return step, _flatten(restored.state["params"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------- preemption


class PreemptionWatcher:
  """SIGTERM -> every process stops at the same step, after which the loop saves and exits 42.

  Multi-process (jax.distributed, any platform): JAX's preemption sync service, whose own
  SIGTERM handler tells the coordination service, which picks a step every process reaches.
  Single process: a Python SIGTERM handler sets a flag that the loop reads after each step.
  Multi-process with the service disabled: the flag, OR-ed over processes every `sync_every`
  steps (a collective).
  """

  def __init__(self, sync_every: int = 1):
    self.flag = False
    self.sync_every = max(1, sync_every)
    self.use_service = jax.process_count() > 1 and _preemption_service_running()
    self._installed = not self.use_service
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing the current step, then saving.")
    self.flag = True

  def should_stop(self, step: int) -> bool:
    """Called by every process after every step; True at the same step on all of them."""
    if self.use_service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.flag
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
    return bool(np.any(flags))

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    # A failing run gets the old handler back at once (so a SIGTERM stops it); a finishing one
    # keeps this handler until close(), after its last save, which a SIGTERM must not cut short.
    if exc_type is not None:
      self.close()

  def close(self) -> None:
    """Puts back the SIGTERM handler that was there before."""
    if self._installed:
      # None: the old handler was not installed from Python; the default is the best guess.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def _preemption_service_running() -> bool:
  from jax._src import distributed  # noqa: PLC0415

  state = distributed.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None
