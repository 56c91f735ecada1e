"""Synthetic motion dataset (the class lives only in the motion: one frame is at chance, two
suffice), the dark variant pinned byte for byte, and `ensure`'s refusal of other parameters."""

import functools
import hashlib
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipelines import records, shards, synthetic

NUM_CLASSES = len(synthetic.CLASSES)


@functools.cache
def _load_all(data_dir, split):
  source = ArrayRecordDataSource(shards.find_shards(data_dir, split))
  decoded = [records.decode(source[i]) for i in range(len(source))]
  frames = np.stack([d["frames"] for d in decoded]).astype(np.float32).mean(-1) / 255
  return frames, np.array([d["label"] for d in decoded])


def load(data_dir, split, frame_indices):
  """grey float32 [N, len(frame_indices), S, S] and labels [N] (decoded once per split)."""
  frames, labels = _load_all(data_dir, split)
  return frames[:, frame_indices], labels


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


@pytest.fixture(scope="module")
def realistic_data(tmp_path_factory):
  """600 + 600 realistic videos of 5 frames (frames 0, 2, 4 for the motion check)."""
  out = str(tmp_path_factory.mktemp("synthetic_realistic"))
  for split, seed in (("train", "0"), ("validation", "1")):
    synthetic.main(
      ["--out", out, "--split", split, "--num-videos", "600", "--frames", "5", "--seed", seed]
      + ["--variant", "realistic"]
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
  x_train_t = np.ascontiguousarray(x_train.T)
  for _ in range(steps):
    z = x_train @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / np.float32(len(x_train))
    w -= np.float32(lr) * (x_train_t @ g + np.float32(l2) * w)
    b -= np.float32(lr) * g.sum(0)
  return ((x_val @ w + b).argmax(1) == y_val).mean()


def cross_correlation(a, b):
  """Circular cross-correlation of two frame stacks [N, S, S] (translation invariant: peaks at
  the motion), normalised, flattened."""
  a = a - a.mean((1, 2), keepdims=True)
  b = b - b.mean((1, 2), keepdims=True)
  c = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real
  c /= np.abs(c).max((1, 2), keepdims=True) + 1e-6
  return c.reshape(len(c), -1)


def power_spectrum(x):
  """log power spectrum of frames [N, S, S], flattened: blind to position, not to orientation
  (a direction-dependent artefact such as H.264 smearing along the motion would show)."""
  x = x - x.mean((1, 2), keepdims=True)
  return np.log(np.abs(np.fft.fft2(x)) ** 2 + 1e-3).reshape(len(x), -1)


@pytest.mark.parametrize("variant", ["dark", "realistic"])
def test_one_frame_is_at_chance(variant, request):
  data_dir = request.getfixturevalue({"dark": "data", "realistic": "realistic_data"}[variant])
  for t in (0, 3):
    x_train, y_train = load(data_dir, "train", [t])
    x_val, y_val = load(data_dir, "validation", [t])
    # Chance 0.25; the tolerance is 4 standard deviations of an accuracy on len(y_val) videos.
    tolerance = 4 * np.sqrt(0.25 * 0.75 / len(y_val))
    flat = lambda x: x.reshape(len(x), -1)
    for features in (flat, power_spectrum):
      f_train, f_val = features(x_train[:, 0]), features(x_val[:, 0])
      assert abs(nearest_centroid(f_train, y_train, f_val, y_val) - 0.25) < tolerance
      assert abs(logistic_regression(f_train, y_train, f_val, y_val) - 0.25) < tolerance


def test_two_frames_give_the_class(data):
  # Frames 0 and 2: 2..3 px of motion, well clear of the background's zero-shift peak.
  x_train, y_train = load(data, "train", [0, 2])
  x_val, y_val = load(data, "validation", [0, 2])
  features = lambda x: cross_correlation(x[:, 0], x[:, 1])
  accuracy = nearest_centroid(features(x_train), y_train, features(x_val), y_val)
  assert accuracy > 0.95


def test_realistic_motion_gives_the_class(realistic_data):
  # The textured background is static, so correlate successive frame differences: they hold
  # the moving objects only (and sensor noise); the largest object dominates the peak.
  x_train, y_train = load(realistic_data, "train", [0, 2, 4])
  x_val, y_val = load(realistic_data, "validation", [0, 2, 4])
  features = lambda x: cross_correlation(x[:, 1] - x[:, 0], x[:, 2] - x[:, 1])
  accuracy = nearest_centroid(features(x_train), y_train, features(x_val), y_val)
  assert accuracy > 0.85  # measured 0.96; chance is 0.25


def test_realistic_videos_look_like_footage(realistic_data):
  x_val, _ = load(realistic_data, "validation", [0, 1, 2, 3, 4])
  # Measured: brightness percentiles 39 and 219, flicker 2.2, H.264 error 6.2 grey levels.
  # Backgrounds of any brightness, not only dark ones.
  brightness = x_val.mean((1, 2, 3)) * 255
  assert np.percentile(brightness, 10) < 70 and np.percentile(brightness, 90) > 180
  # Sensor noise changes every frame: the typical pixel (background, static) still varies.
  flicker = np.median(x_val.std(1) * 255, axis=(1, 2))
  assert np.median(flicker) > 0.5
  # Compression as real video: H.264 changes the frames, moderately.
  rng = lambda: synthetic._rng(0, "train", 3)
  raw = synthetic.make_video(rng(), 3, 16, 32, "realistic", distractors=2, crf=0)
  compressed = synthetic.make_video(rng(), 3, 16, 32, "realistic", distractors=2, crf=23)
  error = np.abs(raw.astype(np.float32) - compressed).mean()
  assert 1 < error < 15, error


def test_h264_roundtrip_keeps_the_picture():
  # A smooth moving gradient: a broken colour conversion or plane layout would wreck it.
  t, y, x = np.meshgrid(np.arange(8), np.arange(32), np.arange(48), indexing="ij")
  frames = np.stack([(x * 5 + t * 3) % 256, y * 7, 255 - y * 4 - x * 2], -1).astype(np.uint8)
  out = synthetic.h264_roundtrip(frames, crf=18)
  assert out.shape == frames.shape and out.dtype == np.uint8
  mse = ((out.astype(np.float64) - frames) ** 2).mean()
  assert 10 * np.log10(255**2 / mse) > 30
  np.testing.assert_array_equal(synthetic.h264_roundtrip(frames, crf=18), out)


def test_layout_balance_and_determinism(data, tmp_path):
  assert (open(os.path.join(data, "classes.txt")).read().split()) == list(synthetic.CLASSES)
  _, labels = load(data, "validation", [0])
  np.testing.assert_array_equal(np.bincount(labels), [200] * NUM_CLASSES)
  first = records.decode(ArrayRecordDataSource(shards.find_shards(data, "train"))[0])
  assert first["frames"].shape == (4, 32, 32, 3) and first["id"] == "train-0000000"
  for variant in ("dark", "realistic"):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
      out = str(tmp_path / variant / name)
      synthetic.generate(out, "train", 8, frames=4, size=16, seed=seed, variant=variant)
    name = shards.shard_name("train", 1, 4)
    shard = [(tmp_path / variant / n / name).read_bytes() for n in "abc"]
    assert shard[0] == shard[1]
    assert shard[0] != shard[2]


# sha256 of make_video's raw frames, computed with the generator as it was when the trainer's
# recorded synthetic_tiny results were measured: the dark variant must stay byte-identical.
DARK_VIDEO_SHA256 = {
  (0, "train", 0, 16, 32): "ffa6c10f3d891f079658f10708f8b5cff574ae041a62a3259d4c3fe7e50dc37f",
  (0, "train", 5, 16, 32): "b1cd11b6024ed2264a23cc7d0cad8935fcbd84cdd0d00b426bc00f944e38574d",
  (1, "validation", 3, 16, 32): "c57120ea48933a38824893da4e98eabb6fc745ae713425203ae2ecbc2ef1aaee",
  (7, "train", 2, 6, 20): "fee3ad529d86fc2a2f50fa4c4c9383e41a9477465408b473122bfc590dd8b693",
}
# sha256 over (id, label, label_name, fps) and the stored JPEG bytes of every record of
# generate(DIR, "train", 8, frames=4, size=16, seed=5, num_shards=2): pins the labels, the
# per-(seed, split, index) random streams and the JPEG settings, not the record header layout.
DARK_SPLIT_SHA256 = "9ba5d92e364cc2f2213ea486198f8950f6dc443f03269fe4032b4fa56932a28c"


def test_dark_variant_is_pinned(tmp_path):
  for (seed, split, index, frames, size), expected in DARK_VIDEO_SHA256.items():
    video = synthetic.make_video(synthetic._rng(seed, split, index), index % 4, frames, size)
    assert hashlib.sha256(video.tobytes()).hexdigest() == expected, (seed, split, index)
    example = synthetic.make_example(
      synthetic.resolve_spec("motion", "dark", frames, size, seed), split, index
    )
    assert hashlib.sha256(example["frames"].tobytes()).hexdigest() == expected
  synthetic.generate(str(tmp_path), "train", 8, frames=4, size=16, seed=5, num_shards=2)
  source = ArrayRecordDataSource(shards.find_shards(str(tmp_path), "train"))
  digest = hashlib.sha256()
  for i in range(len(source)):
    header = records.read_header(source[i])
    digest.update(
      f"{header['id']},{header['label']},{header['label_name']},{header['fps']};".encode()
    )
    for jpeg in records.frame_jpegs(source[i]):
      digest.update(jpeg)
  assert digest.hexdigest() == DARK_SPLIT_SHA256


TINY = dict(num_train=8, num_validation=4, frames=4, size=16)


def test_ensure_generates_missing_splits_once(tmp_path):
  synthetic.ensure(str(tmp_path), **TINY)
  summary = tmp_path / "train.summary.json"
  mtime = summary.stat().st_mtime_ns
  synthetic.ensure(str(tmp_path), **TINY)
  assert summary.stat().st_mtime_ns == mtime
  assert len(ArrayRecordDataSource(shards.find_shards(str(tmp_path), "validation"))) == 4
  recorded = json.loads(summary.read_text())["synthetic"]
  assert recorded["kind"] == "motion" and recorded["variant"] == "dark"
  assert recorded["params"] == {} and len(recorded["fingerprint"]) == 64
  assert len(recorded["signature"]) == 4 * 3  # frames x channels
  # The trainer's call: kind and variant spelled out, the default variant as "" is the same.
  synthetic.ensure(str(tmp_path), kind="motion", variant="", **TINY)
  assert summary.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
  "change",
  [
    dict(variant="realistic"),
    dict(num_train=9),
    dict(frames=5),
    dict(seed=1),
    dict(kind="memorisation"),
  ],
)
def test_ensure_refuses_a_directory_generated_differently(tmp_path, change):
  synthetic.ensure(str(tmp_path), **TINY)
  with pytest.raises(ValueError, match=r"already holds a synthetic 'train' split.*Delete"):
    synthetic.ensure(str(tmp_path), **{**TINY, **change})


