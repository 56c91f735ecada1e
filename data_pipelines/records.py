"""The video record schema: one ArrayRecord record per video, JPEG frames + JSON metadata.

Schema version 2, byte layout of one record:

  offset 0   4 bytes   magic b"TRVR"
  offset 4   4 bytes   header length L (uint32, little endian)
  offset 8   L bytes   header: UTF-8 JSON object (keys below)
  offset 8+L           payload: the JPEG files of all frames, concatenated; frame i is
                       payload[frame_offsets[i]:frame_offsets[i + 1]]; then, when the record has
                       point tracks, payload[tracks_offset:occluded_offset] is float32 little
                       endian [Q, T, 2] and payload[occluded_offset:targets_end] the occlusion
                       flags [Q, T], bit-packed (np.packbits, row-major, big bit order)

Header keys (always present):
  schema_version   int, 2 (version 1 records, without the keys from num_points on, still read)
  id               str, the video id (file stem / Kinetics clip name / SSv2 id; `id#k` for the
                   k-th segment of a long video split over several records)
  label            int, index into classes.txt; -1 when unlabelled
  label_name       str, the class name; "" when unlabelled
  fps              float, frame rate of the stored frames (after optional resampling; 0 for images)
  num_frames       int, T
  height, width    int, size of the stored frames (short side resized, aspect kept)
  original_height, original_width   int, size of the source video
  frame_offsets    list of T + 1 ints into the payload
  num_points       int, Q, the number of point tracks (0: none)
Header keys when num_points > 0:
  tracks_offset, occluded_offset, targets_end   ints into the payload (see the layout)

Point tracks are (x, y) in the stored frames' pixel coordinates, continuous, with pixel (i, j)
covering [j, j + 1) x [i, i + 1) (the convention of PIL's resize box, which the pipeline's crops
use): a point at normalised (u, v) of a W x H frame is at (u W, v H). occluded[q, t] is True when
point q is not visible in frame t (its coordinates there may be anything).

Why this layout: the header says where every JPEG starts, so `decode(..., frame_indices=...)`
decompresses only the sampled frames (a 16-frame clip from a 300-frame Kinetics video decodes
16 JPEGs, not 300). Tracks are raw arrays after the JPEGs (8 bytes per point and frame, 1/8 byte
of occlusion): a 2048-frame record with 256 points adds 4 MiB, not the 10x a JSON list would.
JSON keeps records self-describing and lets later versions add keys; readers reject a
schema_version newer than `SCHEMA_VERSION`, so a version 1 reader refuses version 2 records
instead of silently dropping their tracks.

`decode(bytes) -> dict(frames=uint8 [T, H, W, 3], label, label_name, id, fps, num_frames,
height, width, original_height, original_width, schema_version, num_points[, tracks float32
[Q, T, 2], occluded bool [Q, T]])`; `encode(...)` is its inverse (up to JPEG loss in the pixels;
tracks and occlusion are exact).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

SCHEMA_VERSION = 2
MAGIC = b"TRVR"
DEFAULT_JPEG_QUALITY = 90
_PREFIX = struct.Struct("<4sI")
_HEADER_KEYS = (
  "schema_version",
  "id",
  "label",
  "label_name",
  "fps",
  "num_frames",
  "height",
  "width",
  "original_height",
  "original_width",
)


def encode_jpeg(frame_HW3: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
  """JPEG-encodes one uint8 RGB frame with libjpeg-turbo (deterministic bytes)."""
  return simplejpeg.encode_jpeg(
    np.ascontiguousarray(frame_HW3), quality=quality, colorspace="RGB", colorsubsampling="420"
  )


def decode_jpeg(data: bytes, decoder: str = "simplejpeg") -> np.ndarray:
  """Decodes one JPEG to uint8 [H, W, 3]; decoder is "simplejpeg" (libjpeg-turbo) or "pil"."""
  if decoder == "simplejpeg":
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  if decoder == "pil":
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  raise ValueError(f"Unknown JPEG decoder {decoder!r}; use 'simplejpeg' or 'pil'.")


def _check_tracks(
  tracks: Any, occluded: Any, num_frames: int, video_id: str
) -> tuple[np.ndarray, np.ndarray] | None:
  """Validates optional tracks [Q, T, 2] and occluded [Q, T]; returns them as float32 / bool."""
  if tracks is None and occluded is None:
    return None
  if tracks is None or occluded is None:
    raise ValueError(
      f"Video {video_id!r}: pass tracks and occluded together (got only "
      f"{'tracks' if occluded is None else 'occluded'})."
    )
  tracks_QT2 = np.asarray(tracks)
  occluded_QT = np.asarray(occluded)
  if tracks_QT2.ndim != 3 or tracks_QT2.shape[1:] != (num_frames, 2):
    raise ValueError(
      f"Video {video_id!r}: tracks must be [Q, T, 2] with T = {num_frames} frames, got shape "
      f"{tracks_QT2.shape}."
    )
  if not np.issubdtype(tracks_QT2.dtype, np.floating) and not np.issubdtype(
    tracks_QT2.dtype, np.integer
  ):
    raise ValueError(f"Video {video_id!r}: tracks must be numbers, got {tracks_QT2.dtype}.")
  if occluded_QT.shape != tracks_QT2.shape[:2]:
    raise ValueError(
      f"Video {video_id!r}: occluded must be [Q, T] = {list(tracks_QT2.shape[:2])}, got shape "
      f"{occluded_QT.shape}."
    )
  if occluded_QT.dtype != bool:
    raise ValueError(f"Video {video_id!r}: occluded must be bool, got {occluded_QT.dtype}.")
  if len(tracks_QT2) == 0:
    raise ValueError(f"Video {video_id!r}: tracks has no points; pass tracks=None instead.")
  return tracks_QT2.astype("<f4"), occluded_QT


def encode_jpegs(
  jpegs: Sequence[bytes],
  *,
  height: int,
  width: int,
  video_id: str,
  fps: float,
  label: int = -1,
  label_name: str = "",
  original_size: tuple[int, int] | None = None,
  tracks: np.ndarray | None = None,
  occluded: np.ndarray | None = None,
) -> bytes:
  """Builds a record from already JPEG-encoded frames of size (height, width).

  tracks: optional float32 [Q, T, 2] (x, y) in stored-frame pixels; occluded: bool [Q, T].
  """
  if not jpegs:
    raise ValueError(f"Video {video_id!r} has no frames; records need at least one.")
  targets = _check_tracks(tracks, occluded, len(jpegs), video_id)
  offsets = np.concatenate([[0], np.cumsum([len(j) for j in jpegs])]).tolist()
  original_height, original_width = original_size or (height, width)
  header = {
    "schema_version": SCHEMA_VERSION,
    "id": str(video_id),
    "label": int(label),
    "label_name": str(label_name),
    "fps": float(fps),
    "num_frames": len(jpegs),
    "height": int(height),
    "width": int(width),
    "original_height": int(original_height),
    "original_width": int(original_width),
    "frame_offsets": offsets,
    "num_points": 0,
  }
  chunks = list(jpegs)
  if targets is not None:
    tracks_QT2, occluded_QT = targets
    tracks_bytes = tracks_QT2.tobytes()
    occluded_bytes = np.packbits(occluded_QT.reshape(-1)).tobytes()
    header["num_points"] = len(tracks_QT2)
    header["tracks_offset"] = offsets[-1]
    header["occluded_offset"] = offsets[-1] + len(tracks_bytes)
    header["targets_end"] = header["occluded_offset"] + len(occluded_bytes)
    chunks += [tracks_bytes, occluded_bytes]
  # sort_keys: identical inputs give identical bytes (re-runs of the converter are byte-stable).
  header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  return b"".join([_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes, *chunks])


def encode(
  frames_THW3: np.ndarray,
  *,
  video_id: str,
  fps: float,
  label: int = -1,
  label_name: str = "",
  original_size: tuple[int, int] | None = None,
  jpeg_quality: int = DEFAULT_JPEG_QUALITY,
  tracks: np.ndarray | None = None,
  occluded: np.ndarray | None = None,
) -> bytes:
  """Encodes uint8 frames [T, H, W, 3], metadata and optional point tracks (float32 [Q, T, 2]
  (x, y) in these frames' pixels, occluded bool [Q, T]) into one record (inverse of `decode`)."""
  frames_THW3 = np.asarray(frames_THW3)
  if frames_THW3.dtype != np.uint8 or frames_THW3.ndim != 4 or frames_THW3.shape[-1] != 3:
    raise ValueError(
      f"frames must be uint8 [T, H, W, 3], got {frames_THW3.dtype} {frames_THW3.shape}"
    )
  # Validated before the JPEG work so a bad call fails fast.
  _check_tracks(tracks, occluded, len(frames_THW3), video_id)
  _, height, width, _ = frames_THW3.shape
  return encode_jpegs(
    [encode_jpeg(f, jpeg_quality) for f in frames_THW3],
    height=height,
    width=width,
    video_id=video_id,
    fps=fps,
    label=label,
    label_name=label_name,
    original_size=original_size,
    tracks=tracks,
    occluded=occluded,
  )


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
  """Parses the prefix and header; returns (header, payload view) without copying frames."""
  if len(data) < _PREFIX.size:
    raise ValueError(f"Record too short ({len(data)} bytes) to be a TRecViT video record.")
  magic, header_len = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"Not a TRecViT video record (magic {magic!r}, expected {MAGIC!r}).")
  start = _PREFIX.size
  if start + header_len > len(data):
    raise ValueError(
      f"Record truncated: header of {header_len} bytes but only {len(data) - start} follow."
    )
  header = json.loads(bytes(data[start : start + header_len]))
  version = header.get("schema_version") if isinstance(header, dict) else None
  if not isinstance(version, int) or version > SCHEMA_VERSION:
    raise ValueError(
      f"Record schema_version {version!r} is newer than this code supports ({SCHEMA_VERSION}); "
      "update trecvit-dist or re-convert the data."
    )
  payload = memoryview(data)[start + header_len :]
  end = header["targets_end"] if header.get("num_points") else header["frame_offsets"][-1]
  if end > len(payload):
    raise ValueError(
      f"Record of video {header.get('id')!r} truncated: payload of {len(payload)} bytes, the "
      f"header says {end}."
    )
  return header, payload


