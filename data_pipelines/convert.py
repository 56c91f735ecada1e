"""Converts videos (or images, or TAP-Vid point tracks) into ArrayRecord shards of records.

  python -m data_pipelines.convert --videos DIR [--labels FILE] --out DIR --split NAME \
      --num-shards N [--short-side 256] [--fps F] [--workers W] [--jpeg-quality 90] \
      [--max-record-frames 2048] [--min-frames 1]
  python -m data_pipelines.convert --images DIR [--labels CSV] --out DIR --split NAME --num-shards N
  python -m data_pipelines.convert --tapvid PATH --out DIR --split NAME --num-shards N

Writes
  OUT/{split}.array_record-{i:05d}-of-{n:05d}   records (records.py), group_size 1 (random access)
  OUT/classes.txt                               one class name per line; line number = label id
  OUT/{split}.summary.json                      converted (videos), num_records, skipped
                                                [{id, path, reason}], ...

Sources:
- --videos: any FFmpeg container/codec PyAV can open. With --labels (generic `path,label` CSV,
  Kinetics CSV or SSv2 JSON, see labels.py) the listed videos; without, every video file under
  DIR (labels.VIDEO_EXTENSIONS), unlabelled (label -1, and an empty classes.txt when none
  exists), e.g. long videos for self-supervised or memorisation training.
- --images: a folder of images (with a `path,label` CSV, or all of them unlabelled), each a
  one-frame record of the same schema (fps 0), for joint image + video training.
- --tapvid: TAP-Vid pickles (labels.load_tapvid), unlabelled, with point tracks stored in the
  stored frames' pixels (the normalised points times the resized width and height).

Behaviour a long conversion run needs:
- Frames are resized so the short side is --short-side (aspect kept; 0 keeps the original size)
  and JPEG-encoded. --fps F resamples videos in time: output frame k is the source frame on screen
  at time k/F.
- Streaming: a video is decoded, resized and JPEG-encoded one frame at a time, never held whole
  in memory as pixels. A video longer than --max-record-frames N becomes several records with
  ids `id#0`, `id#1`, ... of consecutive frames (at most N each; the last two are balanced so no
  segment is shorter than N/2), so an hour-long file gives records of a few tens of MB that the
  pipeline samples clips from anywhere in. The default 2048 is 82 s at 25 fps: a clip never
  crosses a segment boundary, which costs a 63-frame span (32 frames at stride 2) 62 of the 2048
  possible starts per segment (3%). A training clip reads its whole record, 2048 JPEGs, so the
  record size is 2048 times the JPEG size of one frame: tens of MB for natural video at the
  default 256 short side (a few tens of KB per frame), 164 MB for pixel noise, the worst case
  (measured: 82 KB per 256x455 frame at quality 90). Lower --max-record-frames for such content
  or larger frames. Segments past the first are spooled by the worker to a temporary file in
  OUT, so a worker holds at most 1.5 N JPEGs and one record: converting a 6000-frame noise video
  peaked at 187 MB resident with N=256, against 1065 MB when the whole video was held (2-core VM).
- A missing, unreadable, truncated, empty or too short (< --min-frames) video is skipped and
  listed with its reason in the summary; it never aborts the run. A video counts as truncated
  when its decoded frames cover clearly less than the duration its container announces, or fewer
  than its frame count says. The run exits non-zero when it converted nothing.
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
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import av
import numpy as np
from etils import epath
from PIL import Image, ImageOps
from tqdm import tqdm

from data_pipelines import labels as labels_lib
from data_pipelines import records, shards

DEFAULT_MAX_RECORD_FRAMES = 2048  # see the module docstring for the sizes behind it
_SPOOL_LENGTH = struct.Struct("<Q")


class SkipVideo(Exception):
  """A video that cannot be converted; the message is the reason recorded in the summary."""


@dataclasses.dataclass(frozen=True)
class _Options:
  """How every video of a run is converted (shipped to the workers)."""

  kind: str  # "video", "image" or "tapvid"
  short_side: int
  fps: float | None
  jpeg_quality: int
  max_record_frames: int
  min_frames: int
  spool_prefix: str  # OUT/.tmp.spool.{split}: segments past a video's first go to such files


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


Frames = Iterator[tuple[bytes, dict]]  # (JPEG of one stored frame, the record's size/fps metadata)


def video_frames(path: str, *, short_side: int, fps: float | None, jpeg_quality: int) -> Frames:
  """Streams one video as JPEG frames, one decoded frame in memory at a time; raises SkipVideo
  with a reason when unusable (truncation is only known at the end)."""
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
    num_decoded = 0
    last_t = 0.0
    size = meta = None
    # Resampling state: the frame on screen at output time k / fps is the last source frame
    # whose timestamp is <= k / fps; we hold the previous frame until the next one arrives.
    held: bytes | None = None
    next_k = 0
    t0 = None
    eps = 1e-3 / fps if fps else 0.0  # absorbs timestamp rounding (1/30 s in a 1/1000 time base)
    decoded = container.decode(stream)
    while True:
      try:
        frame = next(decoded, None)
        if frame is None:
          break
        if size is None:
          size = _resized_size(frame.height, frame.width, short_side)
          meta = dict(
            height=size[0],
            width=size[1],
            original_size=(frame.height, frame.width),
            fps=float(fps) if fps is not None else source_fps,
          )
        t = frame.time if frame.time is not None else num_decoded / (source_fps or 25.0)
        t0 = t if t0 is None else t0
        t -= t0
        rgb = frame.reformat(width=size[1], height=size[0], format="rgb24", interpolation="AREA")
        jpeg = records.encode_jpeg(rgb.to_ndarray(), jpeg_quality)
      except Exception as e:  # noqa: BLE001
        raise SkipVideo(f"decode error after {num_decoded} frames: {type(e).__name__}: {e}") from e
      num_decoded += 1
      last_t = t
      if fps is None:
        yield jpeg, meta
        continue
      while held is not None and next_k / fps < t - eps:
        yield held, meta
        next_k += 1
      held = jpeg
    if not num_decoded:
      raise SkipVideo("empty: no frames decoded")
    frame_period = 1.0 / source_fps if source_fps else (last_t / max(1, num_decoded - 1))
    span = last_t + frame_period
    expected = _expected_duration(container, stream)
    if expected and span < expected - max(0.5, 0.1 * expected):
      raise SkipVideo(f"truncated: frames cover {span:.2f}s of the announced {expected:.2f}s")
    if stream.frames and num_decoded < 0.9 * stream.frames:
      raise SkipVideo(f"truncated: decoded {num_decoded} of {stream.frames} frames")
    if fps is not None:
      # The last source frame stays on screen for one source frame period.
      while next_k / fps < span - eps:
        yield held, meta
        next_k += 1


def decode_video(
  path: str, *, short_side: int, fps: float | None, jpeg_quality: int
) -> tuple[list[bytes], dict]:
  """Decodes one whole video to JPEG frames (short videos; the converter streams instead)."""
  jpegs, meta = [], {}
  for jpeg, frame_meta in video_frames(
    path, short_side=short_side, fps=fps, jpeg_quality=jpeg_quality
  ):
    jpegs.append(jpeg)
    meta = frame_meta
  return jpegs, meta


def _resize(image: Image.Image, short_side: int) -> Image.Image:
  height, width = _resized_size(image.height, image.width, short_side)
  if (height, width) == (image.height, image.width):
    return image
  # Pillow's bilinear filter widens with the scale factor: antialiased when shrinking.
  return image.resize((width, height), Image.Resampling.BILINEAR)


def image_frames(path: str, *, short_side: int, jpeg_quality: int) -> Frames:
  """One image as a one-frame video (EXIF orientation applied); SkipVideo when unreadable."""
  try:
    with Image.open(path) as im:
      image = ImageOps.exif_transpose(im).convert("RGB")
  except Exception as e:  # noqa: BLE001  -- PIL raises many types; all mean "unreadable"
    raise SkipVideo(f"unreadable: {type(e).__name__}: {e}") from e
  resized = _resize(image, short_side)
  meta = dict(
    height=resized.height,
    width=resized.width,
    original_size=(image.height, image.width),
    fps=0.0,
  )
  yield records.encode_jpeg(np.asarray(resized), jpeg_quality), meta


def tapvid_frames(entry: labels_lib.TapVidEntry, *, short_side: int, jpeg_quality: int) -> Frames:
  """The frames of a TAP-Vid video (array or encoded images), resized, as JPEGs."""
  meta = None
  for t, frame in enumerate(entry.video):
    try:
      if isinstance(frame, bytes):
        with Image.open(io.BytesIO(frame)) as im:
          image = im.convert("RGB")
      else:
        image = Image.fromarray(frame)
    except Exception as e:  # noqa: BLE001
      raise SkipVideo(f"unreadable frame {t}: {type(e).__name__}: {e}") from e
    if meta is None:
      original = (image.height, image.width)
      size = _resized_size(*original, short_side)
      meta = dict(height=size[0], width=size[1], original_size=original, fps=0.0)
    elif (image.height, image.width) != meta["original_size"]:
      raise SkipVideo(f"frame {t} is {image.height}x{image.width}, frame 0 {meta['original_size']}")
    image = image.resize((meta["width"], meta["height"]), Image.Resampling.BILINEAR)
    yield records.encode_jpeg(np.asarray(image), jpeg_quality), meta


def segment_records(
  frames: Frames,
  *,
  video_id: str,
  label: int,
  label_name: str,
  max_frames: int,
  min_frames: int = 1,
  points_QT2: np.ndarray | None = None,
  occluded_QT: np.ndarray | None = None,
) -> Iterator[bytes]:
  """Cuts a stream of frames into records of at most max_frames consecutive frames.

  One record keeps the video's id; several are `id#0`, `id#1`, ... Up to 1.5 max_frames JPEGs
  are held so that the last two segments can be balanced (each >= max_frames / 2). points_QT2
  are normalised (x, y) tracks over the whole video, scaled here to the stored frames' pixels.
  """
  buffer: list[bytes] = []
  start = 0  # video frame index of buffer[0]
  segment = 0
  meta: dict = {}

  def record(jpegs: list[bytes], first: int, record_id: str) -> bytes:
    tracks = occluded = None
    if points_QT2 is not None:
      scale = np.array([meta["width"], meta["height"]], np.float32)
      tracks = points_QT2[:, first : first + len(jpegs)] * scale
      occluded = occluded_QT[:, first : first + len(jpegs)]
    return records.encode_jpegs(
      jpegs,
      video_id=record_id,
      label=label,
      label_name=label_name,
      tracks=tracks,
      occluded=occluded,
      **meta,
    )

  for jpeg, meta in frames:  # noqa: B007  -- meta is the same dict for every frame
    buffer.append(jpeg)
    if len(buffer) >= max_frames + max_frames // 2:
      yield record(buffer[:max_frames], start, f"{video_id}#{segment}")
      segment, start, buffer = segment + 1, start + max_frames, buffer[max_frames:]
  total = start + len(buffer)
  if total == 0:
    raise SkipVideo("empty: no frames decoded")
  if total < min_frames:
    raise SkipVideo(f"too short: {total} frames < --min-frames {min_frames}")
  if not buffer:  # max_frames 1: every frame already went out
    parts = []
  elif len(buffer) <= max_frames:
    parts = [buffer]
  else:
    half = (len(buffer) + 1) // 2
    parts = [buffer[:half], buffer[half:]]
  for part in parts:
    single = segment == 0 and len(parts) == 1
    yield record(part, start, video_id if single else f"{video_id}#{segment}")
    segment, start = segment + 1, start + len(part)


def _frames_of(entry: Any, opts: _Options) -> tuple[Frames, dict]:
  """The frame stream of one entry and the keyword arguments of segment_records for it."""
  if opts.kind == "tapvid":
    frames = tapvid_frames(entry, short_side=opts.short_side, jpeg_quality=opts.jpeg_quality)
    return frames, dict(points_QT2=entry.points_QT2, occluded_QT=entry.occluded_QT)
  if opts.kind == "image":
    return image_frames(entry.path, short_side=opts.short_side, jpeg_quality=opts.jpeg_quality), {}
  frames = video_frames(
    entry.path, short_side=opts.short_side, fps=opts.fps, jpeg_quality=opts.jpeg_quality
  )
  return frames, {}


class _Spool:
  """A worker's temporary file of length-prefixed records (segments of one long video)."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "wb")  # closed in close(): the spool outlives one call

  def write(self, record: bytes) -> None:
    self._file.write(_SPOOL_LENGTH.pack(len(record)))
    self._file.write(record)

  def close(self) -> None:
    self._file.close()

  @staticmethod
  def read(path: str) -> Iterator[bytes]:
    """Yields the records of a spool file one at a time, then deletes it."""
    try:
      with open(path, "rb") as f:
        while header := f.read(_SPOOL_LENGTH.size):
          (length,) = _SPOOL_LENGTH.unpack(header)
          yield f.read(length)
    finally:
      os.remove(path)


