"""TubeViT: token counts against the convolution arithmetic, the fixed sin-cos position of each
tube's centre, images as the ViT's patch tokens, interpolated kernels, ImageNet-ViT import,
parameter counts, FLOPs against XLA, sharded == one device, the trainer, a TPU compile, and bad
configs refused before compiling."""

import math
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import experiment, init_from, models, sharding, train
from trecvit_dist.models import tubevit

RTOL = 1e-5  # sharded vs single-device (as tests/trecvit_dist/test_train.py)
FAMILY = models.get("tubevit")
# On tiny_config's 4x32x32 clips: 2-D patches every other frame (2 x 16 tokens), 2x8x8 tubes
# (2 x 2 x 2) and 4x4x4 tubes (1 x 4 x 4): 56 tokens.
TINY_TUBES = (
  (1, 8, 8, 2, 8, 8, 0, 0, 0),
  (2, 8, 8, 2, 16, 16, 0, 4, 4),
  (4, 4, 4, 4, 8, 8, 0, 2, 2),
)
TINY = dict(width=48, depth=1, mlp_dim=64, num_heads=2, tubes=TINY_TUBES)


def tiny(tiny_config, **overrides):
  """synthetic_tiny shrunk (4 frames of 32x32, batch 8), as a one-block TubeViT 48 wide."""
  fields = {"model.name": "tubevit", "model.width": 48, "model.depth": 1}
  return tiny_config(**{**fields, "model.tubes": TINY_TUBES, **overrides})


def make_cfg(**fields):
  return FAMILY.make_config({**TINY, **fields}, num_classes=4, num_frames=4, image_size=32)


def random_params(model, video, scale=0.3):
  """Parameters of the model's shapes drawn from N(0, scale^2) with numpy (no zero-initialised
  bias or head hiding a term, nothing to compile)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes)


def tubes_apply(cfg, params, video):
  """The tokenizer alone (tokens + position) [b, L, c], jitted."""
  return jax.jit(tubevit.SparseTubes(cfg).apply)({"params": params["tubes"]}, video)


# ----------------------------------------------------------------------------- tokens, position


def positions_along(size, kernel, stride, offset):
  """Start of every whole kernel along one axis: offset, offset + stride, ... (<= size - kernel)."""
  return list(range(offset, size - kernel + 1, stride))


def test_token_counts_follow_the_convolution_arithmetic():
  cfg = make_cfg(tubes=tubevit.PAPER_TUBES)
  model = tubevit.TubeViT(cfg)
  for frames, size in ((32, 224), (64, 224), (16, 224), (8, 112), (20, 160), (1, 224)):
    per_tube = [
      math.prod(
        len(positions_along(n, tube[i], tube[3 + i], tube[6 + i]))
        for i, n in enumerate((frames, size, size))
      )
      for tube in cfg.tubes
    ]
    video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), video)
    tokens = jax.eval_shape(lambda p, v: model.apply(p, v, method=model.tokens), params, video)
    assert tokens.shape == (1, 1, sum(per_tube), 48), (frames, size)
    assert tubevit.num_tokens(cfg, (frames, size, size)) == per_tube
    assert FAMILY.token_grid(cfg, frames, size).width == sum(per_tube)
  # The paper's clip: 98 + 147 + 98 + 196 = 539 tokens (the paper writes 559), of which its 2-D
  # patches every 16th frame would be 392 (as the paper says); an image: ViT-B/16's 196 patches.
  assert tubevit.num_tokens(cfg, (32, 224, 224)) == [98, 147, 98, 196]
  assert (
    sum(tubevit.num_tokens(cfg.replace(tubes=((1, 16, 16, 16, 16, 16, 0, 0, 0),)), (32, 224, 224)))
    == 392
  )
  assert tubevit.num_tokens(cfg, (1, 224, 224)) == [0, 0, 0, 196]


def hand_sincos(t, y, x, width):
  """[sin t w_j, cos t w_j, sin y w_j, cos y w_j, sin x w_j, cos x w_j] blocks, w_j = 1e4^(-j/(F-1))
  for F = width // 6 frequencies, written out for one position."""
  f = width // 6
  omega = [10_000.0 ** (-j / (f - 1)) for j in range(f)]
  out = []
  for p in (t, y, x):
    out += [math.sin(p * w) for w in omega] + [math.cos(p * w) for w in omega]
  return out + [0.0] * (width - 6 * f)


