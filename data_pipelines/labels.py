"""Label and annotation files -> a list of videos (or images) to convert, and classes.txt.

Without a label file, `scan_files` lists every video (or image) under a directory, unlabelled
(id = the path relative to it). `load_tapvid` reads TAP-Vid point-track pickles (below).

Three label file formats, detected from the file:
  generic CSV     header `path,label`; path relative to --videos (any container), label = class
                  name (empty: unlabelled). id = the path as written (unique even when
                  two files share a stem).
  Kinetics CSV    header `label,youtube_id,time_start,time_end,split` (label column optional, as in
                  the test split); file `{youtube_id}_{start:06d}_{end:06d}.mp4` anywhere under
                  --videos (flat or per-class folders); id = that file's stem.
  SSv2 JSON       a list of objects with `id` and `template`; class = template without the
                  brackets ("Putting [something] on a surface" -> "Putting something on a
                  surface"); file `{id}.webm` anywhere under --videos; id = str(id). Objects
                  without `template` (the test split) are unlabelled.

For Kinetics and SSv2 a file with the expected stem but another extension (.mkv, .mp4, ...) is
accepted, because downloaders re-mux.

TAP-Vid (`load_tapvid`): a pickle holding per video a dict with `video` (uint8 frames
[T, H, W, 3], or a list of T JPEG/PNG-encoded frames), `points` float [Q, T, 2] as (x, y)
normalised to [0, 1], and `occluded` bool [Q, T]. Accepted: a dict {video name: video dict}
(TAP-Vid DAVIS), a list of video dicts (RGB-Stacking; ids `{file stem}/{index:05d}`), one video
dict (id = the file stem), or a directory of such pickle files (TAP-Vid Kinetics). Pickles can
run code when loaded: only read files from a source you trust.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

CLASSES_FILE = "classes.txt"
# Containers FFmpeg reads that datasets ship videos in; other files are not listed by scan_files.
VIDEO_EXTENSIONS = (
  ".mp4 .webm .mkv .avi .mov .m4v .mpg .mpeg .flv .wmv .ogv .3gp .ts .mts .gif"
).split()
IMAGE_EXTENSIONS = ".jpg .jpeg .png .bmp .webp .tif .tiff".split()
TAPVID_KEYS = ("video", "points", "occluded")


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One video listed by a label file; path is None when the file was not found."""

  video_id: str
  path: str | None
  label_name: str  # "" when unlabelled
  expected: str  # the path or file name the label file asked for (for skip reasons)


def scan_files(root: str, extensions: Sequence[str]) -> list[VideoEntry]:
  """Every file under root with one of the extensions (case-insensitive), unlabelled, sorted;
  id = the path relative to root, as in a generic CSV."""
  entries = []
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    for name in sorted(files):
      if os.path.splitext(name)[1].lower() in extensions:
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, root)
        entries.append(VideoEntry(video_id=rel, path=path, label_name="", expected=rel))
  return entries


def _index_by_stem(videos_dir: str) -> dict[str, str]:
  """Maps file stem -> path for every file under videos_dir (one walk, not one stat per video)."""
  index: dict[str, str] = {}
  for root, _, files in os.walk(videos_dir):
    for name in sorted(files):
      stem = os.path.splitext(name)[0]
      # Prefer the first hit in sorted walk order so repeated runs resolve identically.
      index.setdefault(stem, os.path.join(root, name))
  return index


def _generic_csv(rows: list[dict[str, str]], videos_dir: str) -> list[VideoEntry]:
  entries = []
  for row in rows:
    rel = row["path"].strip()
    path = os.path.join(videos_dir, rel)
    entries.append(
      VideoEntry(
        video_id=rel,
        path=path if os.path.isfile(path) else None,
        label_name=(row.get("label") or "").strip(),
        expected=rel,
      )
    )
  return entries


def _kinetics_csv(rows: list[dict[str, str]], videos_dir: str) -> list[VideoEntry]:
  index = _index_by_stem(videos_dir)
  entries = []
  for row in rows:
    start, end = int(float(row["time_start"])), int(float(row["time_end"]))
    stem = f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}"
    entries.append(
      VideoEntry(
        video_id=stem,
        path=index.get(stem),
        label_name=(row.get("label") or "").strip(),
        expected=f"{stem}.mp4",
      )
    )
  return entries


def ssv2_class_name(template: str) -> str:
  """SSv2 template -> class name: the brackets are removed, as in the official labels file."""
  return template.replace("[", "").replace("]", "").strip()


def _ssv2_json(items: list[dict], videos_dir: str) -> list[VideoEntry]:
  index = _index_by_stem(videos_dir)
  entries = []
  for item in items:
    video_id = str(item["id"])
    entries.append(
      VideoEntry(
        video_id=video_id,
        path=index.get(video_id),
        label_name=ssv2_class_name(item.get("template", "")),
        expected=f"{video_id}.webm",
      )
    )
  return entries


def load_entries(labels_file: str, videos_dir: str) -> list[VideoEntry]:
  """Parses a label file (format detected from its content) into video entries, in file order."""
  text = epath.Path(labels_file).read_text()
  if labels_file.endswith(".json") or text.lstrip().startswith("["):
    items = json.loads(text)
    if not isinstance(items, list) or (items and "id" not in items[0]):
      raise ValueError(f"{labels_file}: expected an SSv2 JSON list of objects with 'id'.")
    return _ssv2_json(items, videos_dir)
  reader = csv.DictReader(text.splitlines())
  fields = {f.strip() for f in reader.fieldnames or []}
  rows = [{k.strip(): v for k, v in row.items() if k is not None} for row in reader]
  if {"path", "label"} <= fields:
    return _generic_csv(rows, videos_dir)
  if {"youtube_id", "time_start", "time_end"} <= fields:
    return _kinetics_csv(rows, videos_dir)
  raise ValueError(
    f"{labels_file}: unrecognised label file (header {sorted(fields)}). Expected a CSV with "
    "header 'path,label', a Kinetics CSV 'label,youtube_id,time_start,time_end,split', or an "
    "SSv2 JSON list."
  )


