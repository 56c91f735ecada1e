"""Grain input pipelines: ArrayRecord video records -> per-process numpy batches.

  train_iterator(...) -> infinite, checkpointable iterator of
      {"video": float32 [B/P, T, H, W, 3] in [0, 1], "label": int32 [B/P]}
  eval_iterator(...)  -> one finite pass of
      {"video": float32 [B/P, V, T, H, W, 3], "label": int32 [B/P], "mask": bool [B/P]}
      with V = num_clips * num_crops views, ordered clip-major (v = clip * num_crops + crop).
  global_batch(local_batch, sharding) -> dict of global jax.Arrays.

B is the global batch size, P the number of processes, T = num_frames, H = W = image_size.

Order of the global batches (training). The dataset is an endless stream of example positions
g = 0, 1, 2, ...; position g is record perm_e[g mod N] of epoch e = g // N, where perm_e is a
permutation of the N records drawn from (seed, e): every epoch is a new global shuffle. Global
batch k is positions [kB, (k+1)B), and process p of P takes rows [p B/P, (p+1) B/P) of it. All
per-example randomness (clip start, crop, scale, flip, RandAugment) comes from
np.random.default_rng([seed, g]). So the global batches depend only on (seed, data, B), never on
P or on worker_count: 1 process and 2 processes train on identical batches.

Per process, batch k is computed by one call of a Grain MapDataset over batch numbers (decode
only the sampled frames' JPEGs, sample, augment, normalise, stack); `worker_count` >= 1 runs
these calls in that many spawned worker processes (Grain mp_prefetch, round-robin, so the order
does not depend on the worker count), each keeping up to 2 finished batches ready. With 0 the
main process computes them, one batch ahead in a background thread.

Checkpointing. `it.get_state()` is a JSON-serialisable dict
  {"kind": "trecvit_train_iterator", "version": 1, "next_position": g, "global_batches": k,
   "seed": s, "global_batch_size": B, "num_records": N}
that does not depend on the process or worker count: a run saved with 2 processes resumes with
1 (or 8). `it.set_state(state)` restarts the pipeline (and its workers) at position g, so the
following batches are exactly those an uninterrupted run would have produced. A different
global batch size on resume continues the same example stream from g. A different seed or
number of records is refused (the stream would silently change). The iterator is a Grain
DatasetIterator, so grain.checkpoint.CheckpointSave/CheckpointRestore work with Orbax (they
write one file per process; every process writes the same state).

Evaluation visits records 0..N-1 in order, once, padded with zero videos (label 0, mask False)
to a whole number of global batches, so every process yields ceil(N / B) batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from array_record.python import array_record_data_source
from etils import epath

from data_pipelines import labels as labels_lib
from data_pipelines import records, shards, transforms

_ENDLESS = 2**62  # number of batch indices of the "infinite" training MapDataset
_STATE_KIND = "trecvit_train_iterator"
_STATE_VERSION = 1
_PER_WORKER_BUFFER = 2


def read_classes(data_dir: str) -> list[str]:
  """Class names of a dataset: line i of DATA/classes.txt is label i."""
  path = epath.Path(data_dir) / labels_lib.CLASSES_FILE
  if not path.exists():
    raise ValueError(
      f"{path} not found. Data directories are made by `python -m data_pipelines.convert` or "
      "`python -m data_pipelines.synthetic`, which write classes.txt."
    )
  return labels_lib.read_classes_file(path)


def _process_slice(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  """Validates the batch split; returns (local batch size, this process's row offset)."""
  if process_index is None or process_count is None:
    import jax  # lazy: worker processes import this module and never need JAX

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"Need 0 <= process_index < process_count, got {process_index}, {process_count}."
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}; "
      f"use a multiple of {process_count}, e.g. "
      f"{math.ceil(global_batch_size / process_count) * process_count}."
    )
  local = global_batch_size // process_count
  return local, process_index * local


def _check_clip_args(num_frames: int, stride: int, image_size: int, worker_count: int) -> None:
  for name, value in (("num_frames", num_frames), ("stride", stride), ("image_size", image_size)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}.")


