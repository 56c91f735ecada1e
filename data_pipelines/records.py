"""The video record schema: one ArrayRecord record per video, JPEG frames + JSON metadata.

Schema version 1, byte layout of one record:

  offset 0   4 bytes   magic b"TRVR"
  offset 4   4 bytes   header length L (uint32, little endian)
  offset 8   L bytes   header: UTF-8 JSON object (keys below)
  offset 8+L           payload: the JPEG files of all frames, concatenated; frame i is
                       payload[frame_offsets[i]:frame_offsets[i + 1]]

Header keys (all always present):
  schema_version   int, 1
  id               str, the video id (file stem / Kinetics clip name / SSv2 id)
  label            int, index into classes.txt; -1 when unlabelled
  label_name       str, the class name; "" when unlabelled
  fps              float, frame rate of the stored frames (after optional resampling)
  num_frames       int, T
  height, width    int, size of the stored frames (short side resized, aspect kept)
  original_height, original_width   int, size of the source video
  frame_offsets    list of T + 1 ints into the payload

Why this layout: the header says where every JPEG starts, so `decode(..., frame_indices=...)`
decompresses only the sampled frames (a 16-frame clip from a 300-frame Kinetics video decodes
16 JPEGs, not 300). JSON keeps records self-describing and lets later versions add keys;
readers reject a schema_version newer than `SCHEMA_VERSION`.

`decode(bytes) -> dict(frames=uint8 [T, H, W, 3], label, label_name, id, fps, num_frames,
height, width, original_height, original_width, schema_version)`; `encode(...)` is its inverse
(up to JPEG loss in the pixels).
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

SCHEMA_VERSION = 1
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
) -> bytes:
  """Builds a record from already JPEG-encoded frames of size (height, width)."""
  if not jpegs:
    raise ValueError(f"Video {video_id!r} has no frames; records need at least one.")
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
  }
  # sort_keys: identical inputs give identical bytes (re-runs of the converter are byte-stable).
  header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  return b"".join([_PREFIX.pack(MAGIC, len(header_bytes)), header_bytes, *jpegs])


def encode(
  frames_THW3: np.ndarray,
  *,
  video_id: str,
  fps: float,
  label: int = -1,
  label_name: str = "",
  original_size: tuple[int, int] | None = None,
  jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> bytes:
  """Encodes uint8 frames [T, H, W, 3] and metadata into one record (inverse of `decode`)."""
  frames_THW3 = np.asarray(frames_THW3)
  if frames_THW3.dtype != np.uint8 or frames_THW3.ndim != 4 or frames_THW3.shape[-1] != 3:
    raise ValueError(
      f"frames must be uint8 [T, H, W, 3], got {frames_THW3.dtype} {frames_THW3.shape}"
    )
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
  )


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
  """Parses the prefix and header; returns (header, payload view) without copying frames."""
  if len(data) < _PREFIX.size:
    raise ValueError(f"Record too short ({len(data)} bytes) to be a TRecViT video record.")
  magic, header_len = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"Not a TRecViT video record (magic {magic!r}, expected {MAGIC!r}).")
  start = _PREFIX.size
  header = json.loads(bytes(data[start : start + header_len]))
  version = header.get("schema_version")
  if not isinstance(version, int) or version > SCHEMA_VERSION:
    raise ValueError(
      f"Record schema_version {version!r} is newer than this code supports ({SCHEMA_VERSION}); "
      "update trecvit-dist or re-convert the data."
    )
  return header, memoryview(data)[start + header_len :]


def read_header(data: bytes) -> dict[str, Any]:
  """Returns the metadata of a record (everything but the frames) without decoding any JPEG."""
  header, _ = _split(data)
  return {k: header[k] for k in _HEADER_KEYS}


def frame_jpegs(data: bytes, frame_indices: Sequence[int] | None = None) -> list[bytes]:
  """Returns the JPEG bytes of the selected frames (all when frame_indices is None)."""
  header, payload = _split(data)
  offsets = header["frame_offsets"]
  num_frames = header["num_frames"]
  if frame_indices is None:
    frame_indices = range(num_frames)
  out = []
  for i in frame_indices:
    i = int(i)
    if not 0 <= i < num_frames:
      raise IndexError(
        f"Frame index {i} out of range for video {header['id']!r} of {num_frames} frames."
      )
    out.append(bytes(payload[offsets[i] : offsets[i + 1]]))
  return out


def decode(
  data: bytes, frame_indices: Sequence[int] | None = None, *, decoder: str = "simplejpeg"
) -> dict[str, Any]:
  """Decodes a record to dict(frames=uint8 [T, H, W, 3], label, id, fps, ...).

  With frame_indices, only those frames are JPEG-decoded (each distinct index once) and
  `frames` is [len(frame_indices), H, W, 3] in the given order (repeats allowed).
  """
  header, payload = _split(data)
  offsets = header["frame_offsets"]
  num_frames = header["num_frames"]
  if frame_indices is None:
    frame_indices = range(num_frames)
  indices = [int(i) for i in frame_indices]
  frames = np.empty((len(indices), header["height"], header["width"], 3), np.uint8)
  decoded: dict[int, int] = {}  # frame index -> row already holding it (looped clips repeat)
  for row, i in enumerate(indices):
    if not 0 <= i < num_frames:
      raise IndexError(
        f"Frame index {i} out of range for video {header['id']!r} of {num_frames} frames."
      )
    if i in decoded:
      frames[row] = frames[decoded[i]]
      continue
    frames[row] = decode_jpeg(bytes(payload[offsets[i] : offsets[i + 1]]), decoder)
    decoded[i] = row
  out = {k: header[k] for k in _HEADER_KEYS}
  out["frames"] = frames
  return out
