"""PureLRU, the attention-free baseline: parameter counts against the architecture, causal over
frames (gradients), the class read from the last position, analytic FLOPs against XLA, and
sharded == unsharded training through the real trainer (configs/compare_synthetic.py:pure_lru)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import models, train

RTOL = 1e-5  # sharded vs single-device (as tests/trecvit_dist/test_train.py)
FAMILY = models.get("pure_lru")


def expected_params(v, *, frames, size, classes, patch=(1, 16, 16), lru_mult=2, conv=4) -> int:
  """From the architecture: patch embedding, spatial [n, c] and temporal [t, c] position
  embeddings, per block an RMSNorm, the Griffin recurrent block (linear_x, linear_y, causal conv,
  RG-LRU a_param and two block-diagonal gates, linear_out) and LayerNorm + MLP, then encoder_norm
  and the classifier (no pre-logits by default)."""
  c, m, h = v["width"], v["mlp_dim"], v["num_heads"]
  w = lru_mult * c
  pt, ph, pw = patch
  t, n = frames // pt, (size // ph) * (size // pw)
  embedding = pt * ph * pw * 3 * c + c
  recurrent = 2 * (c * w + w) + (conv * w + w) + w + 2 * (h * (w // h) ** 2 + w) + (w * c + c)
  block = c + recurrent + 2 * c + (c * m + m) + (m * c + c)
  return embedding + n * c + t * c + v["depth"] * block + 2 * c + (c * classes + classes)


def num_params(cfg, frames, size) -> int:
  video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(FAMILY.build(cfg).init, jax.random.key(0), video)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def test_parameter_counts_of_every_size_follow_the_architecture():
  for variant, sizes in FAMILY.variants.items():
    cfg = FAMILY.make_config({"variant": variant}, num_classes=174, num_frames=32, image_size=224)
    assert cfg.patch_size == (1, 16, 16) and cfg.pooling == "last"
    expected = expected_params(sizes, frames=32, size=224, classes=174)
    assert num_params(cfg, 32, 224) == expected, variant
  # PureLRU-B, 32 frames, SSv2's 174 classes (configs/pure_lru_ssv2.py), for docs/benchmarks.md.
  assert expected_params(FAMILY.variants["B"], frames=32, size=224, classes=174) == 104_977_326


def small(**fields):
  values = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=(1, 8, 8)) | fields
  return FAMILY.make_config(values, num_classes=4, num_frames=4, image_size=16)


def random_params(model, video, scale=0.3):
  """Parameters of the model's shapes drawn from N(0, scale^2) with numpy (no init to compile; a
  zero-initialised head would hide every dependency); a_param keeps the recurrence stable
  (decays a = exp(-softplus(a_param)) of 0.5-0.9)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(1)
  out = []
  for path, x in leaves:
    if "a_param" in jax.tree_util.keystr(path):
      a = rng.uniform(0.5, 0.9, x.shape)
      out.append(jnp.asarray(np.log(np.expm1(-np.log(a))), x.dtype))
    else:
      out.append(jnp.asarray(scale * rng.normal(size=x.shape), x.dtype))
  return tree.unflatten(out)


def test_causal_over_frames_and_the_class_comes_from_the_last_position():
  model, gap = FAMILY.build(small()), FAMILY.build(small(pooling="gap"))
  video = jax.random.uniform(jax.random.key(2), (2, 4, 16, 16, 3))
  params = random_params(model, video)
  apply = functools.partial(model.apply, {"params": params})

  @jax.jit
  def run(v):
    tokens_BTNC, vjp = jax.vjp(lambda u: apply(u, method=model.tokens), v)
    # Gradients of sum(tokens[:, t] ** 2) for each slot t, and of the last position's token alone.
    masks = jnp.concatenate([jnp.eye(4), jnp.zeros((1, 4))])[:, None, :, None, None]
    masks = masks * jnp.ones_like(tokens_BTNC)[None]
    masks = masks.at[-1, :, -1, -1].set(1.0)
    (grads,) = jax.vmap(vjp)(2 * tokens_BTNC[None] * masks)
    head = functools.partial(apply, method=lambda m, x: m.head(x))
    return dict(
      grads=grads,
      logits=apply(v),
      last=head(tokens_BTNC[:, -1, -1]),
      gap=gap.apply({"params": params}, v),
      mean=head(jnp.mean(tokens_BTNC, axis=(1, 2))),
    )

  out = run(video)
  for t in range(4):
    grad = np.abs(np.asarray(out["grads"][t]))
    assert np.all(grad[:, t + 1 :] == 0.0), t  # later frames: exactly no effect
    assert grad[:, : t + 1].max() > 0.0, t
  assert FAMILY.causal
  # The logits are the classifier on the last position's token, which has seen the whole clip.
  np.testing.assert_allclose(out["logits"], out["last"], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(out["grads"][-1][:, 0])).max() > 0.0
  # pooling="gap" averages every position instead.
  np.testing.assert_allclose(out["gap"], out["mean"], rtol=1e-5, atol=1e-6)


def test_analytic_flops_match_xla():
  cfg = small(width=128, mlp_dim=512, num_heads=4)
  model = FAMILY.build(cfg)
  video = jax.ShapeDtypeStruct((2, 4, 16, 16, 3), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), video)["params"])
  compiled = jax.jit(lambda p, v: model.apply({"params": p}, v)).lower(params, video).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = 2 * FAMILY.forward_flops(cfg, 4, 16)
  # XLA also counts element-wise work (norms, gates, the scan), which the analytic count omits.
  assert 0.95 * cost["flops"] <= analytic <= 1.05 * cost["flops"], analytic / cost["flops"]


@pytest.mark.slow
def test_trains_sharded_with_the_losses_of_one_device(
  load_config_fn, shrink_fn, tiny_data, tmp_path
):
  def config(**overrides):
    c = load_config_fn("compare_synthetic", "pure_lru")
    return shrink_fn(c, tiny_data, **{"model.depth": 1}, **overrides)

  sharded = config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  result = train.train_and_evaluate(sharded, str(tmp_path / "sharded"))
  one = config(**{"mesh.data": 1})
  reference = train.train_and_evaluate(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  assert sorted(result.train_losses) == sorted(reference.train_losses) == [1, 2, 3]
  for step, loss in reference.train_losses.items():
    np.testing.assert_allclose(result.train_losses[step], loss, rtol=RTOL, err_msg=str(step))
  np.testing.assert_allclose(result.eval_metrics["loss"], reference.eval_metrics["loss"], rtol=RTOL)
  # The LRU's width is split over tensor and the embedding over fsdp, as in TRecViT.
  block = result.state["params"]["block_00"]["recurrent_block"]
  assert tuple(block["linear_x"]["kernel"].sharding.spec) == ("fsdp", "tensor")
  assert tuple(block["rg_lru"]["input_gate"]["w"].sharding.spec)[0] == "tensor"
