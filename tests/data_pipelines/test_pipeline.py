"""Grain pipeline: shapes, global batch order independent of processes/workers, resume, errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import pipeline, records, shards, transforms

CLIP = dict(num_frames=4, stride=2, image_size=24)


def train(data, **kwargs):
  args = dict(global_batch_size=8, seed=0, process_index=0, process_count=1, **CLIP)
  return pipeline.train_iterator(data, "train", **{**args, **kwargs})


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat(per_process):
  """Per-process batch lists -> global batches (rows of process p come p-th; stats/ counts add)."""
  return [
    {
      k: sum(b[k] for b in step) if k.startswith("stats/") else np.concatenate([b[k] for b in step])
      for k in step[0]
    }
    for step in zip(*per_process, strict=True)
  ]


def test_train_batch_shapes_dtypes_and_range(tiny_data):
  batch = next(train(tiny_data))
  assert batch["video"].shape == (8, 4, 24, 24, 3) and batch["video"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["video"].min() and batch["video"].max() <= 1.0
  assert set(batch["label"]) <= {0, 1, 2, 3}
  assert pipeline.read_classes(tiny_data) == ["left", "right", "up", "down"]
  norm = next(train(tiny_data, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
  np.testing.assert_allclose(norm["video"], (batch["video"] - 0.5) / 0.25, atol=1e-6)


def test_process_slices_concatenate_to_the_global_batch(tiny_data):
  # 7 batches of 8 = 56 positions > 36 records: crosses the epoch boundary inside a batch.
  reference = take(train(tiny_data), 7)
  for count in (2, 4):
    per_process = [
      take(train(tiny_data, process_index=p, process_count=count), 7) for p in range(count)
    ]
    assert all(b["video"].shape[0] == 8 // count for b in per_process[0])
    assert_batches_equal(concat(per_process), reference)


def test_every_epoch_is_a_new_permutation(tiny_data):
  batches = train(tiny_data)._batches
  epochs = [[batches._record_index(g) for g in range(e * 36, (e + 1) * 36)] for e in range(3)]
  assert all(sorted(e) == list(range(36)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  assert_batches_equal(take(train(tiny_data), 2), take(train(tiny_data), 2))
  other = next(train(tiny_data, seed=1))
  assert not np.array_equal(other["video"], next(train(tiny_data))["video"])


@pytest.mark.slow
def test_resume_with_workers_reproduces_the_stream(tiny_data):
  in_process = take(train(tiny_data), 7)
  # Worker processes (2, round-robin) give exactly the in-process batches.
  it = train(tiny_data, worker_count=2)
  assert_batches_equal(take(it, 3), in_process[:3])
  state = json.loads(json.dumps(it.get_state()))
  assert state["next_position"] == 24 and state["global_batches"] == 3
  assert_batches_equal(take(it, 4), in_process[3:])
  it.close()

  restored = train(tiny_data, worker_count=1)
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), in_process[3:])
  assert restored.get_state()["global_batches"] == 7
  restored.close()

  # The state has no process count in it: saved by 1 process, resumed by 2.
  per_process = []
  for p in range(2):
    it = train(tiny_data, process_index=p, process_count=2)
    it.set_state(state)
    per_process.append(take(it, 4))
  assert_batches_equal(concat(per_process), in_process[3:])


def test_set_state_refuses_another_seed_or_dataset(tiny_data):
  state = train(tiny_data).get_state()
  with pytest.raises(ValueError, match="seed"):
    train(tiny_data, seed=3).set_state(state)
  with pytest.raises(ValueError, match="num_records"):
    train(tiny_data).set_state({**state, "num_records": 99})


def test_flip_mirrors_whole_clips_and_randaugment_changes_pixels(tiny_data):
  plain = next(train(tiny_data, flip=False))["video"]
  flipped = next(train(tiny_data))["video"]
  mirrored = [np.array_equal(f, p[:, :, ::-1]) for f, p in zip(flipped, plain, strict=True)]
  same = [np.array_equal(f, p) for f, p in zip(flipped, plain, strict=True)]
  assert all(m or s for m, s in zip(mirrored, same, strict=True)) and any(mirrored) and any(same)
  augmented = next(train(tiny_data, flip=False, randaugment=True))["video"]
  assert augmented.shape == plain.shape and 0 <= augmented.min() and augmented.max() <= 1
  assert not np.array_equal(augmented, plain)


def test_eval_is_one_padded_pass_with_views(tiny_data):
  it = pipeline.eval_iterator(
    tiny_data,
    "validation",
    global_batch_size=8,
    num_clips=2,
    num_crops=3,
    process_index=0,
    process_count=1,
    **CLIP,
  )
  batches = list(it)
  assert len(it) == len(batches) == 3  # 20 videos -> 8 + 8 + 4 valid rows
  assert [b["mask"].sum() for b in batches] == [8, 8, 4]
  assert batches[0]["video"].shape == (8, 6, 4, 24, 24, 3)
  assert batches[0]["mask"].dtype == bool and batches[0]["label"].dtype == np.int32
  assert not batches[-1]["video"][4:].any() and not batches[-1]["label"][4:].any()
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(20) % 4)  # synthetic labels cycle, in order
  per_process = [
    list(
      pipeline.eval_iterator(
        tiny_data,
        "validation",
        global_batch_size=8,
        num_clips=2,
        num_crops=3,
        process_index=p,
        process_count=2,
        **CLIP,
      )
    )
    for p in range(2)
  ]
  assert_batches_equal(concat(per_process), batches)


def test_clear_errors_before_anything_slow(tiny_data, tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path / 'nope'} does not exist"):
    train(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} is empty"):
    train(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match=r"No shards for split 'test'.*\['train', 'validation'\]"):
    pipeline.train_iterator(
      tiny_data, "test", global_batch_size=8, seed=0, process_index=0, process_count=1, **CLIP
    )
  with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
    train(tiny_data, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="classes.txt not found"):
    pipeline.read_classes(str(tmp_path))


def test_global_batch_builds_sharded_arrays(tiny_data):
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  batch = next(train(tiny_data))
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  arrays = pipeline.global_batch(batch, sharding)
  assert arrays["video"].shape == (8, 4, 24, 24, 3) and arrays["video"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["video"]), batch["video"])
  per_key = pipeline.global_batch(
    batch, {"video": sharding, "label": NamedSharding(mesh, PartitionSpec())}
  )
  np.testing.assert_array_equal(np.asarray(per_key["label"]), batch["label"])


def test_temporal_sampling_loops_short_videos_and_spreads_eval_clips():
  np.testing.assert_array_equal(transforms.clip_indices(3, 4, 2, 0), [0, 2, 1, 0])
  np.testing.assert_array_equal(transforms.clip_indices(10, 4, 2, 3), [3, 5, 7, 9])
  assert transforms.eval_starts(20, 7, 3) == [0, 6, 13]  # linspace(0, 13, 3), rounded
  assert transforms.eval_starts(5, 7, 2) == [0, 0]
  rng = np.random.default_rng(0)
  assert all(0 <= transforms.random_start(rng, 10, 7) <= 3 for _ in range(20))


def test_crop_boxes_stay_inside_the_frame():
  rng = np.random.default_rng(0)
  for _ in range(50):
    left, top, right, bottom = transforms.train_box(rng, 256, 340, 224, (0.875, 1.33))
    assert 0 <= left and 0 <= top and right <= 340 and bottom <= 256
    # Short side resized to 224..341 (scale 0.875..1.33 of 256): a 168..256 px box of 256.
    assert right - left == pytest.approx(bottom - top) and 168 <= right - left <= 256
  # 3 crops of a landscape frame: left, centre, right squares of the full height.
  assert transforms.eval_boxes(256, 340, 224, 3) == [
    (0, 0, 256, 256),
    (42, 0, 298, 256),
    (84, 0, 340, 256),
  ]
  assert transforms.eval_boxes(256, 256, 224, 1) == [(16.0, 16.0, 240.0, 240.0)]


# --- Point tracks, corrupt records, statistics, check_split.

TRACK_CLIP = dict(num_frames=4, stride=2, image_size=24)


@pytest.fixture(scope="module")
def tracks_data(tmp_path_factory):
  """8 videos of 10 frames at 32x48: a bright blob moving right 4 px per frame (point 0), a
  point that is never visible (point 1); video 7 has its blob occluded throughout."""
  out = tmp_path_factory.mktemp("tracks_data")
  grid_y, grid_x = np.mgrid[0:32, 0:48] + 0.5
  with shards.AtomicShardWriter(out / shards.shard_name("train", 0, 1)) as w:
    for i in range(8):
      x0, y = 3.0 + i, 6.0 + 2.5 * i
      xs = x0 + 4.0 * np.arange(10)
      frames = np.stack([np.exp(-((grid_x - x) ** 2 + (grid_y - y) ** 2) / 3.0) * 250 for x in xs])
      frames = np.repeat(frames[..., None], 3, axis=-1).astype(np.uint8)
      tracks = np.zeros((2, 10, 2), np.float32)
      tracks[0, :, 0], tracks[0, :, 1] = xs, y
      tracks[1] = (20.0, 20.0)
      occluded = np.zeros((2, 10), bool)
      occluded[1] = True
      occluded[0] |= i == 7
      w.write(records.encode(frames, video_id=str(i), fps=10.0, tracks=tracks, occluded=occluded))
  return str(out)


def _assert_points_on_the_blob(batch, video_BTHW3):
  """Every visible point is at the brightest pixel of its frame (within 1.5 px)."""
  checked = 0
  for b, q, t in zip(*np.nonzero(~batch["occluded"]), strict=True):
    x, y = batch["tracks"][b, q, t]
    iy, ix = np.unravel_index(video_BTHW3[b, t].sum(-1).argmax(), video_BTHW3.shape[2:4])
    assert abs(ix + 0.5 - x) <= 1.5 and abs(iy + 0.5 - y) <= 1.5, (b, q, t, x, y, ix, iy)
    checked += 1
  return checked


def test_train_tracks_follow_crop_scale_and_flip(tracks_data):
  args = dict(global_batch_size=8, seed=0, process_index=0, process_count=1, num_points=3)
  plain = next(pipeline.train_iterator(tracks_data, "train", flip=False, **args, **TRACK_CLIP))
  batch = next(pipeline.train_iterator(tracks_data, "train", **args, **TRACK_CLIP))
  assert batch["tracks"].shape == (8, 3, 4, 2) and batch["tracks"].dtype == np.float32
  assert batch["occluded"].shape == (8, 3, 4) and batch["occluded"].dtype == bool
  assert batch["query_points"].shape == (8, 3, 3) and batch["point_mask"].shape == (8, 3)
  # Only point 0 is ever visible: it fills all 3 slots; the occluded-throughout video has none.
  rows_with_points = batch["point_mask"].all(axis=1)
  np.testing.assert_array_equal(rows_with_points, ~batch["occluded"].all(axis=(1, 2)))
  assert rows_with_points.sum() == 7 and not batch["point_mask"][~rows_with_points].any()
  assert _assert_points_on_the_blob(batch, batch["video"]) > 40
  # The blob leaves some crops: those frames are occluded and the point lies outside the clip.
  outside = batch["occluded"] & batch["point_mask"][:, :, None]
  assert outside.any()
  x, y = batch["tracks"][outside].T
  assert np.all((x < 0) | (x > 24) | (y < 0) | (y > 24))
  # A flipped clip mirrors x; an unflipped one is the flip=False example.
  pairs = zip(batch["video"], plain["video"], strict=True)
  mirrored = [np.array_equal(f, p[:, :, ::-1]) for f, p in pairs]
  assert any(mirrored) and not all(mirrored)
  for row, m in enumerate(mirrored):
    if not batch["point_mask"][row].any():
      continue  # nothing visible: all-zero placeholder tracks
    want = plain["tracks"][row].copy()
    if m:
      want[..., 0] = 24 - want[..., 0]
    np.testing.assert_allclose(batch["tracks"][row], want, atol=1e-5)
  # Query (t, y, x): a frame where the point is visible, at its position there.
  for b, q in zip(*np.nonzero(batch["point_mask"]), strict=True):
    t, qy, qx = batch["query_points"][b, q]
    assert not batch["occluded"][b, q, int(t)]
    np.testing.assert_allclose((qx, qy), batch["tracks"][b, q, int(t)])


def test_eval_tracks_query_first_visible_and_mask_padding(tracks_data):
  def run(process_index, process_count):
    it = pipeline.eval_iterator(
      tracks_data,
      "train",
      global_batch_size=6,
      num_points=2,
      process_index=process_index,
      process_count=process_count,
      **TRACK_CLIP,
    )
    return list(it)

  batches = run(0, 1)
  assert [b["video"].shape[:2] for b in batches] == [(6, 1), (6, 1)]  # [B, V=1, ...]
  video = np.concatenate([b["video"][:, 0] for b in batches])
  tracks = {k: np.concatenate([b[k] for b in batches]) for k in ("tracks", "occluded")}
  query = np.concatenate([b["query_points"] for b in batches])
  mask = np.concatenate([b["point_mask"] for b in batches])
  np.testing.assert_array_equal(mask.all(axis=1), [True] * 7 + [False] * 5)  # 7: none visible
  assert _assert_points_on_the_blob(tracks, video) > 15
  for b in range(7):
    first = int(np.argmax(~tracks["occluded"][b, 0]))
    np.testing.assert_allclose(query[b, 0], [first, *tracks["tracks"][b, 0, first][::-1]])
  assert_batches_equal(concat([run(p, 2) for p in range(2)]), batches)
  with pytest.raises(ValueError, match="needs one eval view"):
    pipeline.eval_iterator(
      tracks_data, "train", global_batch_size=6, num_points=2, num_crops=3, **TRACK_CLIP
    )


def test_tracks_asked_of_data_without_tracks_is_a_clear_error(tiny_data):
  with pytest.raises(
    ValueError,
    match=r"record 0 of shard .*train.array_record-00000-of-00003.*"
    r"no point tracks but num_points=4",
  ):
    train(tiny_data, num_points=4)


def test_stats_count_looped_clips_and_stay_on_the_host(tiny_data):
  batch = next(train(tiny_data))
  assert batch["stats/looped_clips"] == 0 and batch["stats/skipped_records"] == 0
  assert isinstance(batch["stats/looped_clips"], np.integer)
  # 8 frames at stride 2 span 15 frames of the 12-frame videos: every clip loops.
  assert next(train(tiny_data, num_frames=8))["stats/looped_clips"] == 8
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  arrays = pipeline.global_batch(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
  assert set(arrays) == {"video", "label"}


def _unreadable(path):
  reader = shards.open_reader(path)
  bad = []
  for i in range(reader.num_records()):
    try:
      reader.read([i])
    except RuntimeError:
      bad.append(i)
  return bad


def test_corrupt_records_are_named_or_skipped_deterministically(tiny_data, tmp_path, corrupt_copy):
  data, path = corrupt_copy(tiny_data, tmp_path / "bad", "train", 1, 0.25)
  bad = _unreadable(path)
  assert len(bad) == 1  # the flipped bytes hit one record's chunk
  it = train(data)
  with pytest.raises(pipeline.CorruptRecordError, match=rf"record {bad[0]} of shard {path}"):
    take(it, 5)  # 5 x 8 positions cover the 36 records of the first epoch
  skipping = take(train(data, skip_corrupt_records=True), 5)
  assert sum(int(b["stats/skipped_records"]) for b in skipping) == 1
  assert all(b["video"].shape == (8, 4, 24, 24, 3) for b in skipping)
  per_process = [
    take(train(data, skip_corrupt_records=True, process_index=p, process_count=2), 5)
    for p in range(2)
  ]
  assert_batches_equal(concat(per_process), skipping)
  # Only the bad record's rows change: the rest of the stream is the clean data's.
  clean = take(train(tiny_data), 5)
  changed = [
    (k, r)
    for k, (a, b) in enumerate(zip(clean, skipping, strict=True))
    for r in range(8)
    if not np.array_equal(a["video"][r], b["video"][r])
  ]
  assert len(changed) == 1
  evals = list(
    pipeline.eval_iterator(
      data,
      "train",
      global_batch_size=8,
      process_index=0,
      process_count=1,
      skip_corrupt_records=True,
      **CLIP,
    )
  )
  assert sum(int(b["stats/skipped_records"]) for b in evals) == 1
  assert sum(int(b["mask"].sum()) for b in evals) == 35


def test_check_split_opens_every_shard_and_names_the_broken_one(tiny_data, tmp_path, corrupt_copy):
  assert pipeline.check_split(tiny_data, "train") == 36
  assert pipeline.check_split(tiny_data, "validation") == 20
  with pytest.raises(ValueError, match=rf"directory {tmp_path / 'nope'} does not exist"):
    pipeline.check_split(str(tmp_path / "nope"), "train")
  with pytest.raises(ValueError, match=r"No shards for split 'val'.*\['train', 'validation'\]"):
    pipeline.check_split(tiny_data, "val")
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    pipeline.check_split(str(tmp_path / "file"), "train")
  # The middle of a two-block file is a block header: the whole shard is unreadable.
  data, path = corrupt_copy(tiny_data, tmp_path / "bad", "validation", 0, 0.5)
  with pytest.raises(ValueError, match=rf"Cannot open shard {path}.*re-convert the split"):
    pipeline.check_split(data, "validation")
  with pytest.raises(ValueError, match=rf"Cannot open shard {path}"):
    pipeline.eval_iterator(data, "validation", global_batch_size=8, **CLIP)


def test_points_land_on_the_same_image_content_to_a_fraction_of_a_pixel():
  # A Gaussian blob at a sub-pixel position: after crop_resize (and a mirror), the intensity
  # centroid of the output is where transform_points puts the point.
  rng = np.random.default_rng(0)
  grid_y, grid_x = np.mgrid[0:60, 0:80] + 0.5
  for _ in range(6):
    x, y = rng.uniform(30, 50), rng.uniform(22, 38)
    frame = np.exp(-((grid_x - x) ** 2 + (grid_y - y) ** 2) / (2 * 3.0**2)) * 255
    frames = np.repeat(frame[None, ..., None], 3, axis=-1).round().astype(np.uint8)
    box = transforms.train_box(rng, 60, 80, 24, (0.875, 1.33))
    out = transforms.crop_resize(frames, box, 24)[0, ..., 0].astype(float)
    for flip in (False, True):
      image = out[:, ::-1] if flip else out
      tracks, occluded = transforms.transform_points(
        np.array([[[x, y]]]), np.zeros((1, 1), bool), box, 24, flip
      )
      weights = image / image.sum()
      centroid = ((np.arange(24) + 0.5) @ weights.sum(0), (np.arange(24) + 0.5) @ weights.sum(1))
      np.testing.assert_allclose(tracks[0, 0], centroid, atol=0.25)
      assert not occluded[0, 0]
  far, occluded = transforms.transform_points(
    np.array([[[0.0, 0.0], [np.nan, 1.0]]]), np.zeros((1, 2), bool), (10, 10, 34, 34), 24
  )
  np.testing.assert_array_equal(occluded, [[True, True]])
  np.testing.assert_allclose(far[0, 0], [-10, -10])
