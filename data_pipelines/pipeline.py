"""Grain input pipelines: ArrayRecord video records -> per-process numpy batches.

  train_iterator(...) -> infinite, checkpointable iterator of
      {"video": float32 [B/P, T, H, W, 3] in [0, 1], "label": int32 [B/P], stats}
  eval_iterator(...)  -> one finite pass of
      {"video": float32 [B/P, V, T, H, W, 3], "label": int32 [B/P], "mask": bool [B/P], stats}
      with V = num_clips * num_crops views, ordered clip-major (v = clip * num_crops + crop).
  global_batch(local_batch, sharding) -> dict of global jax.Arrays (stats/* keys left out).
  check_split(data_dir, split) -> number of records, after opening every shard.

B is the global batch size, P the number of processes, T = num_frames, H = W = image_size.

Point tracks (num_points = Q > 0; records converted with tracks, e.g. from TAP-Vid). Both
iterators then add
  "tracks": float32 [B/P, Q, T, 2]  (x, y) in output pixels (the clip's crop, resize and flip
                                    applied: a flipped clip mirrors x); pixel j spans [j, j + 1)
  "occluded": bool [B/P, Q, T]      also True where a point left the crop
  "query_points": float32 [B/P, Q, 3]  (t, y, x): t the clip frame, (y, x) the point there
  "point_mask": bool [B/P, Q]       False only for rows without any visible point (and padding)
The Q points are drawn among those visible in at least one frame of the clip, repeated when
fewer exist: train picks them and each one's query frame (uniform over its visible frames) from
the example's random stream; eval takes the first Q in record order, each queried at its first
visible frame (TAP-Vid "first" mode), and needs V = 1 view.

Statistics. Every batch carries "stats/skipped_records" and "stats/looped_clips", int32 numpy
scalars: in this process's rows of this batch, the corrupt records skipped (only with
skip_corrupt_records) and the examples whose video is shorter than the clip span (their frame
indices loop, see transforms.clip_indices). They stay on the host: global_batch ignores them.

Order of the global batches (training). The dataset is an endless stream of example positions
g = 0, 1, 2, ...; position g is record perm_e[g mod N] of epoch e = g // N, where perm_e is a
permutation of the N records drawn from (seed, e): every epoch is a new global shuffle. Global
batch k is positions [kB, (k+1)B), and process p of P takes rows [p B/P, (p+1) B/P) of it. All
per-example randomness (clip start, crop, scale, flip, RandAugment) comes from
np.random.default_rng([seed, g, 1]) (point choice and query frames from [seed, g, 2]). So the
global batches depend only on (seed, data, B), never on P or on worker_count: 1 process and 2
processes train on identical batches.

Corrupt records. A record that cannot be read (an ArrayRecord chunk failing its checksum) or
decoded raises CorruptRecordError naming the shard file and the record index. With
skip_corrupt_records=True, training replaces it by the record at position-seeded random indices
[seed, g, 3, attempt] (the first readable one), so the batches stay a pure function of (seed,
data, B); evaluation drops it from the metrics (mask False) instead, since a replacement would
count another video twice. Both count it in stats/skipped_records.

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

import bisect
import dataclasses
import logging
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
_MAX_REPLACEMENTS = 16  # corrupt replacements in a row before a split counts as too damaged
STATS_PREFIX = "stats/"  # batch keys that stay on the host (counts, not model inputs)


class CorruptRecordError(ValueError):
  """A record that cannot be read or decoded; the message names its shard file and index."""


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


def _check_clip_args(
  num_frames: int, stride: int, image_size: int, worker_count: int, num_points: int
) -> None:
  for name, value in (("num_frames", num_frames), ("stride", stride), ("image_size", image_size)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}.")
  if num_points < 0:
    raise ValueError(f"num_points must be >= 0 (0: no point tracks), got {num_points}.")


def _verify_hint(data_dir: str, split: str) -> str:
  return (
    f"`python -m data_pipelines.verify --data {data_dir} --split {split}` lists every bad record"
  )


def _shard_sizes(data_dir: str, split: str) -> tuple[list[str], list[int]]:
  """(shard paths, records per shard) of a split; ValueError naming what is missing or broken."""
  paths = shards.find_shards(data_dir, split)  # fast checks first, with the fix in the message
  try:
    counts = shards.record_counts(paths)
  except ValueError as e:
    raise ValueError(
      f"{e}. Split {split!r} in {data_dir} has a corrupt or truncated shard: re-convert the split "
      f"(or restore the file from a copy); {_verify_hint(data_dir, split)}."
    ) from e
  if sum(counts) == 0:
    raise ValueError(
      f"Split {split!r} in {data_dir} has {len(paths)} shard(s) but no records (every video "
      f"skipped?); see {epath.Path(data_dir) / (split + '.summary.json')}."
    )
  return paths, counts


def check_split(data_dir: str, split: str) -> int:
  """Opens every shard of a split (footer and record index, no record read); returns the number
  of records. ValueError naming the missing directory, split or unreadable shard, and the fix."""
  return sum(_shard_sizes(data_dir, split)[1])


@dataclasses.dataclass
class _Records:
  """The records of a split, read by global index; errors name the shard file and index."""

  source: Any  # ArrayRecordDataSource over every shard, in index order
  paths: tuple[str, ...]
  ends: tuple[int, ...]  # ends[s] = number of records in shards 0..s
  data_dir: str
  split: str

  def __len__(self) -> int:
    return self.ends[-1]

  def where(self, index: int) -> str:
    """Human-readable location of a record: its shard file and index there."""
    shard = bisect.bisect_right(self.ends, index)
    local = index - (self.ends[shard - 1] if shard else 0)
    return f"record {local} of shard {self.paths[shard]} (record {index} of split {self.split!r})"

  def corrupt(self, index: int, what: str, error: Exception) -> CorruptRecordError:
    """The error for an unreadable record, naming it and the ways out."""
    return CorruptRecordError(
      f"Cannot {what} {self.where(index)}: {type(error).__name__}: {error}. The shard is corrupt: "
      "re-convert it, or set skip_corrupt_records=True (config data.skip_corrupt_records) to "
      f"skip and count bad records; {_verify_hint(self.data_dir, self.split)}."
    )

  def read(self, indices: Sequence[int]) -> list[bytes | CorruptRecordError]:
    """The records at indices; an unreadable one comes back as its CorruptRecordError."""
    try:
      return list(self.source.__getitems__(list(indices)))
    except Exception:  # noqa: BLE001  -- one bad chunk fails the batch read: find which one(s)
      out: list[bytes | CorruptRecordError] = []
      for i in indices:
        try:
          out.append(self.source[i])
        except Exception as e:  # noqa: BLE001  -- Riegeli raises RuntimeError variants
          out.append(self.corrupt(i, "read", e))
      return out

  def header(self, index: int, data: bytes | CorruptRecordError) -> dict[str, Any]:
    """The record's header; CorruptRecordError when it does not parse."""
    if isinstance(data, CorruptRecordError):
      raise data
    try:
      return records.read_header(data)
    except Exception as e:  # noqa: BLE001  -- anything from a bad header means a bad record
      raise self.corrupt(index, "decode", e) from e

  def decode(self, index: int, data: bytes, frame_indices: np.ndarray, decoder: str) -> dict:
    """records.decode of the selected frames; CorruptRecordError when a JPEG or track is bad."""
    try:
      return records.decode(data, frame_indices, decoder=decoder)
    except Exception as e:  # noqa: BLE001  -- libjpeg errors, truncated payloads, ...
      raise self.corrupt(index, "decode", e) from e