Result = tuple[int, list[bytes] | str | None, str | None]  # (position, records or spool, reason)


def _convert_one(task: tuple) -> Result:
  """Worker: (position, entry, label, options) -> (position, records | spool path | None, reason).

  A video of one record comes back in memory; the records of a segmented video go to a spool
  file so that no worker holds (or pickles) a whole long video.
  """
  position, entry, label, opts = task
  if entry.path is None:
    return position, None, f"missing: {entry.expected} not found"
  spool: _Spool | None = None
  try:
    frames, extra = _frames_of(entry, opts)
    out: list[bytes] = []
    for record in segment_records(
      frames,
      video_id=entry.video_id,
      label=label,
      label_name=entry.label_name if label >= 0 else "",
      max_frames=opts.max_record_frames,
      min_frames=opts.min_frames,
      **extra,
    ):
      if spool is None and not out:
        out.append(record)
        continue
      if spool is None:
        spool = _Spool(f"{opts.spool_prefix}.{position:09d}")
        spool.write(out.pop())
      spool.write(record)
  except Exception as e:  # noqa: BLE001  -- one bad video must not abort a day-long run
    if spool is not None:
      spool.close()
      os.remove(spool.path)
    reason = str(e) if isinstance(e, SkipVideo) else f"error: {type(e).__name__}: {e}"
    return position, None, reason
  if spool is not None:
    spool.close()
    return position, spool.path, None
  return position, out, None


