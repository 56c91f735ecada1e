"""Synthetic dataset: the class lives only in the motion (one frame is at chance, two suffice)."""

import os

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipelines import records, shards, synthetic

NUM_CLASSES = len(synthetic.CLASSES)


def load(data_dir, split, frame_indices):
  """grey float32 [N, len(frame_indices), S, S] and labels [N]."""
  source = ArrayRecordDataSource(shards.find_shards(data_dir, split))
  decoded = [records.decode(source[i], frame_indices) for i in range(len(source))]
  frames = np.stack([d["frames"] for d in decoded]).astype(np.float32).mean(-1) / 255
  return frames, np.array([d["label"] for d in decoded])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.main(
    ["--out", out, "--split", "train", "--num-videos", "800", "--frames", "4", "--seed", "0"]
  )
  synthetic.main(
    ["--out", out, "--split", "validation", "--num-videos", "800", "--frames", "4", "--seed", "1"]
  )
  return out


def nearest_centroid(x_train, y_train, x_val, y_val):
  centroids = np.stack([x_train[y_train == c].mean(0) for c in range(NUM_CLASSES)])
  distances = ((x_val[:, None] - centroids[None]) ** 2).sum(-1)
  return (distances.argmin(1) == y_val).mean()


def logistic_regression(x_train, y_train, x_val, y_val, steps=150, lr=0.5, l2=1e-3):
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_val = (x_train - mu) / sd, (x_val - mu) / sd
  w = np.zeros((x_train.shape[1], NUM_CLASSES), np.float32)
  b = np.zeros(NUM_CLASSES, np.float32)
  onehot = np.eye(NUM_CLASSES, dtype=np.float32)[y_train]
  for _ in range(steps):
    z = x_train @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / np.float32(len(x_train))
    w -= np.float32(lr) * (x_train.T @ g + np.float32(l2) * w)
    b -= np.float32(lr) * g.sum(0)
  return ((x_val @ w + b).argmax(1) == y_val).mean()


def cross_correlation(frames):
  """Circular cross-correlation of frames 0 and 1 (translation invariant: peaks at the motion)."""
  a = frames[:, 0] - frames[:, 0].mean((1, 2), keepdims=True)
  b = frames[:, 1] - frames[:, 1].mean((1, 2), keepdims=True)
  c = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real
  c /= np.abs(c).max((1, 2), keepdims=True) + 1e-6
  return c.reshape(len(c), -1)


def test_one_frame_is_at_chance(data):
  # 800 validation videos: chance 0.25 with standard deviation 0.015; 0.06 is 4 sigma.
  for t in (0, 3):
    x_train, y_train = load(data, "train", [t])
    x_val, y_val = load(data, "validation", [t])
    flat = lambda x: x.reshape(len(x), -1)
    assert abs(nearest_centroid(flat(x_train), y_train, flat(x_val), y_val) - 0.25) < 0.06
    assert abs(logistic_regression(flat(x_train), y_train, flat(x_val), y_val) - 0.25) < 0.06


def test_two_frames_give_the_class(data):
  # Frames 0 and 2: 2..3 px of motion, well clear of the background's zero-shift peak.
  x_train, y_train = load(data, "train", [0, 2])
  x_val, y_val = load(data, "validation", [0, 2])
  accuracy = nearest_centroid(cross_correlation(x_train), y_train, cross_correlation(x_val), y_val)
  assert accuracy > 0.95


def test_layout_balance_and_determinism(data, tmp_path):
  assert (open(os.path.join(data, "classes.txt")).read().split()) == list(synthetic.CLASSES)
  _, labels = load(data, "validation", [0])
  np.testing.assert_array_equal(np.bincount(labels), [200] * NUM_CLASSES)
  first = records.decode(ArrayRecordDataSource(shards.find_shards(data, "train"))[0])
  assert first["frames"].shape == (4, 32, 32, 3) and first["id"] == "train-0000000"
  synthetic.generate(str(tmp_path / "a"), "train", 8, frames=4, size=16, seed=5, num_shards=2)
  synthetic.generate(str(tmp_path / "b"), "train", 8, frames=4, size=16, seed=5, num_shards=2)
  synthetic.generate(str(tmp_path / "c"), "train", 8, frames=4, size=16, seed=6, num_shards=2)
  name = shards.shard_name("train", 1, 2)
  assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_ensure_generates_missing_splits_once(tmp_path):
  synthetic.ensure(str(tmp_path), num_train=8, num_validation=4, frames=4, size=16)
  summary = tmp_path / "train.summary.json"
  mtime = summary.stat().st_mtime_ns
  synthetic.ensure(str(tmp_path), num_train=8, num_validation=4, frames=4, size=16)
  assert summary.stat().st_mtime_ns == mtime
  assert len(ArrayRecordDataSource(shards.find_shards(str(tmp_path), "validation"))) == 4