def _open_records(data_dir: str, split: str) -> _Records:
  paths, counts = _shard_sizes(data_dir, split)
  # "path[0:n]" tells Grain each shard's size, so it does not open every shard a second time.
  source = array_record_data_source.ArrayRecordDataSource(
    [f"{path}[0:{n}]" for path, n in zip(paths, counts, strict=True)]
  )
  ends = tuple(int(e) for e in np.cumsum(counts))
  return _Records(source, tuple(paths), ends, str(data_dir), split)


@dataclasses.dataclass(frozen=True)
class _Clip:
  """What every example is turned into; picklable, shipped to the worker processes."""

  num_frames: int
  stride: int
  image_size: int
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  jpeg_decoder: str
  num_points: int


@dataclasses.dataclass
class _Common:
  """What train and eval batches share: the records, this process's rows, the clip."""

  records: _Records
  global_batch_size: int
  local_batch_size: int
  row_offset: int
  clip: _Clip
  skip_corrupt_records: bool

  @property
  def num_records(self) -> int:
    return len(self.records)


def _build(
  data_dir: str,
  split: str,
  *,
  global_batch_size: int,
  num_frames: int,
  stride: int,
  image_size: int,
  process_index: int | None,
  process_count: int | None,
  worker_count: int,
  mean: Sequence[float] | None,
  std: Sequence[float] | None,
  jpeg_decoder: str,
  num_points: int,
  skip_corrupt_records: bool,
) -> _Common:
  """The one builder behind train_iterator and eval_iterator: checks, opens, slices."""
  local, offset = _process_slice(global_batch_size, process_index, process_count)
  _check_clip_args(num_frames, stride, image_size, worker_count, num_points)
  split_records = _open_records(data_dir, split)
  if num_points:
    _check_has_tracks(split_records, num_points)
  clip = _Clip(
    num_frames, stride, image_size, _tuple(mean), _tuple(std), jpeg_decoder, int(num_points)
  )
  return _Common(split_records, global_batch_size, local, offset, clip, bool(skip_corrupt_records))


