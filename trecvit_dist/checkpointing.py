"""Orbax checkpoints under WORKDIR/checkpoints, and preemption (SIGTERM) handling.

One directory per step with items `state` (params, opt_state, step, rng), `data_iter` (the
input iterator's state after exactly `step` batches), `config` (the run's config as JSON) and
`checksums` (two 32-bit sums of every state array's bytes). Saves are asynchronous: the loop
only waits for the device-to-host copy; every process writes the shards it holds. The iterator
state depends only on the global example position (see data_pipelines/pipeline.py), so it is the
same on every process and one copy is saved; a run saved with P processes resumes with any other
number.

Resume order, written once: existing checkpoint in the workdir -> config.init_from -> scratch.
A checkpoint a process died in the middle of writing is an Orbax temporary directory that is
never listed as a step: it is reported by name and removed. A state with NaN or Inf is never
written. Every restored array is checked finite and against its checksums (Orbax 0.12 has no
checksums of array data, only of its own metadata, so flipped bytes in a data file would
otherwise restore silently); a step that fails is reported with the arrays and data files
concerned and skipped like an unreadable one, and the run falls back to the step before. When
the run reaches a skipped step again, the broken directory is moved aside as `N.corrupt` and
step N is saved anew. If checkpoints exist and none can be read, we fail rather than start over.

Multi-process agreement (same save steps, same restored step, same iterator state) goes through
the jax.distributed coordination service with a timeout; a timeout names the missing processes.
The save benchmark is `python -m trecvit_dist.checkpoint_bench`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Exit code that tells launchers "preempted, checkpoint saved, run the same command again".
EXIT_PREEMPTED = 42
BARRIER_TIMEOUT_S = 300  # Orbax's own default for its barriers


class CheckpointError(RuntimeError):
  pass


class CorruptCheckpointError(CheckpointError):
  """A checkpoint that reads but whose arrays are not finite or do not match their checksums."""


class NonFiniteStateError(FloatingPointError):
  """A state with NaN or Inf, which is never written to a checkpoint."""


def check_workdir(workdir: str) -> None:
  """Fails when the workdir (or a directory above it) is a file; creates nothing."""
  path = epath.Path(workdir)
  if path.is_file():
    raise CheckpointError(
      f"--workdir {workdir} is a file, not a directory. Give a directory: an existing run's to "
      "resume it, or a new one."
    )


def has_steps(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a step directory (complete or not; nothing is opened)."""
  directory = epath.Path(workdir) / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_workdir_writable(workdir: str) -> None:
  """Creates the workdir; fails fast (before any compile) when it cannot be written."""
  check_workdir(workdir)
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    files = [p for p in path.parents if p.is_file()]
    why = f"{files[0]} is a file" if files else str(e)
    raise CheckpointError(
      f"Workdir {workdir} is not writable ({why}). Pick a --workdir you can write to."
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


# ----------------------------------------------------------------------------- state checks


def _leaf_name(path) -> str:
  """A tree path as Orbax names the array in a checkpoint, e.g. "opt_state.1.0.mu.encoder.x"."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _partial_report(x) -> np.ndarray:
  """[sum of the 32-bit words, sum of their squares, NaN/Inf count] over the shards of x that
  this process holds as replica 0 (uint64; the sums to be taken modulo 2^32)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    pieces = [np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0]
  else:
    pieces = [np.asarray(x)]
  inexact = jnp.issubdtype(pieces[0].dtype, jnp.inexact) if pieces else False
  total = np.zeros(3, np.uint64)
  for a in pieces:
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.bool_ or a.dtype.itemsize < 4:  # widened: one word per element
      words = a.view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize]).astype(np.uint32)
    else:  # 8-byte elements give two words each
      words = a.view(np.uint32)
    total[0] += np.sum(words, dtype=np.uint64)
    total[1] += np.sum(words * words, dtype=np.uint64)  # the squares wrap modulo 2^32
    if inexact:
      total[2] += a.size - np.count_nonzero(np.isfinite(a))
  return total


