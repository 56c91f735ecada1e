"""ImageNet-ViT initialisation (init_from=ViT.npz in the public vision_transformer layout): a static
video through ViViT (central-frame tubelet kernel, position grid tiled over time) gives the image
ViT's tokens, TRecViT loads the ViT blocks and lists its gated-LRU blocks as fresh, and a ViT
whose width does not fit is refused naming the sizes, before the train step compiles."""

import functools
import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import init_from, models, train
from trecvit_dist.models import layers

WIDTH, HEADS, MLP, DEPTH, PATCH, GRID = 48, 2, 64, 2, 8, 4  # a 32x32 image: 4x4 patches of 8x8
TOL = dict(rtol=1e-4, atol=1e-4)  # a complex module (levanter's 1e-4)


def public_vit_npz(width=WIDTH, seed=0) -> dict[str, np.ndarray]:
  """A ViT-B_16.npz-style dict (google-research/vision_transformer): blocks number their modules
  LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; the position embedding
  holds the CLS's position first; an ImageNet classifier under pre_logits/ and head/."""
  rng = np.random.default_rng(seed)
  c, h, d = width, HEADS, width // HEADS

  def normal(*shape, scale=0.2):
    return (scale * rng.normal(size=shape)).astype(np.float32)

  flat = {
    "embedding/kernel": normal(PATCH, PATCH, 3, c),
    "embedding/bias": normal(c),
    "cls": normal(1, 1, c),
    "Transformer/posembed_input/pos_embedding": normal(1, 1 + GRID * GRID, c),
    "Transformer/encoder_norm/scale": 1 + normal(c),
    "Transformer/encoder_norm/bias": normal(c),
    "pre_logits/kernel": normal(c, c),
    "pre_logits/bias": normal(c),
    "head/kernel": normal(c, 1000),
    "head/bias": normal(1000),
  }
  for i in range(DEPTH):
    block = f"Transformer/encoderblock_{i}/"
    for norm in ("LayerNorm_0", "LayerNorm_2"):
      flat[f"{block}{norm}/scale"] = 1 + normal(c)
      flat[f"{block}{norm}/bias"] = normal(c)
    attention = f"{block}MultiHeadDotProductAttention_1/"
    for proj in ("query", "key", "value"):
      flat[f"{attention}{proj}/kernel"] = normal(c, h, d)
      flat[f"{attention}{proj}/bias"] = normal(h, d)
    flat[f"{attention}out/kernel"] = normal(h, d, c)
    flat[f"{attention}out/bias"] = normal(c)
    flat[f"{block}MlpBlock_3/Dense_0/kernel"] = normal(c, MLP)
    flat[f"{block}MlpBlock_3/Dense_0/bias"] = normal(MLP)
    flat[f"{block}MlpBlock_3/Dense_1/kernel"] = normal(MLP, c)
    flat[f"{block}MlpBlock_3/Dense_1/bias"] = normal(c)
  return flat


# The public layout's module numbers -> layers.vit_block's names.
RENAME = {
  "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
  "LayerNorm_2": "LayerNorm_1",
  "MlpBlock_3": "MlpBlock_0",
}


@functools.partial(jax.jit, static_argnames="with_cls")
def image_vit_tokens(flat, image_BHWC, *, with_cls: bool):
  """The image ViT written out: patches + bias, [CLS,] + position embedding, layers.ViTEncoder
  with the checkpoint's blocks -> tokens [b, (1 +) n, c]."""
  encoder = {}
  for key, value in flat.items():
    if key.startswith("Transformer/encoder"):
      parts = [RENAME.get(p, p) for p in key.split("/")[1:]]
      encoder["/".join(parts)] = value
  patches = jax.lax.conv_general_dilated(
    image_BHWC,
    flat["embedding/kernel"],
    (PATCH, PATCH),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  b = image_BHWC.shape[0]
  x = patches.reshape(b, GRID * GRID, -1) + flat["embedding/bias"][None, None]
  pos = flat["Transformer/posembed_input/pos_embedding"]
  if with_cls:
    x = jnp.concatenate([jnp.broadcast_to(flat["cls"], (b, 1, x.shape[-1])), x], axis=1) + pos
  else:
    x = x + pos[:, 1:]
  params = flax.traverse_util.unflatten_dict(encoder, sep="/")
  return layers.ViTEncoder(DEPTH, HEADS, MLP).apply({"params": params}, x)


def family_cfg(name, **fields):
  sizes = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, rep_size=None)
  frames = fields.pop("frames")
  return models.get(name).make_config(
    sizes | fields, num_classes=5, num_frames=frames, image_size=PATCH * GRID
  )


