"""ArrayRecord shard files of a split: names, atomic writing, discovery.

A split is the set `DIR/{split}.array_record-{i:05d}-of-{n:05d}`, i in [0, n). Writers create
`DIR/.tmp.{name}` and rename it when the shard is complete, so a file with a final name is
always whole; readers only accept complete sets (all n indices, one n).
"""

from __future__ import annotations

import contextlib
import os
import re
from concurrent import futures

from array_record.python import array_record_module
from etils import epath

WRITER_OPTIONS = "group_size:1"  # one record per chunk: a random access reads one video only
READER_OPTIONS = "readahead_buffer_size:0"  # random access: read only the requested chunks
_OPEN_THREADS = 16  # shards opened at once: opening reads a footer and index (remote on gs://)


def shard_name(split: str, index: int, count: int) -> str:
  """File name of shard `index` of `count` of a split."""
  return f"{split}.array_record-{index:05d}-of-{count:05d}"


def _shard_regex(split: str) -> re.Pattern:
  return re.compile(rf"{re.escape(split)}\.array_record-(\d{{5}})-of-(\d{{5}})")


class AtomicShardWriter:
  """Context manager writing one shard under a temporary name; renamed on success only."""

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self._tmp = self.path.parent / f".tmp.{self.path.name}"
    self._writer = array_record_module.ArrayRecordWriter(os.fspath(self._tmp), WRITER_OPTIONS)
    self.num_records = 0

  def write(self, record: bytes) -> None:
    """Appends one record."""
    self._writer.write(record)
    self.num_records += 1

  def __enter__(self) -> AtomicShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is None:
      os.replace(self._tmp, self.path)
    else:
      self._tmp.unlink(missing_ok=True)


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """Writes a small text file via a temporary name and a rename."""
  path = epath.Path(path)
  tmp = path.parent / f".tmp.{path.name}"
  tmp.write_text(text)
  tmp.rename(path)


def existing_shard_counts(data_dir: epath.PathLike, split: str) -> dict[int, list[int]]:
  """Maps shard count n -> sorted shard indices present for the split in data_dir."""
  regex = _shard_regex(split)
  found: dict[int, list[int]] = {}
  for p in epath.Path(data_dir).glob(f"{split}.array_record-*"):
    m = regex.fullmatch(p.name)
    if m:
      found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
  return {n: sorted(idx) for n, idx in found.items()}


def list_splits(data_dir: epath.PathLike) -> list[str]:
  """Names of the splits that have at least one shard in data_dir."""
  regex = re.compile(r"(.+)\.array_record-\d{5}-of-\d{5}")
  return sorted(
    {m.group(1) for p in epath.Path(data_dir).iterdir() if (m := regex.fullmatch(p.name))}
  )


def find_shards(data_dir: epath.PathLike, split: str) -> list[str]:
  """Paths of the complete shard set of a split, in index order; ValueError naming the fix."""
  data_dir = epath.Path(data_dir)
  if not data_dir.exists():
    raise ValueError(
      f"Data directory {data_dir} does not exist. Create it with `python -m "
      "data_pipelines.synthetic --out DIR ...` or `python -m data_pipelines.convert ... --out DIR`."
    )
  if not data_dir.is_dir():
    raise ValueError(
      f"Data directory {data_dir} is a file, not a directory: point to the directory that holds "
      "the shards (made by `python -m data_pipelines.convert` or `data_pipelines.synthetic`)."
    )
  if not any(data_dir.iterdir()):
    raise ValueError(
      f"Data directory {data_dir} is empty. Fill it with "
      "`python -m data_pipelines.synthetic --out DIR ...` or `python -m data_pipelines.convert`."
    )
  counts = existing_shard_counts(data_dir, split)
  if not counts:
    raise ValueError(
      f"No shards for split {split!r} in {data_dir} (expected "
      f"{shard_name(split, 0, 1).replace('00000-of-00001', 'IIIII-of-NNNNN')}); splits present: "
      f"{list_splits(data_dir) or 'none'}. Convert that split or pick another split name."
    )
  if len(counts) > 1:
    raise ValueError(
      f"Split {split!r} in {data_dir} has shard sets of different sizes {sorted(counts)}; "
      "delete the stale set (an earlier conversion with another --num-shards)."
    )
  ((count, indices),) = counts.items()
  if indices != list(range(count)):
    missing = sorted(set(range(count)) - set(indices))
    raise ValueError(
      f"Split {split!r} in {data_dir} is incomplete: shards {missing[:5]} of {count} are "
      "missing (interrupted conversion?). Re-run the conversion."
    )
  return [os.fspath(data_dir / shard_name(split, i, count)) for i in range(count)]


def open_reader(path: str) -> array_record_module.ArrayRecordReader:
  """Opens one shard (reads its footer and record index); ValueError naming the file if broken."""
  try:
    reader = array_record_module.ArrayRecordReader(path, options=READER_OPTIONS)
  except Exception as e:  # noqa: BLE001  -- the C++ reader raises RuntimeError/OSError variants
    raise ValueError(f"Cannot open shard {path}: {type(e).__name__}: {e}") from e
  if not reader.ok():
    try:
      reader.read()  # re-raises the reader's stored error, which says what is wrong
      detail = "unknown error"
    except Exception as e:  # noqa: BLE001
      detail = str(e) or "its footer or record index is unreadable (truncated file?)"
    with contextlib.suppress(Exception):  # a failed reader re-raises its error on close too
      reader.close()
    raise ValueError(f"Cannot open shard {path}: {detail}")
  return reader


def record_counts(paths: list[str]) -> list[int]:
  """Number of records of each shard, opening them in parallel; ValueError naming a broken one."""

  def count(path: str) -> int:
    reader = open_reader(path)
    try:
      return reader.num_records()
    finally:
      reader.close()

  if not paths:
    return []
  with futures.ThreadPoolExecutor(min(_OPEN_THREADS, len(paths))) as pool:
    return list(pool.map(count, paths))