def read_header(data: bytes) -> dict[str, Any]:
  """Returns the metadata of a record (everything but frames and tracks), decoding no JPEG."""
  header, _ = _split(data)
  out = {k: header[k] for k in _HEADER_KEYS}
  out["num_points"] = int(header.get("num_points", 0))  # version 1 records have no tracks
  return out


def _frame_indices(header: dict[str, Any], frame_indices: Sequence[int] | None) -> list[int]:
  num_frames = header["num_frames"]
  indices = range(num_frames) if frame_indices is None else [int(i) for i in frame_indices]
  for i in indices:
    if not 0 <= i < num_frames:
      raise IndexError(
        f"Frame index {i} out of range for video {header['id']!r} of {num_frames} frames."
      )
  return list(indices)


def _tracks(
  header: dict[str, Any], payload: memoryview, indices: list[int]
) -> tuple[np.ndarray, np.ndarray]:
  """The record's (tracks float32 [Q, len(indices), 2], occluded bool [Q, len(indices)])."""
  q, t = header["num_points"], header["num_frames"]
  a, b, end = header["tracks_offset"], header["occluded_offset"], header["targets_end"]
  if b - a != q * t * 8 or end - b != (q * t + 7) // 8:
    raise ValueError(
      f"Record of video {header['id']!r}: track byte ranges do not match {q} points x {t} frames."
    )
  tracks_QT2 = np.frombuffer(payload[a:b], "<f4").reshape(q, t, 2)
  bits = np.unpackbits(np.frombuffer(payload[b:end], np.uint8), count=q * t)
  occluded_QT = bits.reshape(q, t).astype(bool)
  return tracks_QT2[:, indices].astype(np.float32), occluded_QT[:, indices]


