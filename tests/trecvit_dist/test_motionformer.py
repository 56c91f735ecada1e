"""Motionformer: trajectory attention against a naive loop, the Orthoformer's checks that hold
(identity query-to-landmark weights give exact attention; one landmark gives every query the same
pooled points; constant values stay constant; orthonormal queries plus duplicates select distinct
orthonormal ones), the published size, FLOPs against XLA, the trainer (sharded step == one
device), a TPU compile, and too many landmarks refused before compiling."""

import math
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import experiment, models, sharding, train
from trecvit_dist.models import motionformer as mf

RTOL = 1e-5  # sharded vs single-device (as tests/trecvit_dist/test_train.py)
FAMILY = models.get("motionformer")
ORTHOFORMER = jax.jit(mf.orthoformer_space_attention, static_argnums=3)
SPACE = jax.jit(mf.space_attention)


def tiny(tiny_config, **overrides):
  """synthetic_tiny shrunk (width 32, 4 frames of 32x32): 2 slots x 16 tubelets of 2x8x8."""
  fields = {"model.name": "motionformer", "model.patch_size": (2, 8, 8), "model.depth": 1}
  return tiny_config(**{**fields, **overrides})


def random_tree(shapes, scale, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes)


def attention_and_params(attention="exact", landmarks=4, heads=2, frames=3, patches=4, c=8):
  """A TrajectoryAttention, random parameters and an input [2, 1 + frames * patches, c]."""
  module = mf.TrajectoryAttention(heads, frames, attention, landmarks)
  x = np.random.default_rng(0).normal(size=(2, 1 + frames * patches, c)).astype(np.float32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  return module, random_tree(shapes, 0.5), x


def softmax(z):
  e = np.exp(z - np.max(z))
  return e / e.sum()


def naive_trajectory_attention(p, x, heads, frames):
  """Trajectory attention written as loops over examples, heads, queries and frames (numpy)."""
  b, n, c = x.shape
  d, s = c // heads, (n - 1) // frames

  def proj(name, z):
    return np.einsum("...c,chd->...hd", z, p[name]["kernel"]) + p[name]["bias"]

  q, k, v = proj("query", x), proj("key", x), proj("value", x)
  out = np.zeros((b, n, heads, d))
  for bi in range(b):
    for h in range(heads):  # the CLS: ordinary attention over every token
      w = softmax(np.array([q[bi, 0, h] @ k[bi, j, h] for j in range(n)]) / math.sqrt(d))
      out[bi, 0, h] = sum(w[j] * v[bi, j, h] for j in range(n))
    for qi in range(1, n):
      y = np.zeros((frames, heads, d))  # one pooled point per frame
      for t in range(frames):
        keys = [1 + t * s + j for j in range(s)]
        for h in range(heads):
          w = softmax(np.array([q[bi, qi, h] @ k[bi, j, h] for j in keys]) / math.sqrt(d))
          y[t, h] = sum(wj * v[bi, j, h] for wj, j in zip(w, keys, strict=True))
      y = y.reshape(frames, c)
      own = (qi - 1) // s  # the query's own time slot
      q2, k2, v2 = (
        proj("temporal_query", y[own]),
        proj("temporal_key", y),
        proj("temporal_value", y),
      )
      for h in range(heads):
        w = softmax(np.array([q2[h] @ k2[t, h] for t in range(frames)]) / math.sqrt(d))
        out[bi, qi, h] = sum(w[t] * v2[t, h] for t in range(frames))
  return np.einsum("bnhd,hdc->bnc", out, p["out"]["kernel"]) + p["out"]["bias"]


# ----------------------------------------------------------------------------- trajectory attention


def test_trajectory_attention_equals_a_naive_loop():
  module, params, x = attention_and_params()
  out = jax.jit(module.apply)({"params": params}, x)
  np.testing.assert_allclose(out, naive_trajectory_attention(params, x, 2, 3), rtol=1e-5, atol=1e-5)


def test_orthoformer_with_identity_landmark_weights_is_exact_trajectory_attention(monkeypatch):
  # Every query is a landmark (R = T S = 12) and each query's weights are 1 on itself: the
  # approximation's only remaining step is the landmarks' exact per-frame attention.
  module, params, x = attention_and_params("orthoformer", landmarks=12)

  def identity(q_BQHD, p_BRHD):
    same = jnp.all(q_BQHD[:, :, None] == p_BRHD[:, None], axis=-1)  # [b, q, r, h]
    return jnp.transpose(same, (0, 3, 1, 2)).astype(q_BQHD.dtype)

  monkeypatch.setattr(mf, "landmark_weights", identity)
  approx = jax.jit(module.apply)({"params": params}, x)
  np.testing.assert_allclose(
    approx, naive_trajectory_attention(params, x, 2, 3), rtol=1e-5, atol=1e-5
  )


def qkv(b=2, t=3, s=4, h=2, d=4, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t * s, h, d)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, s, h, d)).astype(np.float32) for _ in range(2))
  return q, k, v