def loaded_params(name, cfg, path, frames):
  """init_from.load (the trainer's path) onto "fresh" parameters (random, no init to compile)."""
  model = models.get(name).build(cfg)
  video = jax.ShapeDtypeStruct((1, frames, PATCH * GRID, PATCH * GRID, 3), jnp.float32)
  shapes = flax.linen.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  rng = np.random.default_rng(1)
  fresh = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
  loaded = init_from.load(
    fresh, str(path), family=models.get(name), model_cfg=cfg, image_size=PATCH * GRID
  )
  return model, fresh, loaded


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
  flat = public_vit_npz()
  path = tmp_path_factory.mktemp("vit") / "ViT-Ti_8.npz"
  np.savez(path, **flat)
  return flat, path


def test_a_static_video_through_vivit_gives_the_image_vit_s_tokens(vit):
  flat, path = vit
  image = jax.random.uniform(jax.random.key(3), (2, PATCH * GRID, PATCH * GRID, 3))
  image_tokens = image_vit_tokens(flat, image, with_cls=True)
  image_patch_tokens = image_vit_tokens(flat, image, with_cls=False)
  cases = (
    # Full attention without a CLS over 3 time slots: every slot attends to 3 copies of the
    # image's tokens, which is attending to the image, so each slot gives the ViT's tokens.
    ("vivit", dict(frames=6, pooling="gap"), image_patch_tokens),
    # The factorised encoder's spatial ViT is the image ViT, CLS included, in every slot. (Full
    # attention with a CLS is not: its one CLS gets 1/t' of the weight the image's CLS gets.)
    ("vivit_factorised", dict(frames=6, pooling="cls"), image_tokens),
  )
  for name, fields, expected in cases:
    frames = fields["frames"]
    cfg = family_cfg(name, patch_size=(2, PATCH, PATCH), **fields)
    model, fresh, params = loaded_params(name, cfg, path, frames)
    # The tubelet kernel holds the image kernel on its central frame (index 1 of 2), zero elsewhere.
    kernel = np.asarray(params["embedding"]["kernel"])
    np.testing.assert_array_equal(kernel[1], flat["embedding/kernel"])
    np.testing.assert_array_equal(kernel[0], 0.0)
    video = jnp.repeat(image[:, None], frames, axis=1)  # a static video
    apply = functools.partial(model.apply, {"params": params})
    if name == "vivit":
      tokens = jax.jit(functools.partial(apply, method=model.tokens))(video)  # [b, t', n, c]
      for t in range(tokens.shape[1]):
        np.testing.assert_allclose(tokens[:, t], expected, **TOL, err_msg=f"{name} slot {t}")
    else:
      spatial, _ = jax.jit(functools.partial(apply, method=model.encode))(video)
      for t in range(spatial.shape[1]):
        np.testing.assert_allclose(spatial[:, t], expected, **TOL, err_msg=f"{name} slot {t}")
      # The temporal transformer is not in an image ViT: it keeps its fresh initialisation.
      np.testing.assert_array_equal(
        params["TemporalTransformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
        fresh["TemporalTransformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
      )
    # The image classifier is never loaded: the video classifier starts fresh.
    np.testing.assert_array_equal(params["head"]["head"]["kernel"], fresh["head"]["head"]["kernel"])


def test_trecvit_loads_the_vit_blocks_and_lists_its_gated_lru_blocks_as_fresh(vit):
  flat, path = vit
  family = models.get("trecvit")
  cfg = family_cfg("trecvit", frames=2, patch_size=(1, PATCH, PATCH), posemb="learned")
  params, notes, fresh = family.import_npz(flat, cfg, PATCH * GRID, True)
  for i in range(DEPTH):
    for theirs, ours in (
      (
        "MultiHeadDotProductAttention_1/query/kernel",
        "MultiHeadDotProductAttention_0/query/kernel",
      ),
      ("MultiHeadDotProductAttention_1/out/kernel", "MultiHeadDotProductAttention_0/out/kernel"),
      ("LayerNorm_2/scale", "LayerNorm_1/scale"),
      ("MlpBlock_3/Dense_1/kernel", "MlpBlock_0/Dense_1/kernel"),
    ):
      np.testing.assert_array_equal(
        params[f"encoder/encoderblock_{i}/{ours}"], flat[f"Transformer/encoderblock_{i}/{theirs}"]
      )
  np.testing.assert_array_equal(
    params["tokenizer/embedding/kernel"][0], flat["embedding/kernel"]
  )  # a (1, 8, 8) tubelet: the image kernel itself
  np.testing.assert_array_equal(
    params["tokenizer/pos_embedding"][0],
    flat["Transformer/posembed_input/pos_embedding"][0, 1:],
  )
  # Every gated-LRU block and the classifier start fresh, and the notes say so.
  lru = sorted({k.split("/")[1] for k in fresh if k.startswith("encoder/residualblock_")})
  assert lru == [f"residualblock_{i:02d}" for i in range(DEPTH)]
  assert not any(k.startswith("encoder/encoderblock_") for k in fresh)
  assert any(k.startswith("decoder/") for k in fresh)
  fresh_note = next(n for n in notes if n.startswith("fresh"))
  assert "encoder/residualblock_*/recurrent_block/rg_lru/a_param" in fresh_note
  assert any(n.startswith("ignored") and "head/kernel" in n for n in notes)

  # Through the trainer's loader: the LRU blocks keep their fresh values, the blocks are the ViT's.
  model, initial, loaded = loaded_params("trecvit", cfg, path, 2)
  block = loaded["encoder"]["residualblock_00"]["recurrent_block"]
  np.testing.assert_array_equal(
    block["linear_x"]["kernel"],
    initial["encoder"]["residualblock_00"]["recurrent_block"]["linear_x"]["kernel"],
  )
  np.testing.assert_array_equal(
    loaded["encoder"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"],
    flat["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
  )


def test_a_vit_of_another_width_is_refused_naming_the_sizes(
  load_config_fn, shrink_fn, tiny_data, tmp_path, caplog
):
  wide = public_vit_npz(width=64)
  message = r"the checkpoint has width 64 \(model: 48\).*model.variant"
  for name in ("vivit", "vivit_factorised", "trecvit"):
    cfg = family_cfg(name, frames=2, patch_size=(1, PATCH, PATCH))
    with pytest.raises(ValueError, match=message):
      models.get(name).import_npz(wide, cfg, PATCH * GRID, True)
  # Through the trainer (configs/compare_synthetic.py:vivit, 32 wide): refused before anything is
  # compiled (init_from.check maps the npz onto the model's shapes first), naming both widths.
  np.savez(tmp_path / "wide.npz", **wide)
  config = shrink_fn(load_config_fn("compare_synthetic", "vivit"), tiny_data)
  config.model.depth = 1
  config.init_from = str(tmp_path / "wide.npz")
  caplog.set_level(logging.INFO)
  with pytest.raises(ValueError, match=r"width 64 \(model: 32\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert "Compiling the train step" not in caplog.text
  assert not (tmp_path / "run" / "checkpoints").exists()