def _no_tracks_error(where: str, num_points: int) -> ValueError:
  return ValueError(
    f"{where} has no point tracks but num_points={num_points} was asked: use data converted "
    "with tracks (`python -m data_pipelines.convert --tapvid ...`, or a synthetic tracking "
    "dataset), or set num_points=0."
  )


def _check_has_tracks(split_records: _Records, num_points: int) -> None:
  """Fails before training when the split's first record has no tracks (a whole-split mistake)."""
  data = split_records.read([0])[0]
  if isinstance(data, CorruptRecordError):
    return  # reported (or skipped) where it is read
  try:
    header = records.read_header(data)
  except Exception:  # noqa: BLE001  -- a corrupt header is reported (or skipped) where it is read
    return
  if not header["num_points"]:
    raise _no_tracks_error(split_records.where(0), num_points)


@dataclasses.dataclass
class _Points:
  """The point targets of one example (see the module docstring)."""

  tracks_QT2: np.ndarray
  occluded_QT: np.ndarray
  query_Q3: np.ndarray
  mask: bool


def _select_points(
  decoded: dict[str, Any],
  box: transforms.Box,
  image_size: int,
  flip: bool,
  num_points: int,
  rng: np.random.Generator | None,
) -> _Points:
  """Transforms the clip's tracks with its frames and picks num_points query points.

  rng None: the first visible points in record order, queried at their first visible frame
  (evaluation); else random points, each queried at a random frame where it is visible.
  """
  tracks_QT2, occluded_QT = transforms.transform_points(
    decoded["tracks"], decoded["occluded"], box, image_size, flip
  )
  visible_QT = ~occluded_QT
  candidates = np.flatnonzero(visible_QT.any(axis=1))
  num_frames = visible_QT.shape[1]
  if candidates.size == 0:
    return _Points(
      np.zeros((num_points, num_frames, 2), np.float32),
      np.ones((num_points, num_frames), bool),
      np.zeros((num_points, 3), np.float32),
      False,
    )
  if rng is None:
    chosen = np.resize(candidates, num_points)  # cycles through them when fewer than Q
  elif candidates.size >= num_points:
    chosen = rng.choice(candidates, num_points, replace=False)
  else:
    chosen = np.resize(rng.permutation(candidates), num_points)
  visible = visible_QT[chosen]
  if rng is None:
    query_t = visible.argmax(axis=1)
  else:
    kth = rng.integers(0, visible.sum(axis=1))  # the kth visible frame of each point
    query_t = (np.cumsum(visible, axis=1) > kth[:, None]).argmax(axis=1)
  tracks = tracks_QT2[chosen]
  xy = tracks[np.arange(num_points), query_t]
  query = np.stack([query_t.astype(np.float32), xy[:, 1], xy[:, 0]], axis=-1)
  return _Points(tracks, occluded_QT[chosen], query.astype(np.float32), True)


