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


def _tracked(make_frames, num_points=5, num_frames=6):
  rng = np.random.default_rng(0)
  frames = make_frames(num_frames, 24, 40)
  tracks = rng.uniform(0, 40, size=(num_points, num_frames, 2)).astype(np.float32)
  occluded = rng.random((num_points, num_frames)) < 0.3
  return frames, tracks, occluded


def test_tracks_round_trip_exactly_and_follow_frame_selection(make_frames):
  frames, tracks, occluded = _tracked(make_frames)
  data = records.encode(frames, video_id="t", fps=5.0, tracks=tracks, occluded=occluded)
  out = records.decode(data)
  np.testing.assert_array_equal(out["tracks"], tracks)
  np.testing.assert_array_equal(out["occluded"], occluded)
  assert out["tracks"].dtype == np.float32 and out["occluded"].dtype == bool
  assert records.read_header(data)["num_points"] == 5
  part = records.decode(data, [4, 1, 4])
  np.testing.assert_array_equal(part["tracks"], tracks[:, [4, 1, 4]])
  np.testing.assert_array_equal(part["occluded"], occluded[:, [4, 1, 4]])
  got_tracks, got_occluded = records.read_tracks(data, [2])
  np.testing.assert_array_equal(got_tracks, tracks[:, [2]])
  np.testing.assert_array_equal(got_occluded, occluded[:, [2]])
  # Compact: raw float32 tracks plus one bit per occlusion flag, not a JSON list of numbers.
  plain = records.encode(frames, video_id="t", fps=5.0)
  extra = len(data) - len(plain)
  assert 5 * 6 * 8 + 4 <= extra <= 5 * 6 * 8 + 4 + 80  # + the three offsets in the header
  assert "tracks" not in records.decode(plain) and records.read_tracks(plain) is None
  assert records.read_header(plain)["num_points"] == 0


def test_version_1_records_still_read(record):
  frames, data = record
  # Rebuild the record as the version 1 writer did: no num_points key, schema_version 1.
  header_len = struct.unpack_from("<I", data, 4)[0]
  header = json.loads(data[8 : 8 + header_len])
  del header["num_points"]
  header["schema_version"] = 1
  header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  v1 = struct.pack("<4sI", records.MAGIC, len(header_bytes)) + header_bytes + data[8 + header_len :]
  out = records.decode(v1)
  np.testing.assert_array_equal(out["frames"], records.decode(data)["frames"])
  assert out["schema_version"] == 1 and out["num_points"] == 0 and "tracks" not in out
  assert records.read_header(v1)["num_points"] == 0


def test_bad_tracks_are_rejected_with_the_video_named(make_frames):
  frames, tracks, occluded = _tracked(make_frames)
  with pytest.raises(ValueError, match=r"'v'.*tracks must be \[Q, T, 2\] with T = 6"):
    records.encode(frames, video_id="v", fps=1.0, tracks=tracks[:, :4], occluded=occluded)
  with pytest.raises(ValueError, match=r"occluded must be \[Q, T\]"):
    records.encode(frames, video_id="v", fps=1.0, tracks=tracks, occluded=occluded[:2])
  with pytest.raises(ValueError, match="occluded must be bool"):
    records.encode(frames, video_id="v", fps=1.0, tracks=tracks, occluded=occluded.astype(int))
  with pytest.raises(ValueError, match="together"):
    records.encode(frames, video_id="v", fps=1.0, tracks=tracks)
  data = records.encode(frames, video_id="v", fps=1.0, tracks=tracks, occluded=occluded)
  with pytest.raises(ValueError, match="truncated"):
    records.decode(data[:-3])