def test_one_landmark_gives_every_query_the_same_pooled_points():
  q, k, v = qkv()
  y = ORTHOFORMER(q, k, v, 1)
  assert y.shape == (2, 12, 3, 2, 4)
  np.testing.assert_allclose(y, jnp.broadcast_to(y[:, :1], y.shape), rtol=1e-6)
  # ... the exact attention's points differ from query to query.
  exact = SPACE(q, k, v)
  assert float(jnp.abs(exact - exact[:, :1]).max()) > 1e-2


def test_constant_values_give_constant_outputs():
  q, k, _ = qkv()
  value_HD = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
  v = np.broadcast_to(value_HD, k.shape)
  for y in (SPACE(q, k, v), ORTHOFORMER(q, k, v, 5)):
    np.testing.assert_allclose(y, np.broadcast_to(value_HD, y.shape), rtol=1e-5)
  # Through the whole Orthoformer block: constant values (value kernel 0) give every patch the
  # same output.
  module, params, x = attention_and_params("orthoformer", landmarks=5)
  params["value"]["kernel"] = np.zeros_like(params["value"]["kernel"])
  out = jax.jit(module.apply)({"params": params}, x)
  np.testing.assert_allclose(out[:, 1:], jnp.broadcast_to(out[:, 1:2], out[:, 1:].shape), atol=1e-5)


def test_selection_on_orthonormal_queries_plus_duplicates_returns_distinct_orthonormal_ones():
  rng = np.random.default_rng(2)
  basis = np.linalg.qr(rng.normal(size=(6, 6)))[0][:4]  # 4 orthonormal directions in 6-D
  # Every direction twice (scaled, one flipped) and the longest a duplicate.
  rows = [3 * basis[1], basis[0], basis[2], -basis[1], 0.5 * basis[3], 2 * basis[0], basis[2]]
  rows += [basis[3]]
  q = np.stack(rows)[None, :, None].astype(np.float32)  # [1, 8, 1, 6]
  idx = mf.select_landmarks(q, 4)
  picked = np.asarray(mf.gather_tokens(q, idx))[0, :, 0]
  unit = picked / np.linalg.norm(picked, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit @ unit.T, np.eye(4), atol=1e-6)
  assert len(set(np.asarray(idx).reshape(-1).tolist())) == 4


def test_no_gradient_flows_through_the_landmarks():
  q, k, v = qkv()
  landmarks = mf.gather_tokens(q, mf.select_landmarks(q, 5))  # the same selection, as a constant

  def with_fixed_landmarks(q):
    pooled = mf.space_attention(landmarks, k, v)
    return jnp.einsum("bhqr,brthd->bqthd", mf.landmark_weights(q, landmarks), pooled)

  def loss(fn):
    return jax.jit(jax.grad(lambda z: jnp.sum(jnp.sin(fn(z)))))(q)

  np.testing.assert_allclose(
    loss(lambda z: ORTHOFORMER(z, k, v, 5)), loss(with_fixed_landmarks), rtol=1e-5, atol=1e-6
  )


