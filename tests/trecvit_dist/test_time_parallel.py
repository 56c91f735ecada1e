"""mesh.time: TRecViT with its frames sharded over devices equals the one-device model (loss,
gradients, streaming), moves no activation across time, and bad meshes are refused up front."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import experiment, inference, sharding

NUM_CLASSES = 4
FRAMES = 24  # 24 = 8 shards of 3: a shard is exactly the conv1d's 3-frame halo; 4 x 6; 2 x 12
TOL = 1e-5


def _config(shrink_fn, load_config_fn, **mesh):
  config = shrink_fn(
    load_config_fn("synthetic_tiny"),
    "/nonexistent",  # nothing is read: the steps are built and compiled only
    **{
      "data.num_frames": FRAMES,
      "data.image_size": 16,
      "model.dtype": "float32",
      "model.depth": 1,  # one recurrent and one per-frame block show every cross-shard path
    },
  )
  config.mesh.update(dict(data=1, fsdp=1, tensor=1, time=1) | mesh)
  return config


def _experiment(config, num_devices):
  mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:num_devices])
  return experiment.build(config, mesh, NUM_CLASSES)


def _batch():
  video = jax.random.uniform(jax.random.key(1), (8, FRAMES, 16, 16, 3))
  return dict(video=video, label=jnp.arange(8, dtype=jnp.int32) % NUM_CLASSES)


def _loss_and_grads(exp, params):
  """(loss, grads) of the task's loss, jitted with the experiment's shardings."""
  task, model = exp.task, exp.model

  def fn(params, batch):
    return jax.value_and_grad(lambda p: task.loss(model, p, batch, jax.random.key(0))[0])(params)

  batch_shardings = exp.batch_shardings(exp.config.batch_size, train=True)
  with exp.scope():
    step = jax.jit(fn, in_shardings=(exp.state_shardings["params"], batch_shardings))
    params = jax.device_put(params, exp.state_shardings["params"])
    batch = jax.device_put(_batch(), batch_shardings)
    return step, step(params, batch), (params, batch)


@pytest.fixture(scope="module")
def params(shrink_fn, load_config_fn):
  """The tiny model's initial parameters (host arrays)."""
  exp = _experiment(_config(shrink_fn, load_config_fn), 1)
  return jax.device_get(exp.init_state()["params"])


@pytest.fixture(scope="module")
def reference(params, shrink_fn, load_config_fn):
  """(loss, grads) on one device."""
  exp = _experiment(_config(shrink_fn, load_config_fn), 1)
  _, (loss, grads), _ = _loss_and_grads(exp, params)
  return float(loss), jax.device_get(grads)


def _result_shapes(hlo_text, op):
  """Result shapes of every `op` (e.g. all-gather) in compiled HLO text."""
  shapes = re.findall(rf"= \w+\[([\d,]*)\]\S* {op}(?:-start)?\(", hlo_text)
  return [tuple(int(d) for d in s.split(",") if d) for s in shapes]


