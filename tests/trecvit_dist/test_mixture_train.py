"""Training on data.mixture through the real trainer: TubeViT on generated images (1 frame, their
own head) and synthetic videos (4 frames, another head), one compiled step per distinct (head,
shape), per-member evaluation, the mixture state in the checkpoint; bad mixtures refused before
any compile."""

import json
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import mixture
from trecvit_dist import checkpointing, init_from, models, train
from trecvit_dist.tasks.classification import MixtureClassifier

SEED = 0
TUBES = ((1, 8, 8, 2, 8, 8, 0, 0, 0), (4, 8, 8, 4, 8, 8, 0, 0, 0))  # the demo config's


def mixture_config(load_config_fn, shrink_fn, members, **overrides):
  """configs/tubevit_mixture_synthetic.py shrunk as every trainer test (batch 8, 3 steps, 4
  frames of 32x32), a one-block TubeViT 24 wide, with `members` as data.mixture."""
  fields = {"model.width": 24, "model.depth": 1, "model.mlp_dim": 32, "data.path": ""}
  config = shrink_fn(load_config_fn("tubevit_mixture_synthetic"), "", **fields, **overrides)
  config.data.mixture = tuple(members)
  config.seed = SEED
  return config


def test_trains_an_image_and_a_video_head_on_one_model(
  load_config_fn, shrink_fn, tiny_data, tmp_path, caplog
):
  images = dict(kind="images", num_train=16, num_validation=8, size=32, seed=0, num_classes=2)
  members = (
    dict(path="", weight=1.0, head="images", synthetic=images),
    dict(path=str(tiny_data), weight=1.0, head="video"),
    # The same head and frames as member 1: shares its compiled step.
    dict(path=str(tiny_data), weight=0.5, head="video"),
  )
  order = [mixture.member_of_step(SEED, s, (1.0, 1.0, 0.5)) for s in range(3)]
  assert 0 in order and set(order) & {1, 2}, f"the seed must draw both heads in 3 steps: {order}"
  config = mixture_config(load_config_fn, shrink_fn, members, checkpoint_every_steps=2)
  workdir = tmp_path / "run"
  with caplog.at_level("INFO"):  # one device: the compiles are this test's cost
    run = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])

  compiles = [r.getMessage() for r in caplog.records if "Compiling the train step" in r.message]
  assert len(compiles) == 2, compiles  # (images, 1 frame) and (video, 4 frames)
  assert sorted(run.train_losses) == [1, 2, 3]
  # Zero-initialised heads: step 1's loss is log(classes) of the head its dataset trains.
  assert run.train_losses[1] == pytest.approx(math.log(2 if order[0] == 0 else 4), rel=1e-5)
  assert all(np.isfinite(v) for v in run.train_losses.values())
  assert set(run.eval_metrics) == {
    f"{name}/{metric}" for name in ("images", "video.1", "video.2") for metric in ("loss", "top1")
  }
  # The two video members evaluate the same split with the same head and parameters.
  assert run.eval_metrics["video.1/loss"] == run.eval_metrics["video.2/loss"]
  heads = run.state["params"]["heads"]
  rep = config.model.rep_size  # the pre-logits width
  assert heads["images"]["head"]["kernel"].shape == (rep, 2)  # each dataset's classes.txt
  assert heads["video"]["head"]["kernel"].shape == (rep, 4)
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary["eval"]) == set(run.eval_metrics)

  # The checkpoint holds every member's iterator position, after exactly 3 global batches.
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=0, keep=1, read_only=True)
  step, _, data_state = ckpt.read()
  saved_config = ckpt.saved_config()[1]
  ckpt.close()
  assert step == 3 and data_state["step"] == 3
  per_member = [s["global_batches"] for s in data_state["members"]]
  assert per_member == [order.count(i) for i in range(3)]
  # Synthetic members were generated into the workdir; the saved config keeps their empty path
  # (a copied workdir resumes on its own copy).
  assert saved_config["data"]["mixture"][0]["path"] == ""
  assert (workdir / "data" / "0_images" / "classes.txt").read_text().split() == [
    "top_left",
    "top_right",
  ]