def test_ensure_reads_summaries_from_before_kinds_and_detects_a_changed_generator(tmp_path):
  synthetic.ensure(str(tmp_path), **TINY)
  paths = [tmp_path / f"{split}.summary.json" for split in ("train", "validation")]
  for path in paths:  # the summaries the previous generator wrote: frames, size, seed only
    summary = json.loads(path.read_text())
    summary["synthetic"] = {k: summary["synthetic"][k] for k in ("frames", "size", "seed")}
    path.write_text(json.dumps(summary))
  mtime = paths[0].stat().st_mtime_ns
  synthetic.ensure(str(tmp_path), **TINY)
  assert paths[0].stat().st_mtime_ns == mtime
  with pytest.raises(ValueError, match="already holds"):
    synthetic.ensure(str(tmp_path), variant="realistic", **TINY)

  # Video 0 as another CPU's SIMD code may make it: other bytes, the same coarse signature.
  spec = synthetic.resolve_spec(frames=TINY["frames"], size=TINY["size"])
  example = synthetic.make_example(spec, "train", 0)
  recorded = dict(spec, fingerprint="0" * 64, signature=synthetic.signature(example))
  recorded["signature"][0] += 0.2
  paths[0].write_text(json.dumps(dict(json.loads(paths[0].read_text()), synthetic=recorded)))
  synthetic.ensure(str(tmp_path), **TINY)
  # A changed generator moves the signature too: refused.
  recorded["signature"][0] += 1
  paths[0].write_text(json.dumps(dict(json.loads(paths[0].read_text()), synthetic=recorded)))
  with pytest.raises(ValueError, match="differs from what the current generator makes"):
    synthetic.ensure(str(tmp_path), **TINY)