def _shard_bounds(num_videos: int, num_shards: int) -> list[tuple[int, int]]:
  return [
    (s * num_videos // num_shards, (s + 1) * num_videos // num_shards) for s in range(num_shards)
  ]


def _results(tasks: list[tuple], workers: int) -> Iterator[Result]:
  """Converted videos in task order; spawn workers so FFmpeg/JAX threads never get forked."""
  if workers <= 1:
    yield from map(_convert_one, tasks)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(_convert_one, tasks, chunksize=1)


def _check_common(out: str, split: str, num_shards: int, opts: _Options) -> epath.Path:
  """Checks shared by every source, before any work; returns the (created) output directory."""
  if num_shards < 1:
    raise ValueError(f"--num-shards must be >= 1, got {num_shards}.")
  if opts.fps is not None and opts.fps <= 0:
    raise ValueError(f"--fps must be > 0, got {opts.fps}.")
  if opts.max_record_frames < 1:
    raise ValueError(f"--max-record-frames must be >= 1, got {opts.max_record_frames}.")
  if opts.min_frames < 1:
    raise ValueError(f"--min-frames must be >= 1, got {opts.min_frames}.")
  if not split or "/" in split:
    raise ValueError(f"--split must be a plain name such as train, got {split!r}.")
  if str(out).startswith("gs://"):
    raise ValueError("--out must be a local directory (atomic renames); copy to gs:// afterwards.")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out} is a file, not a directory: pass a directory (created if new).")
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  stale = sorted(set(shards.existing_shard_counts(out_dir, split)) - {num_shards})
  if stale:
    raise ValueError(
      f"{out_dir} holds shards of split {split!r} from a run with --num-shards {stale[0]}; "
      "delete them first, readers would otherwise see two copies of the split."
    )
  return out_dir