def state_report(tree) -> tuple[dict[str, list[int]], list[str]]:
  """({array name: [sum of its 32-bit words, sum of their squares] mod 2^32}, names of the
  arrays holding NaN or Inf) of a state, the same on every process.

  Computed on the host from the shards each process holds (replica 0 only, so every element
  counts once): no compile, and sums modulo 2^32 do not depend on the order of the additions, so
  the same bytes give the same numbers on any mesh. Any single changed word changes the first
  sum. (The device copy costs what Orbax's own copy of a save costs.)
  """
  named = [(_leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if not named:
    return {}, []
  partial = np.stack([_partial_report(x) for _, x in named])
  partial[:, :2] %= 2**32
  if jax.process_count() > 1:
    gathered = multihost_utils.process_allgather(partial.astype(np.uint32))
    partial = np.asarray(gathered).reshape(-1, *partial.shape).astype(np.uint64).sum(axis=0)
  names = [name for name, _ in named]
  sums = {name: [int(v) % 2**32 for v in row[:2]] for name, row in zip(names, partial, strict=True)}
  return sums, [name for name, row in zip(names, partial, strict=True) if row[2]]


def non_finite_arrays(tree) -> list[str]:
  """Names of the arrays of a tree that hold NaN or Inf."""
  return state_report(tree)[1]


def _data_files(state_dir: epath.Path, names: list[str]) -> list[str]:
  """The files of a saved state's OCDBT database that hold the named arrays (best effort)."""
  try:
    import tensorstore as ts  # noqa: PLC0415 (Orbax's storage layer; only needed here)

    url = str(state_dir) if "://" in str(state_dir) else f"file://{state_dir}"
    kv = ts.KvStore.open(url.rstrip("/") + "/").result()
    manifest = ts.ocdbt.dump(kv).result()
    pending = [v["root"]["location"] for v in manifest["versions"][-1:]]
    wanted, files = set(names), set()
    while pending:
      node = pending.pop()
      for entry in ts.ocdbt.dump(kv, node).result().get("entries", []):
        for value in entry.values():
          if isinstance(value, str) and value.startswith("btreenode::"):
            pending.append(value)
        key = entry.get("key", b"")
        key = key.decode() if isinstance(key, bytes) else str(key)
        name, _, chunk = key.rpartition("/")
        if name not in wanted or chunk.startswith("."):  # .zarray: metadata, not data
          continue
        if "indirect_value" in entry:  # "value:ocdbt.process_0/:d/<file>:offset:length"
          base, name = entry["indirect_value"].removeprefix("value:").split(":")[:2]
          files.add(str(state_dir / (base + name)))
        else:  # stored inside the b-tree node's own file
          files.add(str(state_dir / node.removeprefix("btreenode::").split(":")[0]))
    return sorted(files)
  except Exception:  # noqa: BLE001 (a layout this lookup does not know: the caller names the dir)
    return []


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes / 2**10:.0f} KiB"


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
    self.read_only = read_only
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
    for item in ("data_iter", "config", "checksums"):
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
    self.unreadable: set[int] = set()  # steps restore_latest skipped: moved aside when re-saved
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
    decides differently (or sees another iterator state) stops the run with an error. A state
    with NaN or Inf raises NonFiniteStateError instead of being written.
    """
    if not force and (not self.every_steps or step % self.every_steps):
      return False
    if step in self.manager.all_steps():
      if step not in self.unreadable:
        return False
      self._move_aside(step)  # restore_latest skipped it: this run writes the step anew
    start = time.perf_counter()
    sums, non_finite = state_report(state)
    if non_finite:
      raise NonFiniteStateError(
        f"The state of step {step} holds NaN or Inf in {len(non_finite)} array(s), e.g. "
        f"{non_finite[:3]}: not writing it (training diverged at or before step {step}; the "
        f"newest complete checkpoint, step {self.manager.latest_step()}, is intact)."
      )
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
        checksums=ocp.args.JsonSave({"version": 1, "arrays": sums}),
      ),
      force=True,
    )
    self.blocking_ms.append((time.perf_counter() - start) * 1e3)
    num_bytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
    logging.info(
      "Checkpoint step %d: writing %s in the background (the loop waited %.0f ms).",
      step,
      _size(num_bytes),
      self.blocking_ms[-1],
    )
    return True

  def take_blocking_ms(self) -> float | None:
    """The longest blocking time of the saves since the last call (None: no new save)."""
    new = self.blocking_ms[self._reported :]
    self._reported = len(self.blocking_ms)
    return max(new) if new else None

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable, verified checkpoint; None when there is
    none. Steps skipped on the way are moved aside (`N.corrupt`) when the run saves them again.

    abstract_state: jax.ShapeDtypeStructs with the shardings to restore onto (any mesh).
    """
    for name in self.skipped:
      logging.warning(
        "Skipping incomplete checkpoint %s (its save never finished: the process died or a "
        "write failed); removing it.",
        self.directory / name,
      )
    steps = self.steps()
    errors, failed = [], []
    result = None
    for step in reversed(steps):
      try:
        result = step, *self._restore_verified(step, abstract_state)
        break
      except Exception as e:  # noqa: BLE001 (any unreadable checkpoint: try the previous one)
        problem = str(e) if isinstance(e, CorruptCheckpointError) else _short(e)
        logging.warning(
          "Checkpoint step %d in %s is unreadable, trying the previous one: %s",
          step,
          self.directory,
          problem,
        )
        errors.append(f"step {step}: {problem}")
        failed.append(step)
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
    self.unreadable.update(failed)
    return result

  def _restore_verified(self, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, data_state) of a step whose arrays are finite and match their checksums."""
    has_sums = (self.directory / str(step) / "checksums").exists()
    items = dict(
      state=ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
      ),
      data_iter=ocp.args.JsonRestore(),
    )
    if has_sums:
      items["checksums"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    sums, non_finite = state_report(restored.state)
    expected = restored.checksums["arrays"] if has_sums else {}
    mismatched = [n for n, v in sums.items() if n in expected and list(expected[n]) != v]
    if non_finite or mismatched:
      problems = [f"{n} does not match its checksums" for n in mismatched]
      problems += [f"{n} holds NaN or Inf" for n in non_finite if n not in mismatched]
      state_dir = self.directory / str(step) / "state"
      files = _data_files(state_dir, mismatched + non_finite) or [str(state_dir)]
      raise CorruptCheckpointError(
        f"corrupt: {'; '.join(problems[:3])}"
        + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        + f"; data file(s): {', '.join(files[:3])}"
      )
    if not has_sums:
      logging.info(
        "Checkpoint step %d has no checksums (written before they were added): its arrays "
        "were checked finite only.",
        step,
      )
    return restored.state, restored.data_iter

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step's directory to `N.corrupt` (kept for a post-mortem)."""
    source = self.directory / str(step)
    if jax.process_index() == 0:
      target, n = self.directory / f"{step}.corrupt", 1
      while target.exists():
        target, n = self.directory / f"{step}.corrupt.{n}", n + 1
      try:
        source.rename(target)
      except OSError as e:
        raise CheckpointError(
          f"Could not move the unreadable checkpoint {source} aside to save step {step} again "
          f"({e}); move or delete it by hand, then run again."
        ) from e
      logging.warning(
        "Moved the unreadable checkpoint step %d aside to %s to save step %d anew.",
        step,
        target,
        step,
      )
    agree(f"moved_aside_{step}", "", self.barrier_timeout_s)
    self.manager.reload()
    self.unreadable.discard(step)

  def saved_config(self) -> tuple[int, dict[str, Any]] | None:
    """(step, config as JSON) of the newest checkpoint whose config item reads; None if none
    (no checkpoint, or only ones written without a config)."""
    for step in reversed(self.steps()):
      if not (self.directory / str(step) / "config").exists():
        continue
      try:
        restored = self.manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
      except Exception as e:  # noqa: BLE001 (restore_latest reports unreadable steps)
        logging.info("The config of checkpoint step %d does not read: %s", step, _short(e))
        continue
      if isinstance(restored.config, dict):
        return step, restored.config
    return None

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
  """SIGTERM -> exit 42 with nothing lost since the last complete checkpoint.

  Start-up (with exit_until_started, until `started()`): no step has run since the last
  checkpoint, so a SIGTERM ends the process at once with exit 42, even in the middle of a
  minutes-long compile: a thread woken by signal.set_wakeup_fd exits, because a Python signal
  handler would only run once the compile returns.

  Training: every process stops at the same step, after which the loop saves and exits 42.
  Multi-process (jax.distributed, any platform): JAX's preemption sync service, whose own
  SIGTERM handler tells the coordination service, which picks a step every process reaches (it
  also covers start-up: the run continues to its first step, saves and exits 42).
  Single process: a Python SIGTERM handler sets a flag that the loop reads after each step.
  Multi-process with the service disabled: the flag, OR-ed over processes every `sync_every`
  steps (a collective).
  """

  def __init__(self, sync_every: int = 1, exit_until_started: bool = False):
    self.flag = False
    self.sync_every = max(1, sync_every)
    self.use_service = jax.process_count() > 1 and preemption_service_running()
    self._installed = not self.use_service
    self._exit_now = exit_until_started and self._installed
    self._wakeup: tuple[int, int] | None = None
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    if self._exit_now:
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)
      self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      self._wakeup = read_fd, write_fd
      threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()

  def _watch(self, read_fd: int) -> None:
    """Start-up: the C-level signal handler writes the signal number here at once."""
    while data := os.read(read_fd, 64):
      if signal.SIGTERM in data and self._exit_now:
        exit_preempted()
    os.close(read_fd)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    if self._exit_now:
      exit_preempted()
    logging.warning("SIGTERM received: finishing the current step, then saving.")
    self.flag = True

  def started(self) -> None:
    """Training begins: from now on a SIGTERM stops the loop after a step and a save."""
    self._exit_now = False

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
    """Puts back the SIGTERM handler (and wakeup fd) that was there before."""
    self._exit_now = False
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      os.close(self._wakeup[1])  # the watching thread reads EOF and closes its end
      self._wakeup = None
    if self._installed:
      # None: the old handler was not installed from Python; the default is the best guess.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def exit_preempted() -> None:
  """Ends the process as preempted: nothing has run since the last complete checkpoint."""
  sys.stderr.write(
    f"SIGTERM before training started: nothing to save; exiting with code {EXIT_PREEMPTED} "
    "(preempted: run the same command again to resume).\n"
  )
  sys.stderr.flush()
  os._exit(EXIT_PREEMPTED)


def preemption_service_running() -> bool:
  """Whether JAX's preemption sync service (with its own SIGTERM handler) runs in this job."""
  from jax._src import distributed  # noqa: PLC0415

  state = distributed.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None