def read_tracks(
  data: bytes, frame_indices: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
  """(tracks float32 [Q, T', 2], occluded bool [Q, T']) at the selected frames (all when None),
  or None when the record has no tracks; decodes no JPEG."""
  header, payload = _split(data)
  if not header.get("num_points"):
    return None
  return _tracks(header, payload, _frame_indices(header, frame_indices))


def frame_jpegs(data: bytes, frame_indices: Sequence[int] | None = None) -> list[bytes]:
  """Returns the JPEG bytes of the selected frames (all when frame_indices is None)."""
  header, payload = _split(data)
  offsets = header["frame_offsets"]
  return [
    bytes(payload[offsets[i] : offsets[i + 1]]) for i in _frame_indices(header, frame_indices)
  ]


def decode(
  data: bytes, frame_indices: Sequence[int] | None = None, *, decoder: str = "simplejpeg"
) -> dict[str, Any]:
  """Decodes a record to dict(frames=uint8 [T, H, W, 3], label, id, fps, ...).

  With frame_indices, only those frames are JPEG-decoded (each distinct index once) and
  `frames` is [len(frame_indices), H, W, 3] in the given order (repeats allowed). A record with
  point tracks also gives `tracks` float32 [Q, len(frame_indices), 2] and `occluded` bool
  [Q, len(frame_indices)] at the same frames.
  """
  header, payload = _split(data)
  offsets = header["frame_offsets"]
  indices = _frame_indices(header, frame_indices)
  frames = np.empty((len(indices), header["height"], header["width"], 3), np.uint8)
  decoded: dict[int, int] = {}  # frame index -> row already holding it (looped clips repeat)
  for row, i in enumerate(indices):
    if i in decoded:
      frames[row] = frames[decoded[i]]
      continue
    frames[row] = decode_jpeg(bytes(payload[offsets[i] : offsets[i + 1]]), decoder)
    decoded[i] = row
  out = {k: header[k] for k in _HEADER_KEYS}
  out["num_points"] = int(header.get("num_points", 0))
  out["frames"] = frames
  if out["num_points"]:
    out["tracks"], out["occluded"] = _tracks(header, payload, indices)
  return out