def test_position_embedding_is_fixed_sincos_of_each_tube_centre():
  cfg = make_cfg()
  model = tubevit.TubeViT(cfg)
  video = jnp.zeros((1, 4, 32, 32, 3))
  params = random_params(model, video)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  # Not a parameter: the tubes hold kernels and biases only.
  assert sorted(k for k in flat if k.startswith("tubes/")) == [
    "tubes/tube_0/bias", "tubes/tube_0/kernel", "tubes/tube_1/bias",
    "tubes/tube_1/kernel", "tubes/tube_2/bias", "tubes/tube_2/kernel",
  ]  # fmt: skip
  assert not any("pos" in k for k in flat)
  assert experiment.decay_mask(params)["tubes"]["tube_1"]["kernel"]  # kernels get weight decay
  # On a black clip with zero biases the tokens are the position embedding alone.
  for i in range(3):
    params["tubes"][f"tube_{i}"]["bias"] = np.zeros((48,), np.float32)
  tokens = tubes_apply(cfg, params, video)[0]
  centres = []  # (t, y, x) of each token's tube centre, tube by tube, row-major
  for kt, kh, kw, st, sh, sw, ot, oh, ow in TINY_TUBES:
    for a in positions_along(4, kt, st, ot):
      for b in positions_along(32, kh, sh, oh):
        for c in positions_along(32, kw, sw, ow):
          centres.append((a + (kt - 1) / 2, b + (kh - 1) / 2, c + (kw - 1) / 2))
  assert centres[32] == (0.5, 7.5, 7.5)  # the first 2x8x8 tube: frames 0-1, pixels 4-11
  expected = np.array([hand_sincos(*p, 48) for p in centres], np.float32)
  np.testing.assert_allclose(tokens, expected, atol=1e-5)
  # ViT-L's width, 1024 = 6 * 170 + 4: the paper's formula leaves 4 channels without position.
  wide = tubevit.sincos_3d(np.array([[1.0, 2.0, 3.0]]), 1024)
  np.testing.assert_allclose(wide[0], hand_sincos(1.0, 2.0, 3.0, 1024), atol=1e-5)


def test_an_image_gives_exactly_the_vit_patch_tokens():
  cfg = make_cfg()
  model = tubevit.TubeViT(cfg)
  image = jax.random.uniform(jax.random.key(3), (2, 1, 32, 32, 3))
  params = random_params(model, image)  # initialised from an image: every tube's kernel exists
  assert sorted(params["tubes"]) == ["tube_0", "tube_1", "tube_2"]
  tokens = tubes_apply(cfg, params, image)
  # Only the 1x8x8 tube fits one frame: a ViT's 8x8 patch embedding, row-major, + position.
  patches = image[:, 0].reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, -1)
  kernel = params["tubes"]["tube_0"]["kernel"][0].reshape(-1, 48)
  centres = np.array([(0.0, 8 * i + 3.5, 8 * j + 3.5) for i in range(4) for j in range(4)])
  pos = tubevit.sincos_3d(centres, 48)
  expected = patches @ kernel + params["tubes"]["tube_0"]["bias"][None, None] + pos[None]
  assert tokens.shape == (2, 16, 48)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
  logits = jax.jit(model.apply)({"params": params}, image)
  assert logits.shape == (2, 4) and np.all(np.isfinite(logits))


def test_interpolated_kernels_are_one_kernel_resized_trilinearly():
  cfg = make_cfg(tube_kernels="interpolated", base_kernel=(4, 8, 8))
  model = tubevit.TubeViT(cfg)
  video = jax.random.uniform(jax.random.key(4), (1, 4, 32, 32, 3))
  params = random_params(model, video)
  assert sorted(params["tubes"]) == ["kernel", "tube_0", "tube_1", "tube_2"]
  assert all(sorted(params["tubes"][f"tube_{i}"]) == ["bias"] for i in range(3))
  assert params["tubes"]["kernel"].shape == (4, 8, 8, 3, 48)
  # Half-pixel trilinear, no antialiasing: 4 frames t -> 2 frames read at t = 0.5 and 2.5.
  ramp = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None, None], (4, 8, 8, 3, 48))
  np.testing.assert_allclose(tubevit.tube_kernel(ramp, (2, 8, 8))[:, 0, 0, 0, 0], [0.5, 2.5])
  # Tube 2 (4x4x4) uses the shared kernel resized: the same tokens as an independent 4x4x4 kernel.
  resized = tubevit.tube_kernel(params["tubes"]["kernel"], (4, 4, 4))
  independent = make_cfg()
  ind_params = random_params(tubevit.TubeViT(independent), video)
  ind_params["tubes"]["tube_2"] = dict(kernel=resized, bias=params["tubes"]["tube_2"]["bias"])
  shared = tubes_apply(cfg, params, video)
  direct = tubes_apply(independent, ind_params, video)
  np.testing.assert_allclose(shared[:, 40:], direct[:, 40:], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ImageNet ViT


def fake_imagenet_vit(c=48, depth=1, mlp=64, heads=2, patch=8, grid=4):
  """A vision_transformer-layout ViT .npz dict (its module numbering: attention _1, norms _0 and
  _2, MLP _3) with random values."""
  encoder = layers_encoder_shapes(c, depth, mlp, heads, grid)
  rename = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
  }
  rng = np.random.default_rng(0)
  flat = {}
  for key, shape in encoder.items():
    for ours, theirs in rename.items():
      key = key.replace(f"/{ours}/", f"/{theirs}/")
    flat[f"Transformer/{key}"] = rng.normal(size=shape).astype(np.float32)
  flat["embedding/kernel"] = rng.normal(size=(patch, patch, 3, c)).astype(np.float32)
  flat["embedding/bias"] = rng.normal(size=(c,)).astype(np.float32)
  flat["cls"] = rng.normal(size=(1, 1, c)).astype(np.float32)
  flat["Transformer/posembed_input/pos_embedding"] = rng.normal(size=(1, 1 + grid * grid, c))
  flat["head/kernel"] = rng.normal(size=(c, 1000)).astype(np.float32)
  flat["head/bias"] = np.zeros((1000,), np.float32)
  return flat


