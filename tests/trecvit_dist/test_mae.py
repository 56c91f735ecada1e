"""MAE pre-training with tube masking, and the frozen-feature readout.

Tube masks (exact k, deterministic, one mask for all frames); the encoder on visible tubes equals
the encoder on manually gathered tokens and costs < 0.25x the FLOPs; the loss sees masked patches
only; PSNR; the pixel probe leaves the encoder's gradient alone; eval sums and images; the readout's
encoder is frozen; encoder parameters load from the official fixture with its decoder ignored.
"""

import functools
import json
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trecvit_dist import experiment, init_from, official, sharding
from trecvit_dist.models import TRecViT, from_official_json
from trecvit_dist.models import trecvit as trecvit_family
from trecvit_dist.models.trecvit import Encoder, Tokenizer
from trecvit_dist.tasks import mae as mae_lib
from trecvit_dist.tasks.readout import ReadoutModel, frozen_encoder_tx

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "official_trecvit"
TOL = 1e-5  # simple modules, float32 (STYLE.md 10)
FIXTURE_TOL = 1e-4  # the official fixture's tolerance

# Jitted: one compile instead of a dispatch (and a compile) per eager op.
tube_mask = jax.jit(mae_lib.tube_mask, static_argnums=(1, 2, 3))
psnr_per_video = jax.jit(mae_lib.psnr_per_video)


def shrunk_mae_config(load_config_fn, **fields):
  """configs/synthetic_mae_tiny.py shrunk like tests/trecvit_dist/conftest.py's shrink."""
  config = load_config_fn("synthetic_mae_tiny")
  config.model.width, config.model.mlp_dim, config.model.num_heads = 32, 64, 2
  config.model.rep_size = 32
  config.data.num_frames = 4
  config.mae.decoder_width, config.mae.decoder_heads = 16, 2
  # The K400 config's targets (normalised patches: PSNR then comes from the pixel probe).
  config.mae.norm_pix, config.mae.ratio = True, 0.75
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def build(config, num_classes):
  """(model config, the task's model) as the trainer builds them."""
  task = experiment.make_task(config, num_classes)
  return task.model_cfg, task.build_model()


def make_mae(config):
  cfg, model = build(config, num_classes=4)
  d = config.data
  video = jnp.zeros((1, d.num_frames, d.image_size, d.image_size, 3), jnp.float32)
  return cfg, model, init_params(model, video)


def init_params(model, video):
  """Unboxed params, jitted (eager init dispatches op by op). An rbg key: threefry's init
  compiles 2-3x slower on CPU, and these tests need some parameters, not the trainer's."""
  init = jax.jit(lambda r, v: nn.meta.unbox(model.init(r, v)["params"]))
  return init(jax.random.key(0, impl="rbg"), video)


@pytest.fixture(scope="module")
def mae_setup(load_config_fn):
  config = shrunk_mae_config(load_config_fn)
  cfg, model, params = make_mae(config)
  video = jax.random.uniform(jax.random.key(1), (2, 4, 32, 32, 3))
  return config, cfg, model, params, video


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
  "n, ratio, k", [(196, 0.9, 20), (64, 0.9, 6), (16, 0.75, 4), (10, 0.25, 7), (8, 0.0, 8)]
)
def test_tube_mask_shapes_and_exact_k(n, ratio, k):
  keep, mask = tube_mask(jax.random.key(0), 3, n, ratio)
  assert keep.shape == (3, k) and keep.dtype == jnp.int32
  assert mask.shape == (3, n) and mask.dtype == jnp.bool_
  keep, mask = np.asarray(keep), np.asarray(mask)
  np.testing.assert_array_equal((~mask).sum(axis=1), k)
  for row in range(3):
    assert np.all(np.diff(keep[row]) > 0)  # ascending, no repeats
    assert not mask[row, keep[row]].any()


def test_tube_mask_deterministic_per_rng_and_rejects_empty():
  a = tube_mask(jax.random.key(7), 4, 64, 0.9)
  b = tube_mask(jax.random.key(7), 4, 64, 0.9)
  c = tube_mask(jax.random.key(8), 4, 64, 0.9)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert len({tuple(row) for row in np.asarray(a[0])}) == 4  # one mask per video
  for ratio in (1.0, 0.99, -0.1):
    with pytest.raises(ValueError, match="mask ratio"):
      mae_lib.num_visible(16, ratio)