def _open_source(data_dir: str, split: str) -> array_record_data_source.ArrayRecordDataSource:
  paths = shards.find_shards(data_dir, split)  # fast checks first, with the fix in the message
  source = array_record_data_source.ArrayRecordDataSource(paths)
  if len(source) == 0:
    raise ValueError(
      f"Split {split!r} in {data_dir} has {len(paths)} shard(s) but no records (every video "
      f"skipped?); see {epath.Path(data_dir) / (split + '.summary.json')}."
    )
  return source


@dataclasses.dataclass(frozen=True)
class _Clip:
  """What every example is turned into; picklable, shipped to the worker processes."""

  num_frames: int
  stride: int
  image_size: int
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  jpeg_decoder: str


@dataclasses.dataclass
class _TrainBatches:
  """Batch number k -> this process's rows of global batch k (runs in Grain workers)."""

  source: Any
  num_records: int
  global_batch_size: int
  local_batch_size: int
  row_offset: int
  start_position: int
  seed: int
  clip: _Clip
  flip: bool
  randaugment: bool
  scale_jitter: tuple[float, float]

  def __post_init__(self):
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_perms"] = {}  # recomputed lazily in each worker instead of being pickled
    return state

  def _record_index(self, position: int) -> int:
    epoch, offset = divmod(position, self.num_records)
    if epoch not in self._perms:
      if len(self._perms) > 1:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
    return int(self._perms[epoch][offset])

  def _example(self, data: bytes, position: int, out_THW3: np.ndarray) -> tuple[int, bool]:
    """Writes the augmented clip of one example into out; returns (label, flip)."""
    # The trailing constant separates this stream from the shuffle's (seed, epoch) stream.
    rng = np.random.default_rng([self.seed, position, 1])
    c = self.clip
    header = records.read_header(data)
    num_video_frames = header["num_frames"]
    span = transforms.clip_span(c.num_frames, c.stride)
    start = transforms.random_start(rng, num_video_frames, span)
    indices = transforms.clip_indices(num_video_frames, c.num_frames, c.stride, start)
    frames = records.decode(data, indices, decoder=c.jpeg_decoder)["frames"]
    box = transforms.train_box(
      rng, header["height"], header["width"], c.image_size, self.scale_jitter
    )
    transforms.crop_resize(frames, box, c.image_size, out=out_THW3)
    # Drawn even when flipping is off, so flip=False changes nothing else about the example.
    flip = bool(rng.random() < 0.5) and self.flip
    if self.randaugment:
      out_THW3[:] = transforms.randaugment(out_THW3, rng)
    return header["label"], flip

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    first = self.start_position + k * self.global_batch_size + self.row_offset
    positions = range(first, first + self.local_batch_size)
    datas = self.source.__getitems__([self._record_index(g) for g in positions])
    c = self.clip
    video = np.empty((len(datas), c.num_frames, c.image_size, c.image_size, 3), np.uint8)
    label = np.empty(len(datas), np.int32)
    flip = np.zeros(len(datas), bool)
    for row, (data, g) in enumerate(zip(datas, positions, strict=True)):
      label[row], flip[row] = self._example(data, g, video[row])
    return dict(video=transforms.normalize(video, c.mean, c.std, flip), label=label)