def layers_encoder_shapes(c, depth, mlp, heads, grid):
  from trecvit_dist.models import layers

  encoder = layers.ViTEncoder(depth, heads, mlp)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, grid * grid, c)))
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(shapes["params"]), sep="/")
  return {k: v.shape for k, v in flat.items()}


def test_an_imagenet_vit_fills_the_blocks_and_the_2d_tube(tmp_path):
  cfg = make_cfg()
  flat = fake_imagenet_vit()
  path = tmp_path / "vit.npz"
  np.savez(path, **flat)
  model = tubevit.TubeViT(cfg)
  image = jax.random.uniform(jax.random.key(5), (2, 1, 32, 32, 3))
  fresh_params = jax.tree.map(jnp.asarray, random_params(model, image))
  params = init_from.load(fresh_params, str(path), family=FAMILY, model_cfg=cfg, image_size=32)
  block = params["Transformer"]["encoderblock_0"]
  np.testing.assert_array_equal(
    block["MultiHeadDotProductAttention_0"]["query"]["kernel"],
    flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"],
  )
  np.testing.assert_array_equal(
    block["LayerNorm_1"]["scale"], flat["Transformer/encoderblock_0/LayerNorm_2/scale"]
  )
  # An image is embedded as the ViT embeds it (before ours, the fixed sin-cos position).
  tokens = tubes_apply(cfg, params, image)
  vit_patches = (
    jax.lax.conv_general_dilated(
      image[:, 0],
      flat["embedding/kernel"],
      (8, 8),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ).reshape(2, 16, 48)
    + flat["embedding/bias"][None, None]
  )
  pos = tubevit.position_embedding(cfg, (1, 32, 32))
  np.testing.assert_allclose(tokens - pos[None], vit_patches, rtol=1e-5, atol=1e-4)
  # The video-only tubes and the pooling start fresh: not taken from the image ViT.
  np.testing.assert_array_equal(
    params["tubes"]["tube_1"]["kernel"], fresh_params["tubes"]["tube_1"]["kernel"]
  )
  _, notes, fresh = FAMILY.import_npz(flat, cfg, 32, True)
  assert (
    "tubes/tube_2/kernel" in fresh and "MAPHead_0/probe" in fresh and "head/head/kernel" in fresh
  )
  assert any("position embedding and CLS are unused" in n for n in notes)


# ----------------------------------------------------------------------------- sizes, FLOPs


def vit_block_params(c: int, m: int) -> int:
  """LayerNorm_0, query/key/value/out with biases, LayerNorm_1, MLP c -> m -> c."""
  return 2 * c + 4 * (c * c + c) + 2 * c + (c * m + m) + (m * c + c)


@pytest.mark.parametrize("variant", ["S", "B", "L"])
def test_parameter_counts_of_the_config_file_sizes(variant, load_config_fn):
  config = load_config_fn("tubevit_k400", variant)
  cfg = experiment.model_config(config, num_classes=400)
  shapes = tubevit.expected_shapes(cfg, 224)
  v = tubevit.VARIANTS[variant]
  c, m, depth = v["width"], v["mlp_dim"], v["depth"]
  tubes = sum(3 * math.prod(t[:3]) * c + c for t in tubevit.PAPER_TUBES)
  pool = c + 4 * (c * c + c) + 2 * c + (c * m + m) + (m * c + c)  # probe, attention, LN, MLP
  expected = tubes + depth * vit_block_params(c, m) + 2 * c + pool + c * 400 + 400
  assert sum(math.prod(s) for s in shapes.values()) == expected
  assert cfg.tubes == tubevit.PAPER_TUBES and config.data.num_frames == 64