def test_masked_positions_are_tubes_over_all_frames():
  video = jax.random.uniform(jax.random.key(0), (2, 6, 32, 32, 3))
  keep, mask = tube_mask(jax.random.key(1), 2, 16, 0.75)
  pixels = mae_lib.patchify(video, (1, 8, 8))
  grid = jax.jit(mae_lib.reconstruction_grid, static_argnums=(3, 4))(
    video, pixels, mask, (1, 8, 8), 6
  )
  grid = np.asarray(grid)
  assert grid.shape == (2, 3 * 32, 6 * 32, 3) and grid.dtype == np.uint8
  masked_row = grid[:, 32:64].reshape(2, 32, 6, 32, 3).transpose(0, 2, 1, 3, 4)
  grey = np.all(mae_lib.patchify(masked_row, (1, 8, 8)) == 128, axis=-1)  # [b, t, n]
  np.testing.assert_array_equal(grey, np.broadcast_to(np.asarray(mask)[:, None], grey.shape))
  # The input row is the input; reconstruction with the true pixels is the input too.
  np.testing.assert_array_equal(grid[:, :32], grid[:, 64:])


# ----------------------------------------------------------------------------- encoder


def test_encoder_on_visible_tubes_equals_encoder_on_gathered_tokens(mae_setup):
  """Also: the MAE's tokenizer/ and encoder/ trees are TRecViT's; keep_BK's order is free."""
  _, cfg, model, params, video = mae_setup
  keep, _ = tube_mask(jax.random.key(3), 2, 16, 0.75)

  @jax.jit
  def both(p, v, k):
    masked = model.apply({"params": p}, v, k, method=model.encode)
    tokens = Tokenizer(cfg).apply({"params": p["tokenizer"]}, v)  # all n tubes + CLS
    visible = jnp.take_along_axis(tokens[:, :, 1:], k[:, None, :, None], axis=2)
    gathered = jnp.concatenate([tokens[:, :, :1], visible], axis=2)
    # The decoder puts tokens back by position: the order of keep_BK does not matter.
    sorted_, reversed_ = (model.apply({"params": p}, v, kk)["pred"] for kk in (k, k[:, ::-1]))
    return masked, Encoder(cfg).apply({"params": p["encoder"]}, gathered)[0], sorted_, reversed_

  masked, expected, pred, pred_reversed = both(params, video, keep)
  np.testing.assert_allclose(pred_reversed, pred, atol=TOL, rtol=0)
  assert masked.shape == (2, 4, 1 + 4, cfg.width)
  np.testing.assert_allclose(masked, expected, atol=TOL, rtol=0)
  # tokenizer/ and encoder/ are TRecViT's, parameter for parameter.
  trecvit = jax.eval_shape(TRecViT(cfg).init, jax.random.key(0), video)["params"]
  for name in ("tokenizer", "encoder"):
    assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(trecvit[name])) == jax.tree.map(
      lambda x: x.shape, params[name]
    )


