"""Reads every record of a converted dataset and reports the shards that are not whole.

  python -m data_pipelines.verify --data DIR [--split S] [--threads N]

For every shard of every split (or only --split): opens it (footer and record index), reads each
record on its own (so one bad ArrayRecord chunk costs one record, not the rest of the shard),
parses its header and decodes every JPEG frame and its point tracks. Prints one line per bad
shard, with its readable / unreadable record counts and the first error, then one summary line
per split:

  BAD DIR/train.array_record-00003-of-00064: 117 readable, 1 unreadable (record 42: ...)
  train: 64 shards, 8123 records readable, 1 unreadable, 1 bad shard(s)

Exit status 0 when every record of every shard reads, 1 otherwise (a missing or incomplete
split, a shard that does not open, any unreadable record). It reads everything, so it takes
about as long as one epoch of JPEG decoding; shards are checked in --threads threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from concurrent import futures

from etils import epath

from data_pipelines import records, shards


@dataclasses.dataclass
class ShardReport:
  """What reading one shard found."""

  path: str
  readable: int = 0
  unreadable: int = 0
  open_error: str | None = None  # the shard did not open: its records could not be counted
  first_error: str | None = None

  @property
  def ok(self) -> bool:
    return self.open_error is None and self.unreadable == 0

  def line(self) -> str:
    """The report line of a bad shard."""
    if self.open_error is not None:
      return f"BAD {self.path}: does not open, 0 readable, all unreadable ({self.open_error})"
    return (
      f"BAD {self.path}: {self.readable} readable, {self.unreadable} unreadable "
      f"({self.first_error})"
    )


def _check_record(data: bytes) -> None:
  """Decodes the header, every frame and the tracks; raises on anything wrong."""
  decoded = records.decode(data)
  header = records.read_header(data)
  if decoded["frames"].shape[1:3] != (header["height"], header["width"]):
    raise ValueError(f"frames are {decoded['frames'].shape[1:3]}, header says otherwise")


def verify_shard(path: str) -> ShardReport:
  """Reads and decodes every record of one shard."""
  report = ShardReport(path)
  try:
    reader = shards.open_reader(path)
  except ValueError as e:
    report.open_error = str(e)
    return report
  try:
    for i in range(reader.num_records()):
      try:
        _check_record(reader.read([i])[0])
        report.readable += 1
      except Exception as e:  # noqa: BLE001  -- any failure means this record is unusable
        report.unreadable += 1
        if report.first_error is None:
          report.first_error = f"record {i}: {type(e).__name__}: {e}"
  finally:
    reader.close()
  return report


def verify_split(data_dir: str, split: str, threads: int = 8) -> list[ShardReport]:
  """Reports of every shard of a split, in index order; ValueError if the split is incomplete."""
  paths = shards.find_shards(data_dir, split)
  with futures.ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
    return list(pool.map(verify_shard, paths))


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point: 0 when every record reads, 1 otherwise."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="dataset directory (local or gs://)")
  parser.add_argument("--split", default=None, help="only this split (default: every split)")
  threads = min(8, os.cpu_count() or 1)
  parser.add_argument(
    "--threads", type=int, default=threads, help=f"shards read at once (default: {threads})"
  )
  args = parser.parse_args(argv)
  data = epath.Path(args.data)
  if not data.is_dir():
    what = "is a file, not a directory" if data.exists() else "does not exist"
    print(f"verify: error: data directory {data} {what}.", file=sys.stderr)
    return 1
  splits = [args.split] if args.split else shards.list_splits(data)
  if not splits:
    print(f"verify: error: no shards (*.array_record-*) in {data}.", file=sys.stderr)
    return 1
  all_ok = True
  for split in splits:
    try:
      reports = verify_split(args.data, split, args.threads)
    except ValueError as e:  # missing or incomplete split
      print(f"{split}: {e}")
      all_ok = False
      continue
    for report in reports:
      if not report.ok:
        print(report.line())
    bad = [r for r in reports if not r.ok]
    unreadable = sum(r.unreadable for r in reports)
    unopened = sum(r.open_error is not None for r in reports)
    print(
      f"{split}: {len(reports)} shards, {sum(r.readable for r in reports)} records readable, "
      f"{unreadable} unreadable"
      + (f" (+ {unopened} shard(s) that do not open)" if unopened else "")
      + f", {len(bad)} bad shard(s)"
    )
    all_ok &= not bad
  return 0 if all_ok else 1


if __name__ == "__main__":
  sys.exit(main())