def test_bad_parameters_get_clear_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match="Unknown synthetic kind 'motoin'"):
    synthetic.resolve_spec("motoin")
  with pytest.raises(ValueError, match="Unknown motion variant 'bright'"):
    synthetic.resolve_spec("motion", "bright")
  with pytest.raises(ValueError, match="applies to kind 'motion' only"):
    synthetic.resolve_spec("tracking", "realistic")
  with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['crf'\] for kind 'motion'"):
    synthetic.resolve_spec("motion", "dark", params=dict(crf=20))
  with pytest.raises(ValueError, match="distractors of kind 'motion', variant 'realistic' must be"):
    synthetic.resolve_spec("motion", "realistic", params=dict(distractors=1.5))
  with pytest.raises(ValueError, match="even size"):
    synthetic.resolve_spec("motion", "realistic", size=33)
  with pytest.raises(ValueError, match="num_videos >= 1"):
    synthetic.generate(str(tmp_path), "train", 0)
  with pytest.raises(SystemExit):
    synthetic.main(["--out", str(tmp_path), "--split", "x", "--num-videos", "2", "--param", "z"])
  assert "NAME=VALUE" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing written on bad input


def test_cli_kind_variant_and_params(tmp_path):
  out = str(tmp_path / "realistic")
  argv = ["--out", out, "--split", "train", "--num-videos", "2", "--frames", "3"]
  synthetic.main(argv + ["--variant", "realistic", "--param", "distractors=0", "--param", "crf=0"])
  recorded = json.loads((tmp_path / "realistic" / "train.summary.json").read_text())["synthetic"]
  assert recorded["variant"] == "realistic"
  assert recorded["params"] == {"distractors": 0, "crf": 0}
  assert recorded["size"] == synthetic.DEFAULT_SIZE
  # An unlabelled kind: empty classes.txt, label -1, its own default size.
  out = str(tmp_path / "memorisation")
  synthetic.main(["--out", out, "--split", "train", "--num-videos", "2", "--kind", "memorisation"])
  assert (tmp_path / "memorisation" / "classes.txt").read_text() == ""
  record = records.decode(ArrayRecordDataSource(shards.find_shards(out, "train"))[1])
  assert record["label"] == -1 and record["label_name"] == ""
  with pytest.raises(ValueError, match="other classes"):
    synthetic.generate(out, "validation", 2, frames=4, size=16)  # motion into it