@dataclasses.dataclass
class _EvalBatches:
  """Batch number k -> this process's rows of eval batch k, views = clips x crops."""

  source: Any
  num_records: int
  global_batch_size: int
  local_batch_size: int
  row_offset: int
  clip: _Clip
  num_clips: int
  num_crops: int

  def _example(self, data: bytes) -> tuple[np.ndarray, int]:
    c = self.clip
    header = records.read_header(data)
    num_video_frames = header["num_frames"]
    starts = transforms.eval_starts(
      num_video_frames, transforms.clip_span(c.num_frames, c.stride), self.num_clips
    )
    indices = np.concatenate(
      [transforms.clip_indices(num_video_frames, c.num_frames, c.stride, s) for s in starts]
    )
    frames = records.decode(data, indices, decoder=c.jpeg_decoder)["frames"]
    boxes = transforms.eval_boxes(header["height"], header["width"], c.image_size, self.num_crops)
    views = [
      transforms.crop_resize(frames[i * c.num_frames : (i + 1) * c.num_frames], box, c.image_size)
      for i in range(self.num_clips)
      for box in boxes
    ]
    return np.stack(views), header["label"]

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    c = self.clip
    first = k * self.global_batch_size + self.row_offset
    positions = np.arange(first, first + self.local_batch_size)
    mask = positions < self.num_records
    num_views = self.num_clips * self.num_crops
    video = np.zeros(
      (len(positions), num_views, c.num_frames, c.image_size, c.image_size, 3), np.uint8
    )
    label = np.zeros(len(positions), np.int32)
    valid = [int(g) for g in positions[mask]]
    for row, data in enumerate(self.source.__getitems__(valid) if valid else []):
      video[row], label[row] = self._example(data)
    return dict(video=transforms.normalize(video, c.mean, c.std), label=label, mask=mask)


def _to_iter(batches: grain.MapDataset, worker_count: int) -> grain.IterDataset:
  if worker_count == 0:
    # One batch computed ahead in a thread of this process (JPEG decode and resize drop the GIL).
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  if not flags.FLAGS.is_parsed():
    # Grain reads its absl flags when it starts workers; outside an absl app (tests, notebooks,
    # the bench) they are unparsed. Defaults are right; an absl app still parses argv later.
    flags.FLAGS.mark_as_parsed()
  # In workers the process itself is the prefetcher: no extra threads or buffers there.
  ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(
      num_workers=worker_count, per_worker_buffer_size=_PER_WORKER_BUFFER
    )
  )