def test_masked_encoder_flops_and_memory_scale_with_visible_fraction(load_config_fn):
  config = shrunk_mae_config(load_config_fn, **{"data.image_size": 64, "data.num_frames": 2})
  cfg, model = build(config, num_classes=4)
  video = jax.ShapeDtypeStruct((2, 2, 64, 64, 3), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  keep = jax.ShapeDtypeStruct((2, mae_lib.num_visible(64, 0.9)), jnp.int32)  # 6 of 64 tubes

  def cost(*args):
    """(FLOPs, temp bytes) of a training-like pass: the encoder forward and its backward."""

    def grad(p, v, *k):
      return jax.grad(lambda q: jnp.sum(model.apply({"params": q}, v, *k, method=model.encode)))(p)

    compiled = jax.jit(grad).lower(*args).compile()
    c = compiled.cost_analysis()
    return (c[0] if isinstance(c, list) else c)[
      "flops"
    ], compiled.memory_analysis().temp_size_in_bytes

  (masked_flops, masked_temp), (full_flops, full_temp) = (
    cost(params, video, keep),
    cost(params, video),
  )
  assert masked_flops < 0.25 * full_flops, (masked_flops, full_flops)  # 0.16x measured
  assert masked_temp < 0.2 * full_temp, (masked_temp, full_temp)  # activations: 0.10x measured


# ----------------------------------------------------------------------------- loss, PSNR


def test_loss_counts_only_masked_patches():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 2, 3, 16, 12)).astype(np.float32)
  _, mask = tube_mask(jax.random.key(2), 2, 16, 0.75)
  mask = np.asarray(mask)

  @jax.jit
  def loss_and_grad(p, t):
    return jax.value_and_grad(lambda q: jnp.mean(mae_lib.masked_mse_per_video(q, t, mask)))(p)

  loss, grad = loss_and_grad(pred, target)
  visible, masked = np.flatnonzero(~mask[0])[0], np.flatnonzero(mask[0])[0]
  moved = pred.copy()
  moved[0, 1, visible] += 5.0
  assert loss_and_grad(moved, target)[0] == loss
  moved[0, 1, masked] += 5.0
  assert loss_and_grad(moved, target)[0] != loss
  grad_BTN = np.abs(np.asarray(grad)).sum(-1)
  mask_BTN = np.broadcast_to(mask[:, None], grad_BTN.shape)
  assert np.all(grad_BTN[~mask_BTN] == 0) and np.all(grad_BTN[mask_BTN] > 0)
  # The mean over the masked patches: errors of 1 there (and 5 elsewhere) give exactly 1.
  ones = np.where(mask[:, None, :, None], target + 1.0, target + 5.0)
  np.testing.assert_allclose(loss_and_grad(ones, target)[0], 1.0, atol=TOL)


def test_normalized_targets_are_per_patch_and_channel():
  patches = np.random.default_rng(0).uniform(0.2, 0.5, (2, 3, 4, 8 * 8 * 3)).astype(np.float32)
  patches[0, 0, 0] = 0.3  # a flat patch: zero variance
  x = np.asarray(jax.jit(mae_lib.normalize_patches)(patches)).reshape(2, 3, 4, 64, 3)
  np.testing.assert_array_equal(x[0, 0, 0], 0.0)
  np.testing.assert_allclose(x.mean(axis=-2), 0.0, atol=TOL)
  np.testing.assert_allclose(x.var(axis=-2)[1], 1.0, atol=1e-3)  # eps 1e-6 vs variance ~7e-3


def test_psnr_known_cases():
  target = np.random.default_rng(0).uniform(0.2, 0.8, (2, 2, 16, 12)).astype(np.float32)
  _, mask = tube_mask(jax.random.key(1), 2, 16, 0.5)
  masked = np.asarray(mask)[:, None, :, None]
  off = np.where(masked, target + 0.1, target + 0.5)  # errors at visible patches do not count
  np.testing.assert_allclose(psnr_per_video(off, target, mask), [20.0, 20.0], atol=1e-4)
  # Predictions are clipped to [0, 1]: overshooting a white target costs nothing.
  white = np.ones_like(target)
  np.testing.assert_allclose(psnr_per_video(white + 3.0, white, mask), [100.0, 100.0])


# ----------------------------------------------------------------------------- task functions


