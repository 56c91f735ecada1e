"""Synthetic memorisation data: recent frames must not give away the frame k steps back."""

import json

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipelines import records, shards, synthetic

SPEC = synthetic.resolve_spec("memorisation")  # the defaults: 64 frames of 32x32
NUM_VIDEOS = 12


@pytest.fixture(scope="module")
def examples():
  return [synthetic.make_example(SPEC, "train", i) for i in range(NUM_VIDEOS)]


def mean_abs(a, b):
  return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()


def test_frames_k_apart_differ_within_and_across_cuts(examples):
  frames = np.stack([e["frames"] for e in examples])
  # Reference: two unrelated frames (other videos) differ by this much on average.
  unrelated = np.mean([mean_abs(frames[i, 40], frames[i - 1, 40]) for i in range(NUM_VIDEOS)])
  for k in (4, 8, 16):
    within, across = [], []
    for e in examples:
      shot = np.searchsorted(e["shot_starts"], np.arange(SPEC["frames"]), side="right")
      for t in range(k, SPEC["frames"]):
        pair = mean_abs(e["frames"][t], e["frames"][t - k])
        (within if shot[t] == shot[t - k] else across).append(pair)
    # Measured at k = 4, 8, 16: within 0.52, 0.65, 0.72 (5th percentile 0.31, 0.39, 0.45) and
    # across 0.92 of unrelated.
    assert np.mean(within) > 0.35 * unrelated, (k, np.mean(within), unrelated)
    assert np.percentile(within, 5) > 0.15 * unrelated, (k, np.percentile(within, 5))
    assert np.mean(across) > 0.8 * unrelated, (k, np.mean(across), unrelated)
  shots = np.concatenate([np.diff(np.append(e["shot_starts"], SPEC["frames"])) for e in examples])
  assert shots.max() <= SPEC["params"]["max_shot"] and (shots[:-1] >= 1).all()
  assert np.mean([len(e["shot_starts"]) for e in examples]) >= 3  # cuts in every video


def test_copying_the_last_frame_is_a_poor_predictor(examples):
  # The task's trivial baseline: predict frame T-1-k of a 32-frame clip by its last frame.
  rng = np.random.default_rng(0)
  for k in (4, 8, 16):
    copy, unrelated = [], []
    for i, e in enumerate(examples):
      for end in rng.integers(31, SPEC["frames"], size=8):
        target = e["frames"][end - k].astype(np.float32) / 255
        copy.append(((e["frames"][end] / 255 - target) ** 2).mean())
        unrelated.append(((examples[i - 1]["frames"][end] / 255 - target) ** 2).mean())
    psnr_gain = 10 * np.log10(np.mean(unrelated) / np.mean(copy))
    # Copying the last frame is barely better than showing another video's frame (measured
    # 2.0, 1.5 and 0.1 dB better at k = 4, 8, 16).
    assert psnr_gain < {4: 3.0, 8: 2.5, 16: 1.5}[k], (k, psnr_gain)


def test_records_unlabelled_deterministic_and_faithful(tmp_path, examples):
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    synthetic.generate(str(tmp_path / name), "train", 3, seed=seed, kind="memorisation")
  names = [shards.shard_name("train", s, 3) for s in range(3)]
  read = lambda n: [(tmp_path / n / name).read_bytes() for name in names]
  assert read("a") == read("b") and read("a") != read("c")
  assert (tmp_path / "a" / "classes.txt").read_text() == ""
  summary = json.loads((tmp_path / "a" / "train.summary.json").read_text())
  assert summary["num_classes"] == 0
  assert {k: summary["synthetic"][k] for k in ("kind", "frames", "size", "params")} == {
    "kind": "memorisation",
    "frames": 64,
    "size": 32,
    "params": {"min_shot": 6, "max_shot": 24},
  }
  source = ArrayRecordDataSource(shards.find_shards(str(tmp_path / "a"), "train"))
  for i in range(3):
    record = records.decode(source[i])
    assert record["label"] == -1 and record["frames"].shape == (64, 32, 32, 3)
    # The stored frames are the generated ones up to JPEG loss (4:2:0 blurs the colour noise).
    assert mean_abs(record["frames"], examples[i]["frames"]) < 10
    assert mean_abs(record["frames"], examples[i + 1]["frames"]) > 40


def test_bad_shot_lengths_get_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="min_shot <= max_shot"):
    synthetic.ensure(str(tmp_path), kind="memorisation", min_shot=10, max_shot=5)
  with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['num_points'\]"):
    synthetic.ensure(str(tmp_path), kind="memorisation", num_points=3)
  assert not list(tmp_path.iterdir())