def test_bad_mixtures_are_refused_before_compiling(load_config_fn, shrink_fn, tiny_data, tmp_path):
  workdir = tmp_path / "never"
  bad = (
    dict(path=str(tiny_data), weight=-1.0, head="video"),
    dict(path=str(tmp_path / "missing"), weight=1.0, head="images"),
  )
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(mixture_config(load_config_fn, shrink_fn, bad), str(workdir))
  assert "data.mixture[0].weight must be a number > 0" in str(e.value)
  assert not workdir.exists()  # weights refused before the paths are even opened

  with pytest.raises(ValueError, match=r"data.mixture\[0\] \(head 'images'\) path=.*missing"):
    train.train_and_evaluate(mixture_config(load_config_fn, shrink_fn, bad[1:]), str(workdir))
  assert not workdir.exists()

  # TRecViT's 2-frame tubelet cannot take a 1-frame image (TubeViT can: test above).
  image_dir = tmp_path / "images"
  mixture.ensure_images(str(image_dir), num_train=4, num_validation=4, size=32)
  members = (
    dict(path=str(image_dir), weight=1.0, head="images"),
    dict(path=str(tiny_data), weight=1.0, head="video"),
  )
  config = mixture_config(load_config_fn, shrink_fn, members)
  config.model = load_config_fn("synthetic_tiny").model
  config.model.update(dict(width=24, depth=1, mlp_dim=32, num_heads=2, patch_size=(2, 8, 8)))
  with pytest.raises(ValueError, match=r"data.mixture\[0\] \(.*images, 1 frames\).*patch size"):
    train.train_and_evaluate(config, str(tmp_path / "trecvit"))
  assert not (tmp_path / "trecvit" / "checkpoints").exists()


def test_an_imagenet_vit_fills_the_shared_encoder_and_the_heads_start_fresh(tmp_path):
  family = models.get("tubevit")
  fields = dict(width=24, depth=1, mlp_dim=32, num_heads=2, tubes=TUBES)
  cfg = family.make_config(fields, num_classes=2, num_frames=4, image_size=32)
  model = MixtureClassifier(family.build(cfg), (("images", 2), ("video", 4)), 2, 32)
  video = jax.ShapeDtypeStruct((1, 4, 32, 32, 3), jnp.float32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  rng = np.random.default_rng(0)
  fresh = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  # An ImageNet ViT in the vision_transformer layout (attention _1, norms _0 and _2, MLP _3).
  rename = {"MultiHeadDotProductAttention_0": "_1", "LayerNorm_1": "_2", "MlpBlock_0": "_3"}
  vit = {}
  for key, value in flax.traverse_util.flatten_dict(fresh["Transformer"], sep="/").items():
    for ours, number in rename.items():
      key = key.replace(f"/{ours}/", f"/{ours[:-2]}{number}/")
    vit[f"Transformer/{key}"] = rng.normal(size=value.shape).astype(np.float32)
  vit["embedding/kernel"] = rng.normal(size=(8, 8, 3, 24)).astype(np.float32)
  vit["embedding/bias"] = rng.normal(size=(24,)).astype(np.float32)
  vit["cls"] = np.zeros((1, 1, 24), np.float32)
  vit["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 17, 24), np.float32)
  vit["head/kernel"] = np.zeros((24, 1000), np.float32)
  vit["head/bias"] = np.zeros((1000,), np.float32)
  np.savez(tmp_path / "vit.npz", **vit)

  params = init_from.load(
    fresh,
    str(tmp_path / "vit.npz"),
    family=family,
    model_cfg=cfg,
    image_size=32,
    fresh_prefixes=("heads/", "pool/"),
  )
  block = params["Transformer"]["encoderblock_0"]
  np.testing.assert_array_equal(
    block["LayerNorm_1"]["scale"], vit["Transformer/encoderblock_0/LayerNorm_2/scale"]
  )
  np.testing.assert_array_equal(params["tubes"]["tube_0"]["kernel"][0], vit["embedding/kernel"])
  for fresh_key in ("heads", "pool"):  # ours: not in an image classifier
    same = jax.tree.map(np.array_equal, params[fresh_key], fresh[fresh_key])
    assert all(jax.tree.leaves(same)), fresh_key
