"""Task memorisation: the right target frames (modes last / fixed), the two baselines on a
hand-made clip, streaming = full pass, ViViT's temporal position embedding resized by nearest
neighbour for longer eval clips (class and spatial parts untouched), bad configs refused before
any compile, and a few steps through the trainer logging eval/psnr and both baselines."""

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic
from trecvit_dist import experiment, train
from trecvit_dist.tasks import memorisation as mem

FRAMES, SIZE = 4, 32
# One grey level per frame: a frame's value names it (0.05, 0.15, 0.25, ... for frames 0, 1, ...).
LEVELS = 0.05 + 0.1 * np.arange(8)


@pytest.fixture(scope="module")
def memorisation_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("memorisation")
  synthetic.ensure(
    str(path), kind="memorisation", num_train=32, num_validation=8, frames=16, size=SIZE, seed=0
  )
  return path


@pytest.fixture(scope="module")
def make_config(memorisation_data, load_config_fn, shrink_fn):
  def make(arg=None, **overrides):
    config = load_config_fn("synthetic_memorisation", arg)
    small = {"memorisation.offset": 2, "model.depth": 1}
    return shrink_fn(config, memorisation_data, **{**small, **overrides})

  return make


def grey_clip(frames: int, batch: int = 2):
  """[batch, frames, SIZE, SIZE, 3]: frame t is flat at LEVELS[t] (the same in every row)."""
  levels = jnp.asarray(LEVELS[:frames], jnp.float32).reshape(1, frames, 1, 1, 1)
  return jnp.broadcast_to(levels, (batch, frames, SIZE, SIZE, 3))


def built(config):
  task = experiment.make_task(config, 1)
  model = task.build_model()
  params = jax.jit(model.init)(jax.random.key(0), *task.init_inputs())["params"]
  return task, model, flax.linen.meta.unbox(params)


def image_strings(workdir, tag: str) -> dict[int, list[bytes]]:
  """{step: [width, height, png, ...]} of the image summaries CLU wrote under tag."""
  import tensorflow as tf

  out = {}
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = list(tf.make_ndarray(v.tensor))
  return out


def psnr(mse):
  return -10.0 * np.log10(mse)


def test_target_index_modes():
  assert mem.target_index("last", 2, 8, 8) == 5
  assert mem.target_index("last", 2, 8, 16) == 13  # the target follows the clip's end
  assert mem.target_index("fixed", 2, 8, 16) == 5  # the target stays put as the clip grows
  assert mem.target_index("last", 0, 8, 8) == 7
  with pytest.raises(ValueError, match="outside a 4-frame clip"):
    mem.target_index("fixed", 1, 8, 4)
  with pytest.raises(ValueError, match="mode must be one of"):
    mem.target_index("first", 1, 8, 8)


def test_targets_and_baselines_on_a_hand_made_clip(make_config):
  config = make_config(**{"memorisation.eval_frames": 8})
  task, model, params = built(config)
  # At initialisation the head's kernel is zero and its bias 0.5: every pixel predicts 0.5, so
  # the loss names the frame the task compares with (in training, frame 4-1-2 in every mode).
  loss = jax.jit(lambda p, b: task.loss(model, p, b, jax.random.key(0))[0])
  np.testing.assert_allclose(loss(params, {"video": grey_clip(FRAMES)}), (0.5 - LEVELS[1]) ** 2)

  fixed_config = make_config(**{"memorisation.eval_frames": 8, "memorisation.mode": "fixed"})
  fixed = experiment.make_task(fixed_config, 1)
  assert (task.target(FRAMES), task.target(8)) == (1, 5)  # last: k frames before the end
  assert (fixed.target(FRAMES), fixed.target(8)) == (1, 1)  # fixed: where training had it
  video = grey_clip(8, batch=3)[:, None]  # one view of 8 frames
  batch = {"video": video, "mask": jnp.array([1, 1, 0], bool)}
  for mode_task, target in ((task, 5), (fixed, 1)):
    sums = jax.jit(lambda p, b, t=mode_task: t.eval_sums(model, p, b, None))(params, batch)
    assert float(sums["count"]) == 2.0  # the padding row is left out
    want = {
      "loss": (0.5 - LEVELS[target]) ** 2,
      "psnr": psnr((0.5 - LEVELS[target]) ** 2),
      "psnr_copy_last": psnr((LEVELS[7] - LEVELS[target]) ** 2),
      "psnr_mean_frame": psnr((LEVELS[:8].mean() - LEVELS[target]) ** 2),
    }
    got = {k: float(v) / 2.0 for k, v in sums.items() if k != "count"}
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4)


def test_psnr_clips_and_floors():
  target = jnp.full((1, 2, 2, 3), 1.0)
  assert float(mem.psnr_per_video(jnp.full_like(target, 3.0), target)[0]) == pytest.approx(100.0)
  half = float(mem.psnr_per_video(jnp.full_like(target, 0.5), target)[0])
  assert half == pytest.approx(psnr(0.25), rel=1e-6)


def test_streaming_equals_the_full_pass(make_config):
  config = make_config()
  task, model, params = built(config)
  # A random head (its initial kernel is zero, which would hide any mismatch).
  kernel = params["memorisation_head"]["kernel"]
  params["memorisation_head"]["kernel"] = jax.random.normal(jax.random.key(1), kernel.shape)
  video = jax.random.uniform(jax.random.key(2), (2, 6, SIZE, SIZE, 3))
  full = mem.reconstruct_every_step(model, params, video)
  streamed = mem.reconstruct_frame_by_frame(model, params, video)
  assert streamed.shape == (2, 6, SIZE, SIZE, 3)
  np.testing.assert_allclose(streamed, full, atol=1e-5)
  assert np.std(full[:, -1]) > 1e-2  # not a flat image: the test could catch a mismatch


