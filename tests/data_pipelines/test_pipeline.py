"""Grain pipeline: shapes, global batch order independent of processes/workers, resume, errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import pipeline, transforms

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
  """Per-process batch lists -> global batches (rows of process p come p-th)."""
  return [
    {k: np.concatenate([b[k] for b in step]) for k in step[0]}
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
