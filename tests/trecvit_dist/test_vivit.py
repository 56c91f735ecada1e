"""ViViT (full spatio-temporal attention) and its factorised encoder: parameter counts against the
architecture, not causal, sharded == unsharded, analytic FLOPs against XLA, training and resuming
through the real trainer, and a tubelet that does not divide the clip refused before compiling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import experiment, models, sharding, train

RTOL = 1e-5  # sharded vs single-device (as tests/trecvit_dist/test_train.py)
NAMES = ["vivit", "vivit_factorised"]


def tiny(tiny_config, name, **overrides):
  """synthetic_tiny shrunk (width 32, 4 frames of 32x32), as `name` with 2x8x8 tubelets."""
  fields = {"model.name": name, "model.patch_size": (2, 8, 8), "model.depth": 1}
  return tiny_config(**fields, **overrides)


# ----------------------------------------------------------------------------- parameter counts


def vit_block_params(c: int, m: int) -> int:
  """LayerNorm_0, query/key/value/out with biases, LayerNorm_1, MLP c -> m -> c."""
  return 2 * c + 4 * (c * c + c) + 2 * c + (c * m + m) + (m * c + c)


def expected_params(name, v, *, frames, size, classes, patch) -> int:
  """From the architecture: tubelet embedding, per encoder a CLS, a position embedding over its
  positions, its blocks and encoder_norm, then the classifier (no pre-logits by default)."""
  c, m = v["width"], v["mlp_dim"]
  pt, ph, pw = patch
  t, n = frames // pt, (size // ph) * (size // pw)

  def encoder(depth, positions):
    return c + positions * c + depth * vit_block_params(c, m) + 2 * c

  embedding, head = pt * ph * pw * 3 * c + c, c * classes + classes
  if name == "vivit":
    return embedding + encoder(v["depth"], 1 + t * n) + head
  return embedding + encoder(v["depth"], 1 + n) + encoder(v["temporal_depth"], 1 + t) + head


def num_params(family, cfg, frames, size) -> int:
  video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(family.build(cfg).init, jax.random.key(0), video)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_of_every_size_follow_the_architecture(name):
  family = models.get(name)
  counts = {}
  for variant, sizes in family.variants.items():
    for patch in [(2, 16, 16)] + ([(1, 16, 16)] if variant == "B" else []):
      fields = {"variant": variant, "patch_size": patch}
      cfg = family.make_config(fields, num_classes=400, num_frames=32, image_size=224)
      count = num_params(family, cfg, 32, 224)
      assert count == expected_params(name, sizes, frames=32, size=224, classes=400, patch=patch), (
        variant,
        patch,
      )
      counts[variant, patch] = count
  # The counts docs/benchmarks.md sets against the paper's ~90M (B) and ~320M (L).
  if name == "vivit":
    assert counts["B", (2, 16, 16)] == 88_954_000
    assert counts["L", (2, 16, 16)] == 307_508_624
    assert counts["B", (1, 16, 16)] == 90_772_624
  else:
    assert family.variants["B"]["depth"] == 12 and family.variants["B"]["temporal_depth"] == 4
    assert counts["B", (2, 16, 16)] == 115_062_928


# ----------------------------------------------------------------------------- FLOPs, causality


def random_params(model, video, scale=0.3):
  """Parameters of the model's shapes drawn from N(0, scale^2): no init to compile, and no
  zero-initialised CLS or head hiding a dependency."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return tree.unflatten(
    [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  )


@pytest.mark.parametrize("name", NAMES)
def test_analytic_flops_match_xla_and_early_outputs_see_later_frames(name):
  family = models.get(name)
  fields = dict(width=64, depth=2, mlp_dim=256, num_heads=2, patch_size=(2, 8, 8))
  cfg = family.make_config(fields, num_classes=4, num_frames=4, image_size=32)
  model = family.build(cfg)
  video = jax.random.uniform(jax.random.key(2), (2, 4, 32, 32, 3))
  params = random_params(model, video)
  compiled = jax.jit(lambda p, v: model.apply({"params": p}, v)).lower(params, video).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = 2 * family.forward_flops(cfg, 4, 32)
  # XLA also counts element-wise work (norms, softmax, gelu), which the analytic count leaves out.
  assert 0.95 * cost["flops"] <= analytic <= 1.05 * cost["flops"], analytic / cost["flops"]

  def first_slot(v):
    return jnp.sum(model.apply({"params": params}, v, method=model.tokens)[:, 0] ** 2)

  grad = jax.jit(jax.grad(first_slot))(video)
  # The first time slot's outputs (frames 0-1) see frames 2-3: ViViT is not causal.
  assert float(jnp.abs(grad[:, 2:]).max()) > 1e-3 * float(jnp.abs(grad[:, :2]).max())
  assert not family.causal


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("name", NAMES)
def test_trains_sharded_with_the_losses_of_one_device_and_resumes(name, tiny_config, tmp_path):
  sharded = tiny(tiny_config, name, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  result = train.train_and_evaluate(sharded, str(tmp_path / "sharded"))
  one = tiny(tiny_config, name, **{"mesh.data": 1})
  reference = train.train_and_evaluate(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  assert sorted(result.train_losses) == sorted(reference.train_losses) == [1, 2, 3]
  for step, loss in reference.train_losses.items():
    np.testing.assert_allclose(result.train_losses[step], loss, rtol=RTOL, err_msg=str(step))
  assert set(result.eval_metrics) == {"loss", "top1"}  # no top5 with 4 classes
  np.testing.assert_allclose(result.eval_metrics["loss"], reference.eval_metrics["loss"], rtol=RTOL)
  # The blocks are split by the logical rules: embed over fsdp, heads and MLP over tensor.
  params = result.state["params"]
  block = params["Transformer" if name == "vivit" else "SpatialTransformer"]["encoderblock_0"]
  assert tuple(block["MlpBlock_0"]["Dense_0"]["kernel"].sharding.spec) == ("fsdp", "tensor")
  query = block["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert tuple(query.sharding.spec) == ("fsdp", "tensor", None)
  if name == "vivit":  # the checkpoint resumes (the step is model-agnostic: one family is enough)
    more = tiny(tiny_config, name, **{"mesh.data": 1}, total_steps=4)
    again = train.train_and_evaluate(more, str(tmp_path / "one"), devices=jax.devices()[:1])
    assert sorted(again.train_losses) == [4]


def test_a_tubelet_that_does_not_divide_the_frames_is_refused_before_compiling(tiny_config):
  for name in NAMES:
    config = tiny(tiny_config, name)
    config.model.patch_size = (3, 8, 8)
    mesh = sharding.make_mesh(-1, 1, 1)
    with pytest.raises(ValueError, match=r"data.num_frames 4 is not divisible by the tubelet's 3"):
      experiment.build(config, mesh, num_classes=4)
