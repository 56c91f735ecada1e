"""Label files -> a list of videos to convert, and the class list (classes.txt).

Three formats, detected from the file:
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
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence

from etils import epath

CLASSES_FILE = "classes.txt"


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One video listed by a label file; path is None when the file was not found."""

  video_id: str
  path: str | None
  label_name: str  # "" when unlabelled
  expected: str  # the path or file name the label file asked for (for skip reasons)


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