def _points_batch(rows: list[_Points | None], num_points: int, num_frames: int) -> dict:
  """Stacks per-row point targets; None rows (padding, skipped) have no visible point."""
  n = len(rows)
  tracks = np.zeros((n, num_points, num_frames, 2), np.float32)
  occluded = np.ones((n, num_points, num_frames), bool)
  query = np.zeros((n, num_points, 3), np.float32)
  mask = np.zeros((n, num_points), bool)
  for row, p in enumerate(rows):
    if p is not None:
      tracks[row], occluded[row], query[row], mask[row] = (
        p.tracks_QT2,
        p.occluded_QT,
        p.query_Q3,
        p.mask,
      )
  return dict(tracks=tracks, occluded=occluded, query_points=query, point_mask=mask)


def _stats(skipped: int, looped: int) -> dict[str, np.int32]:
  return {
    f"{STATS_PREFIX}skipped_records": np.int32(skipped),
    f"{STATS_PREFIX}looped_clips": np.int32(looped),
  }


@dataclasses.dataclass
class _Example:
  """One decoded, augmented training example."""

  label: int
  flip: bool
  looped: bool
  points: _Points | None


@dataclasses.dataclass
class _TrainBatches:
  """Batch number k -> this process's rows of global batch k (runs in Grain workers)."""

  common: _Common
  start_position: int
  seed: int
  flip: bool
  randaugment: bool
  scale_jitter: tuple[float, float]

  def __post_init__(self):
    self._perms: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_perms"] = {}  # recomputed lazily in each worker instead of being pickled
    return state

  @property
  def num_records(self) -> int:
    return self.common.num_records

  @property
  def global_batch_size(self) -> int:
    return self.common.global_batch_size

  def _record_index(self, position: int) -> int:
    epoch, offset = divmod(position, self.num_records)
    if epoch not in self._perms:
      if len(self._perms) > 1:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
    return int(self._perms[epoch][offset])

  def _example(
    self, index: int, data: bytes | CorruptRecordError, position: int, out_THW3: np.ndarray
  ) -> _Example:
    """Writes the augmented clip of one example into out."""
    # The trailing constant separates this stream from the shuffle's (seed, epoch) stream.
    rng = np.random.default_rng([self.seed, position, 1])
    c, split_records = self.common.clip, self.common.records
    header = split_records.header(index, data)
    if c.num_points and not header["num_points"]:
      raise _no_tracks_error(split_records.where(index), c.num_points)
    num_video_frames = header["num_frames"]
    span = transforms.clip_span(c.num_frames, c.stride)
    start = transforms.random_start(rng, num_video_frames, span)
    indices = transforms.clip_indices(num_video_frames, c.num_frames, c.stride, start)
    decoded = split_records.decode(index, data, indices, c.jpeg_decoder)
    box = transforms.train_box(
      rng, header["height"], header["width"], c.image_size, self.scale_jitter
    )
    transforms.crop_resize(decoded["frames"], box, c.image_size, out=out_THW3)
    # Drawn even when flipping is off, so flip=False changes nothing else about the example.
    flip = bool(rng.random() < 0.5) and self.flip
    if self.randaugment:
      out_THW3[:] = transforms.randaugment(out_THW3, rng)
    points = None
    if c.num_points:
      # Its own stream: the points do not change when RandAugment is switched on or off.
      points_rng = np.random.default_rng([self.seed, position, 2])
      points = _select_points(decoded, box, c.image_size, flip, c.num_points, points_rng)
    return _Example(header["label"], flip, num_video_frames < span, points)

  def _example_or_replacement(
    self, index: int, data: bytes | CorruptRecordError, position: int, out_THW3: np.ndarray
  ) -> tuple[_Example, int]:
    """The example at position, a deterministic replacement if its record is corrupt (and
    skip_corrupt_records); returns it and the number of corrupt records skipped."""
    skipped = 0
    for attempt in range(_MAX_REPLACEMENTS + 1):
      try:
        return self._example(index, data, position, out_THW3), skipped
      except CorruptRecordError as e:
        if not self.common.skip_corrupt_records:
          raise
        logging.warning("Skipping a corrupt record (skip_corrupt_records=True): %s", e)
        skipped += 1
        index = int(
          np.random.default_rng([self.seed, position, 3, attempt]).integers(self.num_records)
        )
        data = self.common.records.read([index])[0]
    raise CorruptRecordError(
      f"{_MAX_REPLACEMENTS + 1} records read for example position {position} were all corrupt: "
      f"split {self.common.records.split!r} in {self.common.records.data_dir} is badly damaged; "
      f"re-convert it ({_verify_hint(self.common.records.data_dir, self.common.records.split)})."
    )

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    common, c = self.common, self.common.clip
    first = self.start_position + k * common.global_batch_size + common.row_offset
    positions = range(first, first + common.local_batch_size)
    indices = [self._record_index(g) for g in positions]
    datas = common.records.read(indices)
    video = np.empty((len(datas), c.num_frames, c.image_size, c.image_size, 3), np.uint8)
    label = np.empty(len(datas), np.int32)
    flip = np.zeros(len(datas), bool)
    points: list[_Points | None] = []
    skipped = looped = 0
    for row, (index, data, g) in enumerate(zip(indices, datas, positions, strict=True)):
      example, n = self._example_or_replacement(index, data, g, video[row])
      label[row], flip[row] = example.label, example.flip
      points.append(example.points)
      skipped, looped = skipped + n, looped + example.looped
    batch = dict(video=transforms.normalize(video, c.mean, c.std, flip), label=label)
    if c.num_points:
      batch.update(_points_batch(points, c.num_points, c.num_frames))
    batch.update(_stats(skipped, looped))
    return batch


