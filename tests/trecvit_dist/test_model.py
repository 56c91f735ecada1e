"""TRecViT model: official parity, frame-by-frame, causality, sizes, init, dtypes, bad input."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import inference, official
from trecvit_dist.models import TRecViT, from_official_json, make_config

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "official_trecvit"
TOL = 1e-4  # the fixture README's tolerance for a faithful float32 implementation


@pytest.fixture(scope="module")
def fixture():
  cfg = from_official_json(json.loads((FIXTURE / "tiny_config.json").read_text()))
  io = dict(np.load(FIXTURE / "tiny_io.npz"))
  params = official.import_params(official.load_npz(FIXTURE / "tiny_params.npz"), cfg, (32, 32))
  return cfg, params, io


def tiny_config(**overrides):
  fields = dict(
    width=32,
    depth=2,
    mlp_dim=64,
    num_heads=2,
    patch_size=(1, 8, 8),
    num_classes=5,
    rep_size=16,
    frames_per_clip=6,
  )
  fields.update(overrides)
  return make_config(**fields)


def random_params(cfg, video_shape, seed=0):
  video = jnp.zeros(video_shape, jnp.float32)
  return nn.meta.unbox(TRecViT(cfg).init(jax.random.key(seed), video)["params"])


def test_official_parity_whole_video(fixture):
  cfg, params, io = fixture
  out = inference.predict(cfg, params, io["input_video"])
  np.testing.assert_allclose(out["logits"], io["output_logits"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["probs"], io["output_probs"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["encoded"], io["output_encoded"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["pre_logits"], io["output_pre_logits"], atol=TOL, rtol=0)


def test_official_parity_frame_by_frame(fixture):
  cfg, params, io = fixture
  out = inference.predict_frame_by_frame(cfg, params, io["input_video"])
  np.testing.assert_allclose(out["logits"], io["output_logits"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["encoded"], io["output_encoded"], atol=TOL, rtol=0)


@pytest.mark.parametrize("frame_by_frame", [False, True])
def test_predict_cli_matches_fixture(tmp_path, frame_by_frame):
  io = np.load(FIXTURE / "tiny_io.npz")
  np.save(tmp_path / "v.npy", io["input_video"])
  cmd = [
    sys.executable,
    "-m",
    "trecvit_dist.official",
    "predict",
    "--params",
    str(FIXTURE / "tiny_params.npz"),
    "--config",
    str(FIXTURE / "tiny_config.json"),
    "--video",
    str(tmp_path / "v.npy"),
    "--out",
    str(tmp_path / "o.npz"),
  ]
  subprocess.run(cmd + (["--frame-by-frame"] if frame_by_frame else []), check=True)
  out = np.load(tmp_path / "o.npz")
  assert set(out.files) == {"logits", "probs", "encoded"}
  np.testing.assert_allclose(out["logits"], io["output_logits"], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["encoded"], io["output_encoded"], atol=TOL, rtol=0)


def test_import_reports_every_bad_key(fixture):
  cfg, _, _ = fixture
  flat = official.load_npz(FIXTURE / "tiny_params.npz")
  del flat["encoder/encoder_norm/scale"]
  flat["encoder/extra/kernel"] = np.zeros(3)
  flat["decoder/cls_head/bias"] = np.zeros(11)
  with pytest.raises(ValueError) as e:
    official.import_params(flat, cfg, (32, 32))
  msg = str(e.value)
  assert "encoder/encoder_norm/scale" in msg and "missing" in msg
  assert "encoder/extra/kernel" in msg and "unexpected" in msg
  assert "decoder/cls_head/bias: checkpoint (11,) vs model (10,)" in msg


def test_multi_clip_video_averages_fresh_clips(fixture):
  cfg, params, io = fixture
  video = np.concatenate([io["input_video"], io["input_video"][:, ::-1]], axis=1)  # 2 clips
  out = inference.predict(cfg, params, video)
  second = inference.predict(cfg, params, video[:, 8:])
  np.testing.assert_allclose(
    out["logits"], (io["output_logits"] + second["logits"]) / 2, atol=TOL, rtol=0
  )
  fbf = inference.predict_frame_by_frame(cfg, params, video)
  np.testing.assert_allclose(fbf["logits"], out["logits"], atol=TOL, rtol=0)


def test_causality_by_gradients():
  cfg = tiny_config()
  video = jax.random.uniform(jax.random.key(1), (1, 6, 16, 16, 3))
  params = random_params(cfg, video.shape)
  model = TRecViT(cfg)

  def frame_output(v, t):
    encoded, _ = model.apply({"params": params}, v, method=TRecViT.encode)
    return jnp.sum(encoded[:, t] ** 2)

  for t in (0, 2, 4):
    g = jax.grad(frame_output)(video, t)
    per_frame = jnp.abs(g).sum(axis=(0, 2, 3, 4))
    assert np.all(np.asarray(per_frame[t + 1 :]) == 0.0), f"output {t} depends on later frames"
    assert np.all(np.asarray(per_frame[: t + 1]) > 0.0), f"output {t} ignores earlier frames"


def test_frame_state_is_constant_in_video_length():
  cfg = tiny_config()
  video = np.random.default_rng(0).uniform(size=(2, 6, 16, 16, 3)).astype(np.float32)
  params = random_params(cfg, video.shape)
  step = inference.make_frame_step(cfg)
  _, state = step(params, video[:, 0], None)
  shapes = jax.tree.map(lambda x: x.shape, state)
  for i in range(1, 6):
    _, state = step(params, video[:, i], state)
    assert jax.tree.map(lambda x: x.shape, state) == shapes
  # [(b n), lru_width] recurrent state and [(b n), W-1, lru_width] conv window per layer.
  n = 4 + 1
  assert state["layers"][0]["h"].shape == (2 * n, cfg.lru_width)
  assert state["layers"][0]["conv"].shape == (2 * n, cfg.conv1d_temporal_width - 1, cfg.lru_width)


@pytest.mark.parametrize(
  "variant,overrides",
  [
    ("Ti", {}),
    ("S", dict(posemb="sincos2d", pooling="gap", use_cls_token=False, rep_size=None)),
    ("B", dict(conv1d_temporal_width=2, state_multiplier=1)),
    ("L", {}),
  ],
)
def test_output_shapes_for_sizes(variant, overrides):
  cfg = make_config(variant, num_classes=7, frames_per_clip=4, **overrides)
  video = jax.ShapeDtypeStruct((2, 4, 32, 48, 3), jnp.float32)
  model = TRecViT(cfg)
  variables = jax.eval_shape(model.init, jax.random.key(0), video)
  logits = jax.eval_shape(model.apply, variables, video)
  assert logits.shape == (2, 7)
  encoded, state = jax.eval_shape(
    lambda v, x: model.apply(v, x, method=TRecViT.encode), variables, video
  )
  n = 2 * 3 + int(cfg.use_cls_token)
  assert encoded.shape == (2, 4, n, cfg.width)
  assert len(state) == cfg.depth


@pytest.mark.parametrize("multiplier,millions", [(2, 136.78), (1, 111.91)])
def test_parameter_count_of_b(multiplier, millions):
  shapes = official.expected_shapes(make_config("B", state_multiplier=multiplier), (224, 224))
  count = sum(int(np.prod(s)) for s in shapes.values())
  assert round(count / 1e6, 2) == millions


def test_a_param_init_puts_a_on_the_ring():
  cfg = tiny_config(min_rad=0.5, max_rad=0.999, state_multiplier=16)
  params = random_params(cfg, (1, 2, 16, 16, 3))
  a_param = params["encoder"]["residualblock_00"]["recurrent_block"]["rg_lru"]["a_param"]
  # At gate_a = sigmoid(.) = 1/8 with c = 8: a = exp(-softplus(a_param)).
  a = np.exp(-np.asarray(jax.nn.softplus(a_param)))
  assert a.min() >= 0.5 - 1e-4 and a.max() <= 0.999 + 1e-4
  assert a.min() < 0.6 and a.max() > 0.95  # spread over the whole ring, not a point
  # Uniform in r^2: the mean of a^2 is the midpoint of [min^2, max^2].
  assert abs(np.mean(a**2) - (0.25 + 0.998) / 2) < 0.05


def test_bf16_forward_is_finite_and_close_to_fp32():
  cfg = tiny_config()
  video = jax.random.uniform(jax.random.key(2), (2, 6, 16, 16, 3))
  params = random_params(cfg, video.shape)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  f32 = TRecViT(cfg).apply({"params": params}, video)
  bf16 = TRecViT(cfg.replace(dtype="bfloat16")).apply({"params": params}, video)
  assert bf16.dtype == jnp.float32  # the head runs in float32
  assert np.all(np.isfinite(np.asarray(bf16)))
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
  "shape,match",
  [
    ((2, 6, 16, 16), "rank 4"),
    ((2, 6, 16, 16, 1), "3 channels"),
    ((2, 6, 20, 16, 3), "not divisible by the patch size"),
  ],
)
def test_bad_video_shapes_raise_before_compiling(shape, match):
  cfg = tiny_config()
  params = random_params(cfg, (1, 2, 16, 16, 3))
  with pytest.raises(ValueError, match=match):
    inference.predict(cfg, params, np.zeros(shape, np.float32))


def test_frames_not_divisible_by_temporal_patch():
  cfg = tiny_config(patch_size=(2, 8, 8))
  with pytest.raises(ValueError, match="not divisible by the temporal patch size 2"):
    jax.eval_shape(TRecViT(cfg).init, jax.random.key(0), jnp.zeros((1, 5, 16, 16, 3)))


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    make_config(width=30, num_heads=4)
  with pytest.raises(ValueError, match="Unknown TRecViT variant"):
    make_config("XXL")
