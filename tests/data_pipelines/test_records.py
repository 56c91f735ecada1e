"""Record schema: encode/decode round trip, partial decoding, versioning."""

import json
import struct

import numpy as np
import pytest

from data_pipelines import records


@pytest.fixture(name="record")
def record_fixture(make_frames):
  frames = make_frames(6, 24, 40)
  data = records.encode(
    frames, video_id="vid/1", fps=12.5, label=3, label_name="bar", original_size=(48, 80)
  )
  return frames, data


def test_round_trip_restores_frames_and_metadata(record):
  frames, data = record
  out = records.decode(data)
  assert out["frames"].dtype == np.uint8 and out["frames"].shape == frames.shape
  # JPEG is lossy; quality 90 on smooth content stays within a few grey levels on average.
  assert np.abs(out["frames"].astype(int) - frames).mean() < 3
  assert (out["id"], out["label"], out["label_name"], out["fps"]) == ("vid/1", 3, "bar", 12.5)
  assert (out["num_frames"], out["height"], out["width"]) == (6, 24, 40)
  assert (out["original_height"], out["original_width"]) == (48, 80)
  assert out["schema_version"] == records.SCHEMA_VERSION


def test_encode_is_deterministic_and_unlabelled_default(record):
  frames, _ = record
  a = records.encode(frames, video_id="x", fps=1.0)
  assert a == records.encode(frames, video_id="x", fps=1.0)
  header = records.read_header(a)
  assert header["label"] == -1 and header["label_name"] == ""
  assert "frames" not in header


def test_decode_selected_frames_matches_full_decode(record):
  _, data = record
  full = records.decode(data)["frames"]
  part = records.decode(data, [4, 1, 4, 0])["frames"]
  np.testing.assert_array_equal(part, full[[4, 1, 4, 0]])
  assert len(records.frame_jpegs(data, [2, 3])) == 2
  # The PIL decoder reads the same JPEGs (pixel values may differ by rounding only).
  pil = records.decode(data, [2], decoder="pil")["frames"]
  assert np.abs(pil.astype(int) - full[[2]]).max() <= 8


def test_out_of_range_index_and_bad_records_are_rejected(record):
  _, data = record
  with pytest.raises(IndexError, match="out of range"):
    records.decode(data, [6])
  with pytest.raises(ValueError, match="Not a TRecViT video record"):
    records.decode(b"XXXX" + data[4:])
  header = json.dumps({"schema_version": records.SCHEMA_VERSION + 1}).encode()
  future = struct.pack("<4sI", records.MAGIC, len(header)) + header
  with pytest.raises(ValueError, match="newer than this code"):
    records.decode(future)
  with pytest.raises(ValueError, match="uint8"):
    records.encode(np.zeros((2, 4, 4, 3), np.float32), video_id="x", fps=1.0)