def test_mae_loss_gradients_eval_step_and_images(mae_setup):
  config, cfg, model, params, video = mae_setup
  ratio, norm_pix = config.mae.ratio, config.mae.norm_pix
  assert norm_pix  # the pixel probe is what PSNR uses

  def grads(p, v, rng):
    def losses(q):
      loss, aux = mae_lib.mae_loss(model, q, v, rng, ratio, norm_pix)
      return jnp.stack([loss, aux["loss_pixels"]]), (loss, aux)

    # One vmapped backward pass for both rows: d(loss) and d(loss_pixels).
    jac, (loss, aux) = jax.jacrev(losses, has_aux=True)(p)
    keep, _ = mae_lib.tube_mask(rng, v.shape[0], 16, ratio)
    out = model.apply({"params": p}, v, keep)
    return loss, aux, jax.tree.map(lambda x: x[0], jac), jax.tree.map(lambda x: x[1], jac), out

  # Sharded as the trainer shards (batch over data x fsdp, parameters by their logical names),
  # checked against numpy below.
  mesh = sharding.make_mesh(1, 2, 2, jax.devices()[:4])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    sample = jnp.zeros((1,) + video.shape[1:], video.dtype)
    init_state = experiment.make_init_state(model, optax.identity(), (sample,), 0)
    param_shardings = experiment.state_shardings_for(init_state, mesh, 0)[0]["params"]
    video_sharding = sharding.batch_sharding(mesh, 5)
    loss, aux, g, g_probe, out = jax.jit(
      grads, in_shardings=(param_shardings, video_sharding, None)
    )(
      jax.device_put(params, param_shardings),
      jax.device_put(video, video_sharding),
      jax.random.key(5),
    )
  # The loss is the masked MSE against per-patch, per-channel normalised pixels (numpy here).
  x = np.asarray(video).reshape(2, 4, 4, 8, 4, 8, 3).transpose(0, 1, 2, 4, 3, 5, 6)
  x = x.reshape(2, 4, 16, 64, 3)
  target = ((x - x.mean(-2, keepdims=True)) / np.sqrt(x.var(-2, keepdims=True) + 1e-6)).reshape(
    2, 4, 16, 192
  )
  err = np.mean((np.asarray(out["pred"]) - target) ** 2, axis=-1)
  m = np.broadcast_to(np.asarray(out["mask"])[:, None], err.shape)
  np.testing.assert_allclose(loss, err[m].mean(), rtol=1e-4)
  assert np.isfinite(aux["psnr"]) and np.isfinite(aux["loss_pixels"])

  def nonzero(tree):
    return all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(tree))

  def zero(tree):
    return not any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(tree))

  assert nonzero(g["encoder"]) and nonzero(g["mae_decoder"]["blocks"])
  assert nonzero(g["mae_decoder"]["pred_pixels"])  # the probe trains ...
  assert zero(g_probe["tokenizer"]) and zero(g_probe["encoder"])  # ... reaching nothing else
  assert zero(g_probe["mae_decoder"]["blocks"]) and zero(g_probe["mae_decoder"]["pred"])

  def both(p, b, r):
    sums = mae_lib.mae_eval_sums(model, p, b, r, ratio, norm_pix)
    return sums, mae_lib.mae_images(model, p, b["video"], r, ratio, norm_pix, 4, 3)

  both = jax.jit(both)
  batch = dict(video=video[:, None], label=jnp.array([-1, -1]), mask=jnp.array([True, False]))
  sums, out = both(params, batch, jax.random.key(9))
  again, _ = both(params, batch, jax.random.key(9))
  assert float(sums["count"]) == 1.0
  for k in ("loss", "loss_pixels", "psnr_masked"):
    assert np.isfinite(sums[k]) and float(sums[k]) == float(again[k])
  assert out.shape == (2, 3 * 32, 3 * 32, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- readout


def test_readout_trains_only_the_readout(load_config_fn):
  config = shrunk_mae_config(load_config_fn, task="readout", **{"model.depth": 1})
  cfg, model = build(config, num_classes=5)
  assert isinstance(model, ReadoutModel)
  video = jax.random.uniform(jax.random.key(1), (2, 4, 32, 32, 3))
  params = init_params(model, video)
  assert set(params) == {"tokenizer", "encoder", "readout"}

  @jax.jit
  def grad(p):
    def loss(q):
      logits = model.apply({"params": q}, video, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 3])))

    return jax.grad(loss)(p)

  g = grad(params)
  for name in ("tokenizer", "encoder"):
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g[name])), name
  assert np.any(np.asarray(g["readout"]["head"]["kernel"]) != 0)
  # With a non-zero head (as after a step), every readout parameter gets a gradient.
  head = params["readout"]["head"]["kernel"]
  perturbed = jax.tree.map(lambda x: x, params)
  perturbed["readout"]["head"]["kernel"] = jax.random.normal(jax.random.key(2), head.shape)
  g = grad(perturbed)
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g["readout"]))

  tx = frozen_encoder_tx(optax.adamw(1e-2, weight_decay=0.1))
  stepped = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
    perturbed, g
  )
  for name in ("tokenizer", "encoder"):
    jax.tree.map(np.testing.assert_array_equal, stepped[name], perturbed[name])
  assert np.any(
    np.asarray(stepped["readout"]["query"]) != np.asarray(perturbed["readout"]["query"])
  )


