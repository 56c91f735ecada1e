"""Synthetic tracking data: exact tracks and occlusion, stored through the records."""

import json

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipelines import records, shards, synthetic, synthetic_tracking

NUM_VIDEOS = 8
SPEC = synthetic.resolve_spec("tracking", seed=3)  # the defaults: 16 frames of 32x32, 32 points


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
  """(generated examples with their render-time extras, the records decoded back)."""
  out = str(tmp_path_factory.mktemp("tracking"))
  synthetic.generate(out, "train", NUM_VIDEOS, seed=3, kind="tracking", num_shards=2)
  source = ArrayRecordDataSource(shards.find_shards(out, "train"))
  examples = [synthetic.make_example(SPEC, "train", i) for i in range(NUM_VIDEOS)]
  return out, examples, [records.decode(source[i]) for i in range(NUM_VIDEOS)]


def away_from_edges(example, size):
  """bool [Q, T]: in frame, one pixel from the border, and the 3x3 pixels around the track's
  pixel all show one layer (hard edges: the track's own pixel then shows that layer too)."""
  layers = example["layers"]
  x, y = example["tracks"][..., 0], example["tracks"][..., 1]
  ok = (x >= 1) & (x < size - 1) & (y >= 1) & (y < size - 1)
  i, j = np.clip(y.astype(int), 1, size - 2), np.clip(x.astype(int), 1, size - 2)
  t = np.arange(layers.shape[0])[None]
  around = np.stack([layers[t, i + di, j + dj] for di in (-1, 0, 1) for dj in (-1, 0, 1)])
  return ok & (around.min(0) == around.max(0)), layers[t, i, j]


def test_records_carry_the_exact_tracks(stored):
  out, examples, decoded = stored
  assert open(f"{out}/classes.txt").read() == ""
  summary = json.loads(open(f"{out}/train.summary.json").read())["synthetic"]
  assert summary["kind"] == "tracking"
  assert summary["params"] == synthetic_tracking.DEFAULT_PARAMS
  assert len(summary["signature"]) == 16 * 3 + 2  # frame means, tracks' mean, % occluded
  for example, record in zip(examples, decoded, strict=True):
    assert record["label"] == -1 and record["frames"].shape == (16, 32, 32, 3)
    assert record["tracks"].dtype == np.float32 and record["tracks"].shape == (32, 16, 2)
    np.testing.assert_array_equal(record["tracks"], example["tracks"])
    np.testing.assert_array_equal(record["occluded"], example["occluded"])


def test_visible_points_show_their_colour_along_the_track(stored):
  _, examples, decoded = stored
  followed, other, frozen = [], [], []
  for example, record in zip(examples, decoded, strict=True):
    frames = record["frames"].astype(np.float32).mean(-1)  # grey: 4:2:0 JPEG blurs colour
    grey = example["point_colours"].mean(-1)
    clear, _ = away_from_edges(example, 32)
    tracks = example["tracks"]
    for q, t in zip(*np.nonzero(clear & ~example["occluded"]), strict=True):
      x, y = tracks[q, t]
      followed.append(abs(frames[t, int(y), int(x)] - grey[q]))
      other.append(abs(frames[t, int(y), int(x)] - grey[q - 1]))
      # The same pixel as at the query frame, where the point has moved by more than 3 px.
      x0, y0 = tracks[q, example["query_frames"][q]]
      if np.hypot(x - x0, y - y0) > 3:
        frozen.append(abs(frames[t, int(y0), int(x0)] - grey[q]))
  # Measured (grey levels): followed 5.5 (median) / 18 (90th percentile), another point's
  # colour 46, the pixel the point was at in its query frame 33.
  assert np.median(followed) < 8 and np.percentile(followed, 90) < 25
  assert np.median(other) > 4 * np.median(followed)
  assert np.median(frozen) > 3 * np.median(followed)
  assert len(followed) > 1000 and len(frozen) > 100


def test_occlusion_is_set_exactly_when_a_layer_in_front_covers_the_point(stored):
  _, examples, _ = stored
  bar_hides = objects_hide = out_of_frame = 0
  for example in examples:
    clear, seen = away_from_edges(example, 32)
    bar = example["layers"].max()
    own = example["point_layers"][:, None]
    # Where the rendered layer around the point is unambiguous, the point is occluded exactly
    # when that layer is not the point's own (only layers in front can be drawn over it).
    np.testing.assert_array_equal(example["occluded"][clear], (seen != own)[clear])
    bar_hides += (clear & (seen == bar) & example["occluded"]).sum()
    objects_hide += (clear & (seen != bar) & (seen != own) & example["occluded"]).sum()
    x, y = example["tracks"][..., 0], example["tracks"][..., 1]
    outside = (x < 0) | (x >= 32) | (y < 0) | (y >= 32)
    assert example["occluded"][outside].all()
    out_of_frame += outside.sum()
  # The bar crosses points, objects pass in front of others, and some points leave the frame.
  assert bar_hides > 50 and objects_hide > 50 and out_of_frame > 20


def test_tracks_are_in_pixel_coordinates(stored):
  _, examples, _ = stored
  for example in examples:
    tracks, occluded = example["tracks"], example["occluded"]
    visible = tracks[~occluded]
    assert (visible >= 0).all() and (visible < 32).all()
    # Every point is visible at its query frame; background and object points both exist.
    q = np.arange(len(tracks))
    assert not occluded[q, example["query_frames"]].any()
  layers = np.concatenate([e["point_layers"] for e in examples])
  assert 0.3 < (layers == 0).mean() < 0.8
  # Surfaces translate rigidly: all points of one layer move by the same displacement, and in
  # about half the videos the camera is still (background points do not move at all).
  still = 0
  for example in examples:
    moves = example["tracks"] - example["tracks"][:, :1]
    for layer in np.unique(example["point_layers"]):
      of_layer = moves[example["point_layers"] == layer]
      np.testing.assert_allclose(of_layer, np.broadcast_to(of_layer[:1], of_layer.shape), atol=1e-4)
    still += not moves[example["point_layers"] == 0].any()
  assert 0 < still < NUM_VIDEOS


def test_determinism_and_bad_parameters(tmp_path):
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    synthetic.generate(str(tmp_path / name), "train", 2, seed=seed, kind="tracking", num_shards=1)
  read = lambda name: (tmp_path / name / shards.shard_name("train", 0, 1)).read_bytes()
  assert read("a") == read("b") and read("a") != read("c")
  with pytest.raises(ValueError, match="num_points >= 1"):
    synthetic.ensure(str(tmp_path / "d"), kind="tracking", num_points=0)
  with pytest.raises(ValueError, match="applies to kind 'motion' only"):
    synthetic.ensure(str(tmp_path / "d"), kind="tracking", variant="dark")
  assert not (tmp_path / "d").exists()