def read_classes_file(path: epath.PathLike) -> list[str]:
  """Reads classes.txt: one class name per line, the line number is the label id."""
  return [line for line in epath.Path(path).read_text().splitlines() if line]


def resolve_classes(
  entries: Sequence[VideoEntry], out_dir: epath.PathLike
) -> tuple[list[str], bool]:
  """Returns (classes, is_new): the existing OUT/classes.txt, or the sorted names of entries.

  An existing classes.txt is reused so that label ids agree across splits (convert train first).
  A labelled video whose class is not in it is an error: silently extending or renumbering the
  list would change the meaning of ids already written to other splits.
  """
  names = sorted({e.label_name for e in entries if e.label_name})
  path = epath.Path(out_dir) / CLASSES_FILE
  if not path.exists():
    return names, True
  classes = read_classes_file(path)
  unknown = sorted(set(names) - set(classes))
  if unknown:
    shown = ", ".join(repr(n) for n in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    raise ValueError(
      f"{len(unknown)} class(es) in the label file are not in the existing {path}: {shown}. "
      "Label ids must agree across splits: convert the split with all classes (train) first, "
      "or use a fresh --out directory."
    )
  return classes, False


@dataclasses.dataclass(frozen=True)
class TapVidEntry:
  """One TAP-Vid video: frames (uint8 [T, H, W, 3] or T encoded images) and its point tracks."""

  video_id: str
  path: str  # the pickle file it came from
  video: Any  # np.ndarray uint8 [T, H, W, 3] or a list of T JPEG/PNG bytes
  points_QT2: np.ndarray  # (x, y) normalised to [0, 1]
  occluded_QT: np.ndarray  # bool
  label_name: str = ""  # unlabelled

  @property
  def num_frames(self) -> int:
    return len(self.video)


def _tapvid_entry(item: Any, video_id: str, path: str) -> TapVidEntry:
  """Validates one TAP-Vid video dict; ValueError naming the video and the key."""
  where = f"TAP-Vid {path}: video {video_id!r}"
  if not isinstance(item, Mapping):
    raise ValueError(
      f"{where} is a {type(item).__name__}, expected a dict with keys {TAPVID_KEYS}."
    )
  for key in TAPVID_KEYS:
    if key not in item:
      raise ValueError(
        f"{where} is missing key {key!r} (it has {sorted(map(str, item))}); every video needs "
        f"{', '.join(TAPVID_KEYS)}."
      )
  video = item["video"]
  if isinstance(video, np.ndarray):
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
      raise ValueError(
        f"{where}: key 'video' must be uint8 [T, H, W, 3] (or a list of encoded frames), got "
        f"{video.dtype} {video.shape}."
      )
  elif not (isinstance(video, Sequence) and all(isinstance(f, bytes) for f in video)):
    raise ValueError(
      f"{where}: key 'video' must be a uint8 array [T, H, W, 3] or a list of JPEG/PNG bytes, "
      f"got {type(video).__name__}."
    )
  num_frames = len(video)
  points = np.asarray(item["points"])
  occluded = np.asarray(item["occluded"])
  if points.ndim != 3 or points.shape[1:] != (num_frames, 2):
    raise ValueError(
      f"{where}: key 'points' must be [Q, T, 2] with T = {num_frames} video frames, got shape "
      f"{points.shape}: the tracks do not match the video."
    )
  if occluded.shape != points.shape[:2]:
    raise ValueError(
      f"{where}: key 'occluded' must be [Q, T] = {list(points.shape[:2])} like 'points', got "
      f"shape {occluded.shape}: the tracks do not match the video."
    )
  return TapVidEntry(
    video_id=video_id,
    path=path,
    video=video,
    points_QT2=points.astype(np.float32),
    occluded_QT=occluded.astype(bool),
  )


def _tapvid_file(path: str) -> list[TapVidEntry]:
  with open(path, "rb") as f:
    data = pickle.load(f)  # TAP-Vid is published as pickles: trusted files only (docstring)
  stem = os.path.splitext(os.path.basename(path))[0]
  if isinstance(data, Mapping) and all(k in data for k in TAPVID_KEYS):
    return [_tapvid_entry(data, stem, path)]
  if isinstance(data, Mapping):
    return [_tapvid_entry(item, str(name), path) for name, item in data.items()]
  if isinstance(data, Sequence):
    return [_tapvid_entry(item, f"{stem}/{i:05d}", path) for i, item in enumerate(data)]
  raise ValueError(
    f"TAP-Vid {path}: expected a dict of videos, a list of videos or one video dict, got "
    f"{type(data).__name__}."
  )


def load_tapvid(path: str) -> list[TapVidEntry]:
  """Reads a TAP-Vid pickle, or every .pkl/.pickle file of a directory (see module docstring)."""
  if not os.path.exists(path):
    raise ValueError(f"--tapvid {path} does not exist.")
  if os.path.isdir(path):
    files = sorted(
      os.path.join(path, n) for n in os.listdir(path) if n.endswith((".pkl", ".pickle"))
    )
    if not files:
      raise ValueError(f"--tapvid {path} is a directory without .pkl or .pickle files.")
  else:
    files = [path]
  return [entry for f in files for entry in _tapvid_file(f)]