def test_load_encoder_params_from_official_fixture(tmp_path):
  cfg = from_official_json(json.loads((FIXTURE / "tiny_config.json").read_text()))
  flat = official.load_npz(FIXTURE / "tiny_params.npz")
  flat["mae_decoder/mask_token"] = np.zeros((16,), np.float32)  # an MAE workdir's decoder
  params, ignored = trecvit_family.import_encoder(flat, cfg, (32, 32))
  assert set(params) == {"tokenizer", "encoder"}
  expected_ignored = sorted(k for k in flat if k.startswith(("decoder/", "mae_decoder/")))
  assert ignored == expected_ignored and len(ignored) == 5
  loaded = flax.traverse_util.flatten_dict(params, sep="/")
  assert sorted(loaded) == sorted(k for k in flat if k.startswith(("tokenizer/", "encoder/")))
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, flat[k])

  # The frozen features are the official model's encoded tokens.
  io = np.load(FIXTURE / "tiny_io.npz")
  model = ReadoutModel(TRecViT(cfg), cfg.num_classes, cfg.num_heads)
  video = jnp.asarray(io["input_video"])
  shapes = jax.eval_shape(model.init, jax.random.key(0), video[:1])["params"]
  fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(shapes))
  np.savez(tmp_path / "mae.npz", **flat)
  load = functools.partial(
    init_from.load, family=trecvit_family.FAMILY, model_cfg=cfg, image_size=32
  )
  full = load(fresh, str(tmp_path / "mae.npz"), fresh_prefixes=("readout/",))  # as the readout
  jax.tree.map(np.testing.assert_array_equal, full["readout"], fresh["readout"])
  encoded = jax.jit(lambda p, v: model.apply({"params": p}, v, method=model.encode))(full, video)
  np.testing.assert_allclose(encoded, io["output_encoded"], atol=FIXTURE_TOL, rtol=0)

  # Fine-tuning from an encoder-only release: the encoder loads, the classifier starts fresh.
  encoder_only = {k: v for k, v in flat.items() if k.startswith(("tokenizer/", "encoder/"))}
  np.savez(tmp_path / "encoder_only.npz", **encoder_only)
  classifier = TRecViT(cfg)
  shapes = jax.eval_shape(classifier.init, jax.random.key(0), video[:1])["params"]
  fresh = jax.tree.map(lambda x: jnp.full(x.shape, 7.0, x.dtype), nn.meta.unbox(shapes))
  tuned = load(fresh, str(tmp_path / "encoder_only.npz"))
  tuned = flax.traverse_util.flatten_dict(tuned, sep="/")
  assert sorted(k for k in tuned if not k.startswith("decoder/")) == sorted(encoder_only)
  for k, v in tuned.items():
    np.testing.assert_array_equal(
      v, encoder_only[k] if k in encoder_only else np.full(v.shape, 7.0)
    )

  bad = dict(flat)
  bad["encoder/encoder_norm/scale"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError, match="mis-shaped"):
    trecvit_family.import_encoder(bad, cfg, (32, 32))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
  "name, task",
  [
    ("trecvit_mae_k400", "mae"),
    ("synthetic_mae_tiny", "mae"),
    ("trecvit_readout_k400", "readout"),
    ("trecvit_readout_ssv2", "readout"),
  ],
)
def test_configs(load_config_fn, name, task):
  config = load_config_fn(name)
  assert config.task == task
  the_task = experiment.make_task(config, config.model.num_classes)
  model = the_task.build_model()
  mesh_shape = dict(data=1, fsdp=1, tensor=1)
  if task == "mae":
    assert 0.0 < config.mae.ratio < 1.0 and isinstance(model, mae_lib.TRecViTMAE)
    assert the_task.config_errors(mesh_shape) == []
    assert the_task.config_errors(dict(mesh_shape, tensor=5))  # heads % 5
  else:
    assert config.data.scale_jitter == (0.9, 1.33) and config.optimizer.learning_rate == 3e-4
    assert "init_from" in the_task.config_errors(mesh_shape)[0]
  if name.startswith("trecvit_"):
    assert (config.data.num_frames, config.data.stride) == (16, 2)
  if name == "trecvit_mae_k400":
    assert config.mae.ratio == 0.9 and config.optimizer.weight_decay == 0.05
    assert config.total_steps * config.batch_size == 1600 * 240_000
