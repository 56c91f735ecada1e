"""Task point_tracking: TAP-Vid metrics as eval sums, streaming = full pass, a frozen encoder,
training through the trainer on synthetic tracks, and bad input refused with a clear error."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipelines import pipeline, synthetic
from trecvit_dist import experiment, tapvid, train
from trecvit_dist.tasks import point_tracking as pt

FRAMES, SIZE, POINTS = 4, 32, 8
SMALL_READOUT = {
  "tracking.num_points": POINTS,
  "tracking.eval_num_points": POINTS,
  "tracking.width": 32,
  "tracking.num_heads": 4,
  "tracking.mlp_dim": 64,
  "tracking.fresh_encoder": True,
}


@pytest.fixture(scope="module")
def tracking_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("tracking")
  synthetic.ensure(
    str(path), kind="tracking", num_train=32, num_validation=16, frames=8, size=SIZE, seed=0
  )
  return path


@pytest.fixture(scope="module")
def make_config(tracking_data, load_config_fn, shrink_fn):
  def make(**overrides):
    config = load_config_fn("synthetic_tracking_tiny")
    return shrink_fn(config, tracking_data, **{**SMALL_READOUT, **overrides})

  return make


@pytest.fixture(scope="module")
def built(make_config):
  """(task, model, params) of the shrunk config, at initialisation."""
  task = experiment.make_task(make_config(), num_classes=1)
  model = task.build_model()
  params = flax.linen.meta.unbox(model.init(jax.random.key(0), *task.init_inputs())["params"])
  return task, model, params


@pytest.fixture(scope="module")
def eval_batch(tracking_data, built):
  task = built[0]
  it = pipeline.eval_iterator(
    str(tracking_data),
    "validation",
    global_batch_size=8,
    num_frames=FRAMES,
    stride=2,
    image_size=SIZE,
    worker_count=0,
    **task.data_options(train=False),
  )
  batch = next(iter(it))
  return {k: batch[k] for k in task.batch_spec(8, train=False)}


def _mean_over_valid(metrics: dict, mask) -> dict:
  valid = mask & np.all([np.isfinite(v) for v in metrics.values()], axis=0)
  return {k: float(np.mean(v[valid])) for k, v in metrics.items()}, int(valid.sum())


def test_tapvid_sums_divided_by_count_are_compute_tapvid_metrics():
  rng = np.random.default_rng(0)
  b, q, t = 5, 6, 7
  gt_tracks = rng.uniform(0, 256, (b, q, t, 2)).astype(np.float32)
  gt_occluded = rng.random((b, q, t)) < 0.3
  gt_occluded[:, :, 0] = False  # every point visible at its first frame
  query_t = rng.integers(0, 3, (b, q))
  gt_occluded[np.arange(t) < query_t[..., None]] = True  # queries at the first visible frame
  gt_occluded[3, np.arange(t) > query_t[3][:, None]] = True  # video 3: nothing to evaluate
  xy = np.take_along_axis(gt_tracks, query_t[..., None, None], axis=2)[:, :, 0]
  query = np.stack([query_t, xy[..., 1], xy[..., 0]], -1).astype(np.float32)
  pred_tracks = gt_tracks + rng.normal(0, 6, gt_tracks.shape).astype(np.float32)
  pred_occluded = rng.random((b, q, t)) < 0.3
  mask = np.array([True, True, True, True, False])  # video 4: padding

  sums = pt.tapvid_sums(
    query, gt_occluded, gt_tracks, pred_occluded, pred_tracks, np.ones((b, q), bool), mask
  )
  ours = {k: float(v) / float(sums["count"]) for k, v in sums.items() if k != "count"}
  reference = tapvid.compute_tapvid_metrics(
    query, gt_occluded, gt_tracks, pred_occluded, pred_tracks, "first"
  )
  expected, count = _mean_over_valid(reference, mask)
  assert float(sums["count"]) == count == 3
  assert set(ours) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=key)
  assert 0.05 < ours["average_jaccard"] < 0.95


def test_task_eval_sums_are_the_tapvid_metrics_of_its_predictions(built, eval_batch):
  task, model, params = built
  # Offsets of (0.6, -0.3) pixels and mostly-visible predictions: every threshold matters.
  params = jax.tree.map(lambda x: x, params)
  heads = params["readout"]["heads"]
  heads["position_1"]["bias"] = jnp.asarray([0.02, -0.01])
  heads["logits_1"]["bias"] = jnp.asarray([-1.0, 1.0])

  sums = jax.jit(lambda p, b: task.eval_sums(model, p, b, None))(params, eval_batch)
  preds = pt.track(model, params, eval_batch["video"][:, 0], eval_batch["query_points"])
  scale = pt.RASTER / SIZE
  reference = tapvid.compute_tapvid_metrics(
    eval_batch["query_points"],
    eval_batch["occluded"],
    eval_batch["tracks"] * scale,
    preds["occluded"],
    preds["tracks"] * scale,
    "first",
  )
  expected, count = _mean_over_valid(reference, eval_batch["mask"])
  assert float(sums["count"]) == count > 0
  for key, value in expected.items():
    np.testing.assert_allclose(float(sums[key]) / count, value, rtol=1e-5, err_msg=key)
  assert 0.0 < expected["average_jaccard"] < 1.0 and np.isfinite(float(sums["loss"]))


def _stream_inputs(num_points: int = 6):
  rng = np.random.default_rng(1)
  video = rng.uniform(size=(2, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  query = np.stack(
    [
      rng.integers(0, FRAMES, (2, num_points)),
      rng.uniform(0, SIZE, (2, num_points)),
      rng.uniform(0, SIZE, (2, num_points)),
    ],
    axis=-1,
  ).astype(np.float32)
  return video, query


def test_streaming_frame_by_frame_equals_the_full_pass(built):
  """TRecViT's recurrent encoder and the readout stepped one frame at a time, carrying both
  states, give the whole clip's outputs; points queried later start at their query frame."""
  _, model, params = built
  assert pt.can_stream(model) is None
  params = jax.tree.map(lambda x: x, params)
  params["readout"]["heads"]["position_1"]["kernel"] = 0.1 * jax.random.normal(
    jax.random.key(3), params["readout"]["heads"]["position_1"]["kernel"].shape
  )
  video, query = _stream_inputs()
  full = pt.track(model, params, video, query)
  stream = pt.track_frame_by_frame(model, params, video, query)
  assert set(full) == set(stream)
  for key in ("tracks", "occlusion_logits", "certainty_logits"):
    np.testing.assert_allclose(stream[key], full[key], rtol=1e-4, atol=1e-4, err_msg=key)
  np.testing.assert_array_equal(stream["occluded"], full["occluded"])