def test_resize_temporal_posemb_by_nearest_neighbour():
  np.testing.assert_array_equal(mem.nearest_slots(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(mem.nearest_slots(4, 6), [0, 1, 1, 2, 3, 3])
  np.testing.assert_array_equal(mem.nearest_slots(8, 4), [1, 3, 5, 7])
  slots, per_slot, c = 2, 3, 4
  pos = jnp.arange((1 + slots * per_slot) * c, dtype=jnp.float32).reshape(1, -1, c)
  out = mem.resize_temporal_posemb(pos, slots, 4, axis=1, per_slot=per_slot)
  assert out.shape == (1, 1 + 4 * per_slot, c)
  np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # the class token's position
  grid = pos[0, 1:].reshape(slots, per_slot, c)
  np.testing.assert_array_equal(out[0, 1:].reshape(4, per_slot, c), grid[np.array([0, 0, 1, 1])])
  with pytest.raises(ValueError, match="does not hold"):
    mem.resize_temporal_posemb(pos, 3, 4, axis=1, per_slot=per_slot)


def test_vivit_evaluates_longer_clips_with_the_resized_embedding(make_config):
  config = make_config("vivit", **{"memorisation.eval_frames": 8, "model.width": 16})
  task, model, params = built(config)
  pos = params["Transformer"]["pos_embedding"]  # [1, 4 slots x 16 patches, c]: "gap", no CLS
  assert pos.shape == (1, FRAMES * 16, 16)
  eval_model, eval_params = task.for_frames(model, params, 8)
  resized = eval_params["Transformer"]["pos_embedding"]
  want = pos.reshape(FRAMES, 16, 16)[mem.nearest_slots(FRAMES, 8)].reshape(1, 8 * 16, 16)
  np.testing.assert_array_equal(resized, want)
  for path in ("embedding", "memorisation_head"):  # everything else is the trained parameters
    jax.tree.map(np.testing.assert_array_equal, eval_params[path], params[path])
  video = grey_clip(8, batch=2)[:, None]
  batch = {"video": video, "mask": jnp.ones((2,), bool)}
  sums = jax.jit(lambda p, b: task.eval_sums(model, p, b, None))(params, batch)
  assert np.isfinite(float(sums["psnr"]))
  with pytest.raises(ValueError, match="encode\\(video, state\\)"):
    mem.reconstruct_frame_by_frame(model, params, video[:, 0])


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"memorisation.offset": 4}, "offset 4 is not smaller than the clip"),
    ({"memorisation.offset": -1}, "offset must be an integer >= 0"),
    ({"memorisation.eval_frames": 2}, "eval_frames 2 is shorter than the offset 2 \\+ 1"),
    (
      {"memorisation.mode": "fixed", "memorisation.eval_frames": 1},
      "does not reach the fixed target frame 1",
    ),
    ({"memorisation.mode": "first"}, "mode must be one of"),
    ({"memorisation.ofset": 1}, "unknown fields \\['ofset'\\]"),
  ],
)
def test_bad_configs_fail_before_any_compile(make_config, overrides, message):
  config = make_config()
  with config.unlocked():
    for key, value in overrides.items():
      config.memorisation[key.split(".")[1]] = value
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  with pytest.raises(ValueError, match=message):
    experiment.build(config, mesh, 1)


def test_eval_clips_must_split_over_mesh_time(make_config):
  task = experiment.make_task(make_config(**{"memorisation.eval_frames": 6}), 1)
  assert not task.config_errors({"time": 2})
  (error,) = task.config_errors({"time": 4})
  assert "eval_frames 6 is not divisible by mesh.time=4" in error


@pytest.mark.slow
def test_a_few_steps_through_the_trainer_log_psnr_and_baselines(make_config, tb_scalars, tmp_path):
  # Eval on 8-frame clips after training on 4: the eval pipeline's clip length is the task's.
  config = make_config(**{"memorisation.eval_frames": 8, "total_steps": 2, "eval_every_steps": 2})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert sorted(result.train_losses) == [1, 2]
  metrics = result.eval_metrics
  assert set(metrics) == {"loss", "psnr", "psnr_copy_last", "psnr_mean_frame"}
  for tag in ("eval/psnr", "eval/psnr_copy_last", "eval/psnr_mean_frame"):
    values = tb_scalars(tmp_path, tag)
    assert sorted(values) == [2] and np.isfinite(values[2]), tag
  # One image per eval: rows of 8 input frames, the target and the reconstruction (+ 2 lines).
  strings = image_strings(tmp_path, mem.Memorisation.image_tag)
  assert sorted(strings) == [2]
  assert strings[2][:2] == [str(10 * SIZE + 2).encode(), str(SIZE).encode()]
  train_psnr = tb_scalars(tmp_path, "train/psnr")
  assert sorted(train_psnr) == [1, 2] and all(np.isfinite(v) for v in train_psnr.values())
  assert 5.0 < metrics["psnr_copy_last"] < 40.0 and 5.0 < metrics["psnr_mean_frame"] < 40.0
