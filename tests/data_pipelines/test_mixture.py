"""data.mixture: the per-step sampler is deterministic and follows the weights, the mixture
iterator resumes bit-exactly from a saved state, members are resolved from the data (an image
dataset made by the real converter reads 1 frame), and bad mixtures are refused naming each
problem."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import convert, mixture, pipeline


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> str:
  """3 classes of 24x20 JPEG images (class = which third is bright), converted by `convert
  --images` with a labels CSV into train (12) and validation (6) one-frame records."""
  root = tmp_path_factory.mktemp("mixture_images")
  rng = np.random.default_rng(0)
  out = root / "data"
  for split, n in (("train", 12), ("validation", 6)):
    folder = root / split
    folder.mkdir()
    rows = ["path,label"]
    for k in range(n):
      image = rng.integers(0, 60, (24, 20, 3), dtype=np.uint8)
      image[:, (k % 3) * 6 : (k % 3) * 6 + 6] = 230
      Image.fromarray(image).save(folder / f"{k}.jpg", quality=95)
      rows.append(f"{k}.jpg,class_{k % 3}")
    (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    args = ["--images", str(folder), "--labels", str(root / f"{split}.csv"), "--out", str(out)]
    assert convert.main([*args, "--split", split, "--num-shards", "2", "--workers", "1"]) == 0
  return str(out)


def mixture_config(*members, **data):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(
    dict(path="", train_split="train", eval_split="validation", num_frames=4, **data)
  )
  c.data.mixture = tuple(members)
  return c


def test_the_sampler_is_a_deterministic_function_of_seed_step_and_weights():
  weights = (1.0, 3.0)
  draws = [mixture.member_of_step(0, s, weights) for s in range(2000)]
  # Steps out of order and alone give the same member: no hidden history.
  assert [mixture.member_of_step(0, s, weights) for s in range(1999, 1799, -1)] == draws[
    1999:1799:-1
  ]
  # 2000 Bernoulli(0.75) draws: standard deviation 0.01, so 0.05 is 5 sigma.
  assert abs(np.mean(draws) - 0.75) < 0.05
  assert draws[:200] != [mixture.member_of_step(1, s, weights) for s in range(200)]
  three = [mixture.member_of_step(5, s, (2.0, 1.0, 1.0)) for s in range(2000)]
  np.testing.assert_allclose(np.bincount(three) / 2000, [0.5, 0.25, 0.25], atol=0.05)


def test_members_are_resolved_from_the_data(image_data, tiny_data):
  config = mixture_config(
    dict(path=image_data, weight=1, head="images"),
    dict(path=tiny_data, weight=2.0, head="video"),
    dict(path=tiny_data, weight=0.5, head="video", num_frames=2),
  )
  members = mixture.members(config)
  assert [(m.head, m.num_frames, m.num_classes, m.name) for m in members] == [
    ("images", 1, 3, "images"),  # one-frame records: an image dataset
    ("video", 4, 4, "video.1"),  # data.num_frames; two members share head "video"
    ("video", 2, 4, "video.2"),
  ]
  assert [m.weight for m in members] == [1.0, 2.0, 0.5]
  assert {(m.train_split, m.eval_split) for m in members} == {("train", "validation")}


def iterators(image_data, tiny_data, batch_size=4, seed=3):
  """The mixture of the image data (1 frame) and the videos (4 frames), weights 1:1."""
  options = dict(
    global_batch_size=batch_size, stride=1, image_size=16, seed=seed, scale_jitter=(0.9, 1.1)
  )
  return mixture.MixtureIterator(
    [
      pipeline.train_iterator(image_data, "train", num_frames=1, **options),
      pipeline.train_iterator(tiny_data, "train", num_frames=4, **options),
    ],
    [1.0, 1.0],
    seed,
  )


def test_the_iterator_resumes_bit_exactly_from_its_state(image_data, tiny_data):
  it = iterators(image_data, tiny_data)
  batches, states = [], []
  for _ in range(8):
    states.append(json.loads(json.dumps(it.get_state())))  # as a checkpoint stores it
    batches.append(next(it))
  it.close()
  members = [b[mixture.MEMBER_KEY] for b in batches]
  assert members == [mixture.member_of_step(3, s, (1.0, 1.0)) for s in range(8)]
  assert set(members) == {0, 1}, "seed 3 should draw both members in 8 steps"
  for b in batches:  # whole batches from one dataset: its frames and labels
    frames = 1 if b[mixture.MEMBER_KEY] == 0 else 4
    assert b["video"].shape == (4, frames, 16, 16, 3)
  assert states[5]["members"][0]["kind"] == "trecvit_train_iterator"

  resumed = iterators(image_data, tiny_data)
  resumed.set_state(states[5])
  for want in batches[5:]:
    got = next(resumed)
    assert got[mixture.MEMBER_KEY] == want[mixture.MEMBER_KEY]
    np.testing.assert_array_equal(got["video"], want["video"])
    np.testing.assert_array_equal(got["label"], want["label"])
  resumed.close()

  other = iterators(image_data, tiny_data, seed=4)
  with pytest.raises(ValueError, match="seed=3 but this run has seed=4"):
    other.set_state(states[5])
  with pytest.raises(ValueError, match="written by a run without data.mixture"):
    other.set_state(states[5]["members"][1])
  other.close()


def test_bad_mixtures_are_refused_naming_every_problem(image_data, tiny_data, tmp_path):
  config = mixture_config(
    dict(path=image_data, weight=0, head="images"),
    dict(path=tiny_data, weight=1.0, head=""),
    dict(path=str(tmp_path / "nowhere"), weight=1.0, head="x", frames=3),
  )
  with pytest.raises(ValueError) as e:
    mixture.members(config)
  message = str(e.value)
  for problem in (
    r"data.mixture[0].weight must be a number > 0",
    r"data.mixture[1].head must name its classifier head",
    r"data.mixture[2] has unknown keys ['frames']",
  ):
    assert problem in message
  missing = mixture_config(
    dict(path=str(tmp_path / "nowhere"), weight=1.0, head="x"),
    dict(path=tiny_data, weight=1.0, head="y", eval_split="test"),
    dict(path=tiny_data, weight=1.0, head="z"),
    dict(path=image_data, weight=1.0, head="z"),
  )
  with pytest.raises(ValueError) as e:
    mixture.members(missing)
  message = str(e.value)
  assert "data.mixture[0] (head 'x') path=" in message and "nowhere" in message
  assert "data.mixture[1] (head 'y')" in message and "split 'test'" in message
  assert "data.mixture[3] (head 'z')" in message and "has 3 classes, not 4" in message
  both = mixture_config(dict(path=tiny_data, weight=1.0, head="v"))
  both.data.path = tiny_data
  with pytest.raises(ValueError, match="data.path=.* and data.mixture are both set"):
    mixture.members(both)