@pytest.mark.parametrize("kernels", ["independent", "interpolated"])
def test_analytic_flops_match_xla_cost_analysis(kernels):
  cfg = make_cfg(width=192, mlp_dim=768, num_heads=3, tube_kernels=kernels)
  model = tubevit.TubeViT(cfg)
  video = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), video)
  compiled = jax.jit(lambda p, v: model.apply(p, v)).lower(params, video).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = 2 * FAMILY.forward_flops(cfg, 4, 32)
  assert 0.95 * cost["flops"] <= analytic <= 1.05 * cost["flops"], analytic / cost["flops"]


# ----------------------------------------------------------------------------- sharding, trainer


@pytest.mark.slow
def test_trains_evaluates_resumes_and_a_sharded_step_equals_one_device(tiny_config, tmp_path):
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  run = train.train_and_evaluate(
    tiny(tiny_config, **mesh, checkpoint_every_steps=2), str(tmp_path / "sharded")
  )
  assert sorted(run.train_losses) == [1, 2, 3]
  assert all(np.isfinite(v) for v in run.train_losses.values())
  assert set(run.eval_metrics) == {"loss", "top1"}  # no top5 with 4 classes
  # Tube kernels' channels over fsdp; heads and MLP over tensor (sharding.LOGICAL_RULES).
  params = run.state["params"]
  assert tuple(params["tubes"]["tube_1"]["kernel"].sharding.spec) == (
    None,
    None,
    None,
    None,
    "fsdp",
  )
  block = params["Transformer"]["encoderblock_0"]
  assert tuple(block["MlpBlock_0"]["Dense_0"]["kernel"].sharding.spec) == ("fsdp", "tensor")
  # Step 3 again, resumed from the step-2 checkpoint on one device: the same state and batch give
  # the sharded run's loss and evaluation.
  resumed = tmp_path / "one_device"
  shutil.copytree(tmp_path / "sharded", resumed)
  shutil.rmtree(resumed / "checkpoints" / "3")
  (resumed / "COMPLETED").unlink()
  one = train.train_and_evaluate(
    tiny(tiny_config, **{"mesh.data": 1}), str(resumed), devices=jax.devices()[:1]
  )
  assert sorted(one.train_losses) == [3]
  np.testing.assert_allclose(one.train_losses[3], run.train_losses[3], rtol=RTOL)
  for key, value in run.eval_metrics.items():
    np.testing.assert_allclose(one.eval_metrics[key], value, rtol=RTOL, err_msg=key)


@pytest.mark.tpu_aot
@pytest.mark.slow
def test_train_step_compiles_for_tpu(tiny_config):
  compile_check = pytest.importorskip("trecvit_dist.compile_check")
  pytest.importorskip("libtpu", reason="needs the tpu extra (pip install -e '.[tpu]')")
  config = tiny(tiny_config, **{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
  devices, hbm = compile_check.topology_devices("v5p:2x2x1")
  compiled, mesh, exp = compile_check.compile_step(config, devices, batch_size=8, num_classes=4)
  total, report = compile_check.report(compiled, hbm)
  assert 0 < total < hbm and report["flops"] > 0
  assert exp.family.name == "tubevit"


# ----------------------------------------------------------------------------- bad input


def test_bad_configs_are_refused_before_compiling(tiny_config):
  mesh = sharding.make_mesh(-1, 1, 1)
  with pytest.raises(ValueError, match=r"width 32 is not divisible by 6.*posemb_partial"):
    experiment.build(tiny(tiny_config, **{"model.width": 32}), mesh, num_classes=4)
  too_big = ((40, 40, 40, 1, 1, 1, 0, 0, 0),) + TINY_TUBES
  with pytest.raises(ValueError, match=r"model.tubes\[0\] \(40, 40, 40\).*larger than the 4x32x32"):
    experiment.build(tiny(tiny_config, **{"model.tubes": too_big}), mesh, num_classes=4)
  with pytest.raises(ValueError, match=r"model.tubes\[1\] = \(1, 8, 8\): each tube is 9 integers"):
    tubevit.TubeViTConfig(tubes=(TINY_TUBES[0], (1, 8, 8)))
  # Longer than the clip in time only: skipped for images, but a clip must get some tokens.
  model = tubevit.TubeViT(make_cfg(tubes=TINY_TUBES[1:]))
  with pytest.raises(ValueError, match="no tube of model.tubes.*fits a 1x32x32 clip"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 32, 32, 3)))
