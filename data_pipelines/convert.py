"""Converts videos + a label file into ArrayRecord shards of video records (see records.py).

  python -m data_pipelines.convert --videos DIR --labels FILE --out DIR --split NAME \
      --num-shards N [--short-side 256] [--fps F] [--workers W] [--jpeg-quality 90]

Writes
  OUT/{split}.array_record-{i:05d}-of-{n:05d}   one record per video, group_size 1 (random access)
  OUT/classes.txt                               one class name per line; line number = label id
  OUT/{split}.summary.json                      converted (count), skipped [{id, path, reason}], ...

Behaviour a long conversion run needs:
- Any FFmpeg container/codec PyAV can open. Frames are resized so the short side is --short-side
  (aspect kept; 0 keeps the original size) and JPEG-encoded. --fps F resamples in time: output
  frame k is the source frame on screen at time k/F.
- A missing, unreadable, truncated or empty video is skipped and listed with its reason in the
  summary; it never aborts the run. A video counts as truncated when its decoded frames cover
  clearly less than the duration its container announces, or fewer than its frame count says.
- Deterministic: videos are ordered by a hash of their id and cut into N contiguous shards, so
  the same command writes the same bytes and no video twice (duplicate ids are skipped), and each
  shard mixes classes even when the label file is sorted by class.
- Atomic: a shard is written under a temporary name and renamed when complete, so a file with
  the final name is always whole. Re-running overwrites the split's shards.
- classes.txt: an existing OUT/classes.txt is reused (so validation, converted after train, gets
  the same ids); a class missing from it is an error. Otherwise it is the sorted class names.
- Output must be a local (or mounted) directory: ArrayRecord writes local files and the rename
  is only atomic there. Copy to gs:// afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator

import av
from etils import epath
from tqdm import tqdm

from data_pipelines import labels as labels_lib
from data_pipelines import records, shards


class SkipVideo(Exception):
  """A video that cannot be converted; the message is the reason recorded in the summary."""


def _resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  if short_side <= 0:
    return height, width
  scale = short_side / min(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def _expected_duration(container, stream) -> float | None:
  """Duration the file announces for the video stream (seconds), if any."""
  if stream.duration is not None and stream.time_base is not None:
    return float(stream.duration * stream.time_base)
  if container.duration is not None:
    return container.duration / av.time_base
  return None


def decode_video(
  path: str, *, short_side: int, fps: float | None, jpeg_quality: int
) -> tuple[list[bytes], dict]:
  """Decodes one video to JPEG frames; raises SkipVideo with a reason when unusable."""
  try:
    container = av.open(path)
  except Exception as e:  # noqa: BLE001  -- FFmpeg raises many types; all mean "unreadable"
    raise SkipVideo(f"unreadable: {type(e).__name__}: {e}") from e
  with container:
    if not container.streams.video:
      raise SkipVideo("unreadable: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    source_fps = float(rate) if rate else 0.0
    jpegs: list[bytes] = []
    times: list[float] = []
    size = original = None
    # Resampling state: the frame on screen at output time k / fps is the last source frame
    # whose timestamp is <= k / fps; we hold the previous frame until the next one arrives.
    held: bytes | None = None
    next_k = 0
    t0 = None
    eps = 1e-3 / fps if fps else 0.0  # absorbs timestamp rounding (1/30 s in a 1/1000 time base)
    try:
      for index, frame in enumerate(container.decode(stream)):
        if original is None:
          original = (frame.height, frame.width)
          size = _resized_size(frame.height, frame.width, short_side)
        t = frame.time if frame.time is not None else index / (source_fps or 25.0)
        t0 = t if t0 is None else t0
        t -= t0
        rgb = frame.reformat(width=size[1], height=size[0], format="rgb24", interpolation="AREA")
        jpeg = records.encode_jpeg(rgb.to_ndarray(), jpeg_quality)
        times.append(t)
        if fps is None:
          jpegs.append(jpeg)
          continue
        while held is not None and next_k / fps < t - eps:
          jpegs.append(held)
          next_k += 1
        held = jpeg
    except Exception as e:  # noqa: BLE001
      raise SkipVideo(f"decode error after {len(times)} frames: {type(e).__name__}: {e}") from e
    if not times:
      raise SkipVideo("empty: no frames decoded")
    frame_period = 1.0 / source_fps if source_fps else (times[-1] / max(1, len(times) - 1))
    span = times[-1] + frame_period
    expected = _expected_duration(container, stream)
    if expected and span < expected - max(0.5, 0.1 * expected):
      raise SkipVideo(f"truncated: frames cover {span:.2f}s of the announced {expected:.2f}s")
    if stream.frames and len(times) < 0.9 * stream.frames:
      raise SkipVideo(f"truncated: decoded {len(times)} of {stream.frames} frames")
    if fps is not None:
      # The last source frame stays on screen for one source frame period.
      while next_k / fps < span - eps:
        jpegs.append(held)
        next_k += 1
  meta = dict(
    height=size[0],
    width=size[1],
    original_size=original,
    fps=float(fps) if fps is not None else source_fps,
  )
  return jpegs, meta


def _convert_one(task: tuple) -> tuple[int, bytes | None, str | None]:
  """Worker: (position, entry, label, options) -> (position, record or None, skip reason)."""
  position, entry, label, short_side, fps, jpeg_quality = task
  if entry.path is None:
    return position, None, f"missing: {entry.expected} not found"
  try:
    jpegs, meta = decode_video(
      entry.path, short_side=short_side, fps=fps, jpeg_quality=jpeg_quality
    )
    record = records.encode_jpegs(
      jpegs,
      video_id=entry.video_id,
      label=label,
      label_name=entry.label_name if label >= 0 else "",
      **meta,
    )
  except SkipVideo as e:
    return position, None, str(e)
  except Exception as e:  # noqa: BLE001  -- one bad video must not abort a day-long run
    return position, None, f"error: {type(e).__name__}: {e}"
  return position, record, None


def _shard_bounds(num_videos: int, num_shards: int) -> list[tuple[int, int]]:
  return [
    (s * num_videos // num_shards, (s + 1) * num_videos // num_shards) for s in range(num_shards)
  ]


def _results(tasks: list[tuple], workers: int) -> Iterator[tuple[int, bytes | None, str | None]]:
  """Converted videos in task order; spawn workers so FFmpeg/JAX threads never get forked."""
  if workers <= 1:
    yield from map(_convert_one, tasks)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(_convert_one, tasks, chunksize=1)


def convert(
  videos: str,
  labels_file: str,
  out: str,
  split: str,
  num_shards: int,
  *,
  short_side: int = 256,
  fps: float | None = None,
  workers: int = 1,
  jpeg_quality: int = records.DEFAULT_JPEG_QUALITY,
  progress: bool = True,
) -> dict:
  """Converts one split; returns the summary that is also written to OUT/{split}.summary.json."""
  if num_shards < 1:
    raise ValueError(f"--num-shards must be >= 1, got {num_shards}.")
  if fps is not None and fps <= 0:
    raise ValueError(f"--fps must be > 0, got {fps}.")
  if not os.path.isdir(videos):
    raise ValueError(f"--videos {videos!r} is not a directory.")
  if str(out).startswith("gs://"):
    raise ValueError("--out must be a local directory (atomic renames); copy to gs:// afterwards.")
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  stale = sorted(set(shards.existing_shard_counts(out_dir, split)) - {num_shards})
  if stale:
    raise ValueError(
      f"{out_dir} holds shards of split {split!r} from a run with --num-shards {stale[0]}; "
      "delete them first, readers would otherwise see two copies of the split."
    )

  entries = labels_lib.load_entries(labels_file, videos)
  classes, new_classes = labels_lib.resolve_classes(entries, out_dir)
  class_ids = {name: i for i, name in enumerate(classes)}

  skipped: list[dict] = []
  seen: set[str] = set()
  unique = []
  for entry in entries:
    if entry.video_id in seen:
      skipped.append(dict(id=entry.video_id, path=entry.path, reason="duplicate id"))
      continue
    seen.add(entry.video_id)
    unique.append(entry)
  # Hash order: deterministic, independent of the label file's order, and mixes classes.
  unique.sort(key=lambda e: hashlib.sha1(e.video_id.encode()).hexdigest())
  tasks = [
    (i, e, class_ids[e.label_name] if e.label_name else -1, short_side, fps, jpeg_quality)
    for i, e in enumerate(unique)
  ]

  if new_classes:
    # Written first so an interrupted train conversion still pins the ids for later splits.
    shards.write_text_atomic(out_dir / labels_lib.CLASSES_FILE, "".join(f"{c}\n" for c in classes))

  bounds = _shard_bounds(len(tasks), num_shards)
  records_per_shard = [0] * num_shards
  results = _results(tasks, workers)
  bar = tqdm(
    total=len(tasks), desc=f"convert {split}", unit="video", mininterval=1.0, disable=not progress
  )
  try:
    for shard, (start, end) in enumerate(bounds):
      with shards.AtomicShardWriter(out_dir / shards.shard_name(split, shard, num_shards)) as w:
        for _ in range(start, end):
          position, record, reason = next(results)
          entry = unique[position]
          if record is None:
            skipped.append(dict(id=entry.video_id, path=entry.path, reason=reason))
          else:
            w.write(record)
          bar.update(1)
      records_per_shard[shard] = w.num_records
  finally:
    bar.close()
    results.close()

  summary = dict(
    split=split,
    schema_version=records.SCHEMA_VERSION,
    num_shards=num_shards,
    converted=sum(records_per_shard),
    skipped=skipped,
    num_skipped=len(skipped),
    records_per_shard=records_per_shard,
    num_classes=len(classes),
    short_side=short_side,
    fps=fps,
    jpeg_quality=jpeg_quality,
    labels_file=os.path.abspath(labels_file),
  )
  shards.write_text_atomic(out_dir / f"{split}.summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--videos", required=True, help="directory holding the video files")
  parser.add_argument("--labels", required=True, help="CSV (path,label), Kinetics CSV or SSv2 JSON")
  parser.add_argument("--out", required=True, help="output directory (local)")
  parser.add_argument("--split", required=True, help="split name, e.g. train or validation")
  parser.add_argument("--num-shards", type=int, required=True)
  parser.add_argument("--short-side", type=int, default=256, help="0 keeps the original size")
  parser.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--jpeg-quality", type=int, default=records.DEFAULT_JPEG_QUALITY)
  args = parser.parse_args(argv)
  summary = convert(
    args.videos,
    args.labels,
    args.out,
    args.split,
    args.num_shards,
    short_side=args.short_side,
    fps=args.fps,
    workers=args.workers,
    jpeg_quality=args.jpeg_quality,
  )
  print(
    f"{args.split}: converted {summary['converted']}, skipped {summary['num_skipped']} "
    f"(see {os.path.join(args.out, args.split + '.summary.json')})",
    file=sys.stderr,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