@dataclasses.dataclass
class _EvalBatches:
  """Batch number k -> this process's rows of eval batch k, views = clips x crops."""

  common: _Common
  num_clips: int
  num_crops: int

  def _example(
    self, index: int, data: bytes | CorruptRecordError
  ) -> tuple[np.ndarray, int, bool, _Points | None]:
    c, split_records = self.common.clip, self.common.records
    header = split_records.header(index, data)
    if c.num_points and not header["num_points"]:
      raise _no_tracks_error(split_records.where(index), c.num_points)
    num_video_frames = header["num_frames"]
    span = transforms.clip_span(c.num_frames, c.stride)
    starts = transforms.eval_starts(num_video_frames, span, self.num_clips)
    indices = np.concatenate(
      [transforms.clip_indices(num_video_frames, c.num_frames, c.stride, s) for s in starts]
    )
    decoded = split_records.decode(index, data, indices, c.jpeg_decoder)
    frames = decoded["frames"]
    boxes = transforms.eval_boxes(header["height"], header["width"], c.image_size, self.num_crops)
    views = [
      transforms.crop_resize(frames[i * c.num_frames : (i + 1) * c.num_frames], box, c.image_size)
      for i in range(self.num_clips)
      for box in boxes
    ]
    points = None
    if c.num_points:  # one view (checked by eval_iterator): its clip and its box
      points = _select_points(decoded, boxes[0], c.image_size, False, c.num_points, None)
    return np.stack(views), header["label"], num_video_frames < span, points

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    common, c = self.common, self.common.clip
    first = k * common.global_batch_size + common.row_offset
    positions = np.arange(first, first + common.local_batch_size)
    mask = positions < common.num_records
    num_views = self.num_clips * self.num_crops
    video = np.zeros(
      (len(positions), num_views, c.num_frames, c.image_size, c.image_size, 3), np.uint8
    )
    label = np.zeros(len(positions), np.int32)
    points: list[_Points | None] = [None] * len(positions)
    valid = [int(g) for g in positions[mask]]
    skipped = looped = 0
    for row, (index, data) in enumerate(zip(valid, common.records.read(valid), strict=True)):
      try:
        video[row], label[row], was_looped, points[row] = self._example(index, data)
      except CorruptRecordError as e:
        if not common.skip_corrupt_records:
          raise
        # Dropped from the metrics rather than replaced: a replacement would count twice.
        logging.warning("Skipping a corrupt record (skip_corrupt_records=True): %s", e)
        mask[row], skipped = False, skipped + 1
        continue
      looped += was_looped
    batch = dict(video=transforms.normalize(video, c.mean, c.std), label=label, mask=mask)
    if c.num_points:
      batch.update(_points_batch(points, c.num_points, c.num_frames))
    batch.update(_stats(skipped, looped))
    return batch


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
  num_points: int = 0,
  skip_corrupt_records: bool = False,
) -> TrainIterator:
  """Endless, checkpointable iterator of this process's training batches (see module doc)."""
  lo, hi = scale_jitter
  if not 0 < lo <= hi:
    raise ValueError(f"scale_jitter must be (lo, hi) with 0 < lo <= hi, got {scale_jitter}.")
  common = _build(
    data_dir,
    split,
    global_batch_size=global_batch_size,
    num_frames=num_frames,
    stride=stride,
    image_size=image_size,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    mean=mean,
    std=std,
    jpeg_decoder=jpeg_decoder,
    num_points=num_points,
    skip_corrupt_records=skip_corrupt_records,
  )
  batches = _TrainBatches(
    common=common,
    start_position=0,
    seed=int(seed),
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
  num_points: int = 0,
  skip_corrupt_records: bool = False,
) -> EvalIterator:
  """One deterministic pass over a split, padded to whole global batches (see module doc)."""
  if num_clips < 1 or num_crops < 1:
    raise ValueError(f"num_clips and num_crops must be >= 1, got {num_clips}, {num_crops}.")
  if num_points and num_clips * num_crops != 1:
    raise ValueError(
      f"num_points={num_points} needs one eval view (tracks are per clip and crop), got "
      f"num_clips={num_clips} x num_crops={num_crops}: set both to 1."
    )
  common = _build(
    data_dir,
    split,
    global_batch_size=global_batch_size,
    num_frames=num_frames,
    stride=stride,
    image_size=image_size,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    mean=mean,
    std=std,
    jpeg_decoder=jpeg_decoder,
    num_points=num_points,
    skip_corrupt_records=skip_corrupt_records,
  )
  batches = _EvalBatches(common=common, num_clips=num_clips, num_crops=num_crops)
  num_batches = math.ceil(common.num_records / global_batch_size)
  return EvalIterator(batches, num_batches, worker_count)


def _tuple(x: Sequence[float] | None) -> tuple[float, ...] | None:
  return None if x is None else tuple(float(v) for v in x)


def global_batch(local_batch: dict[str, np.ndarray], sharding_or_shardings: Any) -> dict[str, Any]:
  """Assembles this process's rows into global jax.Arrays (batch dim split over processes).

  sharding_or_shardings: one jax.sharding.Sharding for every key (its PartitionSpec names the
  batch axis first, e.g. P(("data", "fsdp"))), or a dict key -> Sharding. Keys starting with
  "stats/" (host-side counts) are left out.
  """
  import jax

  local_batch = {k: v for k, v in local_batch.items() if not k.startswith(STATS_PREFIX)}
  if isinstance(sharding_or_shardings, Mapping):
    shardings = sharding_or_shardings
  else:
    shardings = {k: sharding_or_shardings for k in local_batch}
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
    for k, v in local_batch.items()
  }