# ----------------------------------------------------------------------------- sizes, FLOPs


def test_parameter_count_of_the_published_model(load_config_fn):
  config = load_config_fn("motionformer_ssv2")
  cfg = experiment.model_config(config, num_classes=174)
  model = mf.Motionformer(cfg)
  video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), video)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
  c, m = 768, 3072
  attention = 7 * (c * c + c)  # query, key, value, temporal query/key/value, out
  block = 2 * c + attention + 2 * c + (c * m + m) + (m * c + c)
  embedding = 2 * 16 * 16 * 3 * c + c + 196 * c + 8 * c + c  # tubelets, spatial, temporal, CLS
  head = (c * c + c) + (c * 174 + 174)  # pre-logits + tanh, classifier
  assert count == embedding + 12 * block + 2 * c + head == 108_379_566
  # The released model: ~109.0M, with an unused 2-D patch embedding and the CLS's position.
  assert count + (16 * 16 * 3 * c + c) + c == 108_970_926


@pytest.mark.parametrize("attention", ["exact", "orthoformer"])
def test_analytic_flops_match_xla_cost_analysis(attention):
  fields = dict(width=192, depth=1, mlp_dim=768, num_heads=3, patch_size=(2, 8, 8))
  cfg = FAMILY.make_config(
    {**fields, "attention": attention, "landmarks": 8}, num_classes=4, num_frames=4, image_size=32
  )
  model = mf.Motionformer(cfg)
  video = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), video)
  compiled = jax.jit(lambda p, v: model.apply(p, v)).lower(params, video).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = 2 * FAMILY.forward_flops(cfg, 4, 32)
  assert 0.95 * cost["flops"] <= analytic <= 1.05 * cost["flops"], analytic / cost["flops"]


# ----------------------------------------------------------------------------- trainer, TPU


@pytest.mark.slow
def test_trains_evaluates_resumes_and_a_sharded_step_equals_one_device(tiny_config, tmp_path):
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  run = train.train_and_evaluate(
    tiny(tiny_config, **mesh, checkpoint_every_steps=2), str(tmp_path / "sharded")
  )
  assert sorted(run.train_losses) == [1, 2, 3]
  assert all(np.isfinite(v) for v in run.train_losses.values())
  assert set(run.eval_metrics) == {"loss", "top1"}  # no top5 with 4 classes
  block = run.state["params"]["Transformer"]["encoderblock_0"]["TrajectoryAttention_0"]
  assert tuple(block["temporal_key"]["kernel"].sharding.spec) == ("fsdp", "tensor", None)
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
def test_orthoformer_train_step_compiles_for_tpu(tiny_config):
  compile_check = pytest.importorskip("trecvit_dist.compile_check")
  pytest.importorskip("libtpu", reason="needs the tpu extra (pip install -e '.[tpu]')")
  fields = {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2}
  config = tiny(tiny_config, **fields, **{"model.attention": "orthoformer", "model.landmarks": 4})
  devices, hbm = compile_check.topology_devices("v5p:2x2x1")
  compiled, _, exp = compile_check.compile_step(config, devices, batch_size=8, num_classes=4)
  total, report = compile_check.report(compiled, hbm)
  assert 0 < total < hbm and report["flops"] > 0
  assert exp.model_cfg.attention == "orthoformer"


# ----------------------------------------------------------------------------- bad input


def test_more_landmarks_than_tokens_is_refused_before_compiling(tiny_config):
  config = tiny(tiny_config, **{"model.attention": "orthoformer", "model.landmarks": 33})
  with pytest.raises(ValueError, match=r"model.landmarks=33 is more than the 32 space-time tokens"):
    experiment.build(config, sharding.make_mesh(-1, 1, 1), num_classes=4)
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"model.landmarks=13 is more than the 12 space-time"):
    mf.orthoformer_space_attention(q, k, v, 13)
  with pytest.raises(ValueError, match="attention must be one of"):
    mf.MotionformerConfig(attention="nystrom")