class TrainIterator(grain.DatasetIterator):
  """Endless iterator of training batches; state = global example position (see module doc)."""

  def __init__(self, batches: _TrainBatches, worker_count: int):
    super().__init__()
    self._batches = batches
    self._worker_count = worker_count
    self._consumed = 0  # batches yielded since start_position
    self._batches_before = 0  # global batches consumed before start_position (from a restore)
    self._it: grain.DatasetIterator | None = None

  def _iterator(self) -> grain.DatasetIterator:
    if self._it is None:
      ds = grain.MapDataset.range(_ENDLESS).map(self._batches)
      self._it = iter(_to_iter(ds, self._worker_count))
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._iterator())
    self._consumed += 1
    return batch

  @property
  def next_position(self) -> int:
    """Global example position where the next global batch starts."""
    b = self._batches
    return b.start_position + self._consumed * b.global_batch_size

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable, process-count independent state (see module docstring)."""
    b = self._batches
    return dict(
      kind=_STATE_KIND,
      version=_STATE_VERSION,
      next_position=self.next_position,
      global_batches=self._batches_before + self._consumed,
      seed=b.seed,
      global_batch_size=b.global_batch_size,
      num_records=b.num_records,
    )

  def set_state(self, state: Mapping[str, Any] | bytes | str) -> None:
    """Restarts the pipeline at the state's position; the next batches match the saved run."""
    if isinstance(state, (bytes, str)):
      import json

      state = json.loads(state)
    if state.get("kind") != _STATE_KIND or state.get("version") != _STATE_VERSION:
      raise ValueError(f"Not a train iterator state of version {_STATE_VERSION}: {state!r}")
    b = self._batches
    for key, mine in (("seed", b.seed), ("num_records", b.num_records)):
      if state[key] != mine:
        raise ValueError(
          f"Iterator state has {key}={state[key]} but this pipeline has {key}={mine}: resuming "
          "would change the example stream. Restore with the original seed and data."
        )
    self._close_inner()
    self._batches = dataclasses.replace(b, start_position=int(state["next_position"]))
    self._consumed = 0
    self._batches_before = int(state["global_batches"])

  def start_prefetch(self) -> None:
    """Starts the workers now (e.g. while the model restores) instead of at the first batch."""
    self._iterator().start_prefetch()

  def _close_inner(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    """Stops the worker processes."""
    self._close_inner()
    self._closed = True


class EvalIterator(Iterator[dict[str, np.ndarray]]):
  """One pass over a split; len() is the number of batches (equal on every process)."""

  def __init__(self, batches: _EvalBatches, num_batches: int, worker_count: int):
    self._num_batches = num_batches
    ds = grain.MapDataset.range(num_batches).map(batches)
    self._it = iter(_to_iter(ds, worker_count))

  def __len__(self) -> int:
    return self._num_batches

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def close(self) -> None:
    """Stops the worker processes."""
    self._it.close()


def train_iterator(
  data_dir: str,
  split: str,
  *,
  global_batch_size: int,
  num_frames: int,
  stride: int,
  image_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  flip: bool = True,
  randaugment: bool = False,
  scale_jitter: tuple[float, float] = (0.875, 1.33),
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  jpeg_decoder: str = "simplejpeg",
) -> TrainIterator:
  """Endless, checkpointable iterator of this process's training batches (see module doc)."""
  local, offset = _process_slice(global_batch_size, process_index, process_count)
  _check_clip_args(num_frames, stride, image_size, worker_count)
  lo, hi = scale_jitter
  if not 0 < lo <= hi:
    raise ValueError(f"scale_jitter must be (lo, hi) with 0 < lo <= hi, got {scale_jitter}.")
  source = _open_source(data_dir, split)
  batches = _TrainBatches(
    source=source,
    num_records=len(source),
    global_batch_size=global_batch_size,
    local_batch_size=local,
    row_offset=offset,
    start_position=0,
    seed=int(seed),
    clip=_Clip(num_frames, stride, image_size, _tuple(mean), _tuple(std), jpeg_decoder),
    flip=flip,
    randaugment=randaugment,
    scale_jitter=(float(lo), float(hi)),
  )
  return TrainIterator(batches, worker_count)


def eval_iterator(
  data_dir: str,
  split: str,
  *,
  global_batch_size: int,
  num_frames: int,
  stride: int,
  image_size: int,
  num_clips: int = 1,
  num_crops: int = 1,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  mean: Sequence[float] | None = None,
  std: Sequence[float] | None = None,
  jpeg_decoder: str = "simplejpeg",
) -> EvalIterator:
  """One deterministic pass over a split, padded to whole global batches (see module doc)."""
  local, offset = _process_slice(global_batch_size, process_index, process_count)
  _check_clip_args(num_frames, stride, image_size, worker_count)
  if num_clips < 1 or num_crops < 1:
    raise ValueError(f"num_clips and num_crops must be >= 1, got {num_clips}, {num_crops}.")
  source = _open_source(data_dir, split)
  batches = _EvalBatches(
    source=source,
    num_records=len(source),
    global_batch_size=global_batch_size,
    local_batch_size=local,
    row_offset=offset,
    clip=_Clip(num_frames, stride, image_size, _tuple(mean), _tuple(std), jpeg_decoder),
    num_clips=num_clips,
    num_crops=num_crops,
  )
  return EvalIterator(batches, math.ceil(len(source) / global_batch_size), worker_count)


def _tuple(x: Sequence[float] | None) -> tuple[float, ...] | None:
  return None if x is None else tuple(float(v) for v in x)


def global_batch(local_batch: dict[str, np.ndarray], sharding_or_shardings: Any) -> dict[str, Any]:
  """Assembles this process's rows into global jax.Arrays (batch dim split over processes).

  sharding_or_shardings: one jax.sharding.Sharding for every key (its PartitionSpec names the
  batch axis first, e.g. P(("data", "fsdp"))), or a dict key -> Sharding.
  """
  import jax

  if isinstance(sharding_or_shardings, Mapping):
    shardings = sharding_or_shardings
  else:
    shardings = {k: sharding_or_shardings for k in local_batch}
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
    for k, v in local_batch.items()
  }