def test_encoder_gets_no_gradient_and_no_optimizer_state(built, eval_batch):
  task, model, params = built
  batch = dict(eval_batch, video=eval_batch["video"][:, 0])
  batch.pop("mask")
  grads = jax.grad(lambda p: task.loss(model, p, batch, None)[0])(params)
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  encoder = {k: v for k, v in flat.items() if not k.startswith("readout/")}
  readout = {k: v for k, v in flat.items() if k.startswith("readout/")}
  assert any(k.startswith("encoder/") for k in encoder) and readout
  assert all(not np.any(np.asarray(v)) for v in encoder.values())
  assert np.mean([bool(np.any(np.asarray(v))) for v in readout.values()]) > 0.9
  opt_state = task.optimizer(optax.adam(1e-3)).init(params)
  readout_size = sum(v.size for v in readout.values())
  assert readout_size < sum(x.size for x in jax.tree.leaves(opt_state)) < 2 * readout_size + 16


def test_trains_and_evaluates_through_the_trainer(make_config, tmp_path, tb_scalars):
  config = make_config(total_steps=3, eval_every_steps=3)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.step == 3 and all(np.isfinite(v) for v in result.train_losses.values())
  for key in ("average_jaccard", "occlusion_accuracy", "average_pts_within_thresh"):
    assert 0.0 <= result.eval_metrics[key] <= 1.0
    assert set(tb_scalars(tmp_path / "run", f"eval/{key}")) == {3}
  assert set(tb_scalars(tmp_path / "run", "train/position_loss")) == {1, 2, 3}
  assert _image_shapes(tmp_path / "run", pt.PointTracking.image_tag) == [(2, 128, FRAMES * 128, 3)]


def _image_shapes(workdir, tag):
  import tensorflow as tf  # noqa: PLC0415 (loaded by the trainer's writer already)

  shapes = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          images = tf.make_ndarray(v.tensor)  # [width, height, encoded images...]
          decoded = [tf.io.decode_png(x).shape for x in images[2:]]
          shapes.append((len(decoded), *decoded[0]))
  return shapes


def test_bad_input_is_refused_with_the_reason(built, make_config):
  task, model, params = built
  video, query = _stream_inputs(2)
  bad = query.copy()
  bad[0, 1, 0] = FRAMES
  with pytest.raises(ValueError, match=r"query point \[0, 1\].*outside the clip \[0, 4\)"):
    pt.track(model, params, video, bad)
  bad = query.copy()
  bad[1, 0, 2] = SIZE + 3
  with pytest.raises(ValueError, match=r"query point \[1, 0\].*x outside the frame \[0, 32\]"):
    pt.track_frame_by_frame(model, params, video, bad)
  with pytest.raises(ValueError, match="query_points must be"):
    pt.track(model, params, video, query[..., :2])
  with pytest.raises(ValueError, match=r"tracks has shape \(2, 2, 5, 2\).*need \(2, 2, 4, 2\)"):
    pt.check_shapes(video.shape, query.shape, (2, 2, FRAMES + 1, 2), (2, 2, FRAMES))
  batch = {
    "video": jnp.asarray(video),
    "query_points": jnp.asarray(query),
    "tracks": jnp.zeros((2, 2, FRAMES + 1, 2)),
    "occluded": jnp.zeros((2, 2, FRAMES + 1), bool),
    "point_mask": jnp.ones((2, 2), bool),
  }
  with pytest.raises(ValueError, match="tracks must cover the video's frames"):
    task.loss(model, params, batch, None)

  def errors(**overrides):
    config = make_config(**overrides)
    return " ".join(experiment.make_task(config, 1).config_errors({}))

  assert "needs init_from" in errors(**{"tracking.fresh_encoder": False})
  assert "data.eval_clips=1" in errors(**{"data.eval_clips": 2})
  assert "not divisible by tracking.num_heads" in errors(**{"tracking.num_heads": 5})
  config = make_config()
  config.tracking.num_point = 3
  assert "unknown fields ['num_point']" in " ".join(
    experiment.make_task(config, 1).config_errors({})
  )