@pytest.mark.parametrize(
  "mesh",
  [
    dict(time=2),
    dict(time=8),
    dict(time=4, fsdp=2),
    dict(time=2, data=2, fsdp=2),
  ],
  ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()),
)
def test_time_sharded_loss_and_grads_equal_one_device(
  mesh, params, reference, shrink_fn, load_config_fn
):
  """The classifier head starts at zero (the loss alone is blind to the features): gradients of
  every parameter, the head's included, check the forward pass too."""
  want_loss, want_grads = reference
  config = _config(shrink_fn, load_config_fn, **mesh)
  exp = _experiment(config, int(np.prod(list(mesh.values()))))
  step, (loss, grads), args = _loss_and_grads(exp, params)
  assert exp.mesh.shape["time"] == mesh["time"]
  np.testing.assert_allclose(float(loss), want_loss, rtol=TOL, atol=TOL)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want_grads))
  for path, got in jax.tree_util.tree_leaves_with_path(jax.device_get(grads)):
    np.testing.assert_allclose(
      got, flat_want[path], rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path)
    )
  if set(mesh) == {"time"}:
    # Parameters are replicated: every all-gather is over time. Only the gated LRU's carries,
    # [2, n, rows of a shard, lru width], may cross it; never frames (no dim a multiple of T).
    n, width = mesh["time"], 2 * config.model.width
    rows = 8 * (1 + (16 // config.model.patch_size[1]) ** 2)  # videos x tokens per frame
    with exp.scope():
      text = step.lower(*args).compile().as_text()
    shapes = _result_shapes(text, "all-gather")
    assert shapes, "expected the LRU carries' all-gather"
    for shape in shapes:
      assert int(np.prod(shape)) <= 2 * n * rows * width, shape
      assert not any(d % FRAMES == 0 for d in shape), shape
    # The conv1d's halo: at most its 3 frames before a shard (this shard holds 24 / n frames).
    for shape in _result_shapes(text, "collective-permute"):
      assert int(np.prod(shape)) <= 3 * rows * width, shape
    assert "all-to-all" not in text


def test_video_batch_is_sharded_over_time(shrink_fn, load_config_fn):
  exp = _experiment(_config(shrink_fn, load_config_fn, time=4, data=2), 8)
  video = exp.batch_spec(8, train=True)["video"]
  assert video.sharding.spec == jax.sharding.PartitionSpec(
    ("data", "fsdp"), "time", None, None, None
  )
  views = exp.batch_spec(8, train=False)["video"]
  assert views.sharding.spec[views.ndim - 4] == "time"


def test_frame_by_frame_equals_the_time_sharded_pass(params, shrink_fn, load_config_fn):
  """The streaming step (one frame at a time, one device) gives the time-sharded full pass's
  tokens; the second half of the clip continued from the first half's state under time
  sharding (h0 and the conv window enter shard 0) gives them too."""
  config = _config(shrink_fn, load_config_fn, time=4, data=2)
  exp = _experiment(config, 8)
  cfg, model = exp.model_cfg, exp.model
  video = _batch()["video"]
  half = FRAMES // 2

  def encode(p, v, state=None):
    return model.apply({"params": p}, v, state, method=type(model).encode)

  with exp.scope():
    video_sharding = sharding.video_sharding(exp.mesh)
    p = jax.device_put(params, exp.state_shardings["params"])
    full, _ = jax.jit(encode)(p, jax.device_put(video, video_sharding))
    # The first half on one device (no rules): its final state, then the rest time-sharded.
    with nn.logical_axis_rules(()):
      _, state = jax.jit(encode)(params, video[:, : FRAMES - half])
    rest, _ = jax.jit(encode)(p, jax.device_put(video[:, FRAMES - half :], video_sharding), state)
  streamed = inference.predict_frame_by_frame(cfg, params, np.asarray(video))["encoded"]
  np.testing.assert_allclose(np.asarray(full), streamed, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(rest), np.asarray(full)[:, FRAMES - half :], rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (dict(time=5), "mesh.time=5 does not divide the 24 time steps"),
    (dict(time=16), "mesh.time=16 does not divide the 24 time steps"),
  ],
)
def test_bad_mesh_time_is_refused_before_compiling(overrides, message, shrink_fn, load_config_fn):
  config = _config(shrink_fn, load_config_fn, **overrides)
  task = experiment.make_task(config, NUM_CLASSES)
  mesh_shape = dict(data=1, fsdp=1, tensor=1, time=overrides["time"])
  errors = experiment.config_errors(config, mesh_shape, task.family, task.model_cfg, task)
  assert any(message in e for e in errors), errors


def test_tubelet_frames_must_divide(shrink_fn, load_config_fn):
  config = _config(shrink_fn, load_config_fn, time=8)
  config.model.patch_size = (2, 8, 8)  # 24 frames -> 12 time steps: not over 8 shards
  with pytest.raises(ValueError, match="mesh.time=8 does not divide the 12 time steps"):
    _experiment(config, 8)


def test_families_without_time_parallel_refuse_mesh_time(shrink_fn, load_config_fn):
  config = _config(shrink_fn, load_config_fn, time=2)
  config.model.name = "vivit"
  config.model.variant = "Ti"
  with pytest.raises(ValueError, match="model vivit cannot shard frames over mesh.time=2"):
    _experiment(config, 2)


def test_mesh_time_multiplies_the_other_axes():
  assert sharding.mesh_shape(-1, 1, 1, 8, time=4) == (2, 1, 1)
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.mesh_shape(-1, 1, 1, 8, time=3)
  with pytest.raises(ValueError, match="mesh.time must be a positive"):
    sharding.mesh_shape(1, 1, 1, 8, time=0)
  mesh = sharding.make_mesh(1, 2, 1, jax.devices(), time=4)
  assert dict(mesh.shape) == dict(data=1, fsdp=2, time=4, tensor=1)