def _check_input_dir(flag: str, path: str) -> None:
  if not os.path.exists(path):
    raise ValueError(f"{flag} {path} does not exist.")
  if not os.path.isdir(path):
    raise ValueError(f"{flag} {path} is a file; pass the directory that holds the files.")


def _entries(directory: str, labels_file: str | None, extensions: Sequence[str], what: str):
  """The entries of a label file, or every file with one of the extensions (unlabelled)."""
  if labels_file is not None:
    if not os.path.isfile(labels_file):
      raise ValueError(f"--labels {labels_file} does not exist (or is not a file).")
    return labels_lib.load_entries(labels_file, directory)
  entries = labels_lib.scan_files(directory, extensions)
  if not entries:
    raise ValueError(
      f"No {what} files ({' '.join(extensions)}) under {directory}; pass --labels to list "
      "files with other names."
    )
  return entries


def _remove_spools(out_dir: epath.Path, opts: _Options) -> None:
  for leftover in out_dir.glob(f"{os.path.basename(opts.spool_prefix)}.*"):
    leftover.unlink(missing_ok=True)


def _write_split(
  entries: Sequence[Any],
  out_dir: epath.Path,
  split: str,
  num_shards: int,
  opts: _Options,
  *,
  workers: int,
  progress: bool,
  summary_extra: dict,
) -> dict:
  """Converts entries (hash order, duplicates skipped) into the split's shards and summary."""
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
    (i, e, class_ids[e.label_name] if e.label_name else -1, opts) for i, e in enumerate(unique)
  ]

  if new_classes:
    # Written first so an interrupted train conversion still pins the ids for later splits.
    shards.write_text_atomic(out_dir / labels_lib.CLASSES_FILE, "".join(f"{c}\n" for c in classes))

  _remove_spools(out_dir, opts)  # left by a run that was killed
  bounds = _shard_bounds(len(tasks), num_shards)
  records_per_shard = [0] * num_shards
  converted = segmented = 0
  results = _results(tasks, workers)
  bar = tqdm(
    total=len(tasks), desc=f"convert {split}", unit="video", mininterval=1.0, disable=not progress
  )
  try:
    for shard, (start, end) in enumerate(bounds):
      with shards.AtomicShardWriter(out_dir / shards.shard_name(split, shard, num_shards)) as w:
        for _ in range(start, end):
          position, result, reason = next(results)
          entry = unique[position]
          if result is None:
            skipped.append(dict(id=entry.video_id, path=entry.path, reason=reason))
          else:
            for record in _Spool.read(result) if isinstance(result, str) else result:
              w.write(record)
            converted += 1
            segmented += isinstance(result, str)
          bar.update(1)
      records_per_shard[shard] = w.num_records
  finally:
    bar.close()
    results.close()
    _remove_spools(out_dir, opts)  # segments of an interrupted run that never reached a shard

  summary = dict(
    split=split,
    schema_version=records.SCHEMA_VERSION,
    num_shards=num_shards,
    converted=converted,
    num_records=sum(records_per_shard),
    segmented=segmented,
    skipped=skipped,
    num_skipped=len(skipped),
    records_per_shard=records_per_shard,
    num_classes=len(classes),
    short_side=opts.short_side,
    fps=opts.fps,
    jpeg_quality=opts.jpeg_quality,
    max_record_frames=opts.max_record_frames,
    min_frames=opts.min_frames,
    **summary_extra,
  )
  shards.write_text_atomic(out_dir / f"{split}.summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def _options(kind: str, out: str, split: str, **kwargs) -> _Options:
  return _Options(kind=kind, spool_prefix=os.path.join(out, f".tmp.spool.{split}"), **kwargs)


def convert(
  videos: str,
  labels_file: str | None,
  out: str,
  split: str,
  num_shards: int,
  *,
  short_side: int = 256,
  fps: float | None = None,
  workers: int = 1,
  jpeg_quality: int = records.DEFAULT_JPEG_QUALITY,
  progress: bool = True,
  max_record_frames: int = DEFAULT_MAX_RECORD_FRAMES,
  min_frames: int = 1,
) -> dict:
  """Converts the videos of one split (labels_file None: every video file, unlabelled); returns
  the summary that is also written to OUT/{split}.summary.json."""
  opts = _options(
    "video",
    out,
    split,
    short_side=short_side,
    fps=fps,
    jpeg_quality=jpeg_quality,
    max_record_frames=max_record_frames,
    min_frames=min_frames,
  )
  _check_input_dir("--videos", videos)
  out_dir = _check_common(out, split, num_shards, opts)
  entries = _entries(videos, labels_file, labels_lib.VIDEO_EXTENSIONS, "video")
  extra = dict(labels_file=os.path.abspath(labels_file) if labels_file else None)
  return _write_split(
    entries,
    out_dir,
    split,
    num_shards,
    opts,
    workers=workers,
    progress=progress,
    summary_extra=extra,
  )


def convert_images(
  images: str,
  labels_file: str | None,
  out: str,
  split: str,
  num_shards: int,
  *,
  short_side: int = 256,
  workers: int = 1,
  jpeg_quality: int = records.DEFAULT_JPEG_QUALITY,
  progress: bool = True,
) -> dict:
  """Converts a folder of images (labels: a `path,label` CSV, or None) into one-frame records."""
  opts = _options(
    "image",
    out,
    split,
    short_side=short_side,
    fps=None,
    jpeg_quality=jpeg_quality,
    max_record_frames=DEFAULT_MAX_RECORD_FRAMES,  # one frame: never segmented
    min_frames=1,
  )
  _check_input_dir("--images", images)
  out_dir = _check_common(out, split, num_shards, opts)
  entries = _entries(images, labels_file, labels_lib.IMAGE_EXTENSIONS, "image")
  extra = dict(labels_file=os.path.abspath(labels_file) if labels_file else None)
  return _write_split(
    entries,
    out_dir,
    split,
    num_shards,
    opts,
    workers=workers,
    progress=progress,
    summary_extra=extra,
  )


def convert_tapvid(
  path: str,
  out: str,
  split: str,
  num_shards: int,
  *,
  short_side: int = 256,
  workers: int = 1,
  jpeg_quality: int = records.DEFAULT_JPEG_QUALITY,
  progress: bool = True,
  max_record_frames: int = DEFAULT_MAX_RECORD_FRAMES,
  min_frames: int = 1,
) -> dict:
  """Converts TAP-Vid pickles (labels.load_tapvid) into unlabelled records with point tracks."""
  opts = _options(
    "tapvid",
    out,
    split,
    short_side=short_side,
    fps=None,
    jpeg_quality=jpeg_quality,
    max_record_frames=max_record_frames,
    min_frames=min_frames,
  )
  out_dir = _check_common(out, split, num_shards, opts)
  entries = labels_lib.load_tapvid(path)  # validates every video's keys and shapes first
  if not entries:
    raise ValueError(f"--tapvid {path} holds no videos.")
  extra = dict(tapvid=os.path.abspath(path))
  return _write_split(
    entries,
    out_dir,
    split,
    num_shards,
    opts,
    workers=workers,
    progress=progress,
    summary_extra=extra,
  )


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows each option's default, except where there is none (required or unset options)."""

  def _get_help_string(self, action):
    return action.help if action.default is None else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
  """Command-line entry point; exit status 0 when at least one video was converted."""
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=_DefaultsHelpFormatter
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--videos", metavar="DIR", help="directory holding the video files")
  source.add_argument(
    "--images", metavar="DIR", help="directory holding image files (one-frame records)"
  )
  source.add_argument(
    "--tapvid", metavar="PATH", help="TAP-Vid pickle, or a directory of them (point tracks)"
  )
  parser.add_argument(
    "--labels",
    metavar="FILE",
    default=None,
    help="CSV (path,label), Kinetics CSV or SSv2 JSON; without it every file is unlabelled",
  )
  parser.add_argument("--out", metavar="DIR", required=True, help="output directory (local)")
  parser.add_argument("--split", required=True, help="split name, e.g. train or validation")
  parser.add_argument(
    "--num-shards", metavar="N", type=int, required=True, help="shard files of the split"
  )
  parser.add_argument("--short-side", type=int, default=256, help="0 keeps the original size")
  parser.add_argument(
    "--fps", type=float, default=None, help="resample videos to this rate (default: native)"
  )
  parser.add_argument(
    "--workers",
    type=int,
    default=os.cpu_count() or 1,
    help="conversion processes (default: one per CPU core, %(default)s here)",
  )
  parser.add_argument(
    "--jpeg-quality", type=int, default=records.DEFAULT_JPEG_QUALITY, help="JPEG quality"
  )
  parser.add_argument(
    "--max-record-frames",
    type=int,
    default=DEFAULT_MAX_RECORD_FRAMES,
    help="longer videos become several records id#0, id#1, ... (a few tens of MB each)",
  )
  parser.add_argument(
    "--min-frames", type=int, default=1, help="skip (and report) videos with fewer frames"
  )
  args = parser.parse_args(argv)
  common = dict(short_side=args.short_side, workers=args.workers, jpeg_quality=args.jpeg_quality)
  try:
    if args.videos is not None:
      summary = convert(
        args.videos,
        args.labels,
        args.out,
        args.split,
        args.num_shards,
        fps=args.fps,
        max_record_frames=args.max_record_frames,
        min_frames=args.min_frames,
        **common,
      )
    elif args.fps is not None:
      raise ValueError("--fps resamples videos in time; --images and --tapvid have no timestamps.")
    elif args.images is not None:
      summary = convert_images(
        args.images, args.labels, args.out, args.split, args.num_shards, **common
      )
    else:
      if args.labels is not None:
        raise ValueError("--tapvid data is unlabelled; drop --labels.")
      summary = convert_tapvid(
        args.tapvid,
        args.out,
        args.split,
        args.num_shards,
        max_record_frames=args.max_record_frames,
        min_frames=args.min_frames,
        **common,
      )
  except ValueError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    return 2
  summary_path = os.path.join(args.out, args.split + ".summary.json")
  print(
    f"{args.split}: converted {summary['converted']} ({summary['num_records']} records), "
    f"skipped {summary['num_skipped']} (see {summary_path})",
    file=sys.stderr,
  )
  if not summary["converted"]:
    print(
      f"convert: error: nothing converted; every input was skipped, reasons in {summary_path}.",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
