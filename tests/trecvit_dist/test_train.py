"""Trainer: sharded == unsharded, shardings follow the rules, resume, no recompiles, bad input."""

import logging

import jax
import numpy as np
import pytest

from trecvit_dist import checkpointing, experiment, sharding, train

RTOL = 1e-5  # sharded vs single-device losses (issue 5)


def run(config, workdir, devices=None):
  return train.train_and_evaluate(config, str(workdir), devices=devices)


def _losses(result):
  return np.array([result.train_losses[s] for s in sorted(result.train_losses)])


@pytest.mark.slow
def test_meshes_give_the_losses_of_one_device(tiny_config, tmp_path):
  reference = run(tiny_config(**{"mesh.data": 1}), tmp_path / "one", devices=jax.devices()[:1])
  assert sorted(reference.train_losses) == [1, 2, 3]
  for data, fsdp, tensor in ((8, 1, 1), (2, 2, 2), (1, 4, 2)):
    config = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    result = run(config, tmp_path / f"mesh_{data}_{fsdp}_{tensor}")
    np.testing.assert_allclose(_losses(result), _losses(reference), rtol=RTOL, atol=0)
    if (data, fsdp, tensor) == (2, 2, 2):
      check_shardings_follow_rules(result.state)


def check_shardings_follow_rules(state):
  p = state["params"]
  spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
  block = p["encoder"]["encoderblock_0"]
  recurrent = p["encoder"]["residualblock_00"]["recurrent_block"]
  # embed -> fsdp; mlp, heads, lru, lru_heads -> tensor (sharding.LOGICAL_RULES).
  assert spec(block["MlpBlock_0"]["Dense_0"]["kernel"]) == ("fsdp", "tensor")
  assert spec(block["MlpBlock_0"]["Dense_1"]["kernel"]) == ("tensor", "fsdp")
  assert spec(block["MultiHeadDotProductAttention_0"]["query"]["kernel"]) == (
    "fsdp",
    "tensor",
    None,
  )
  assert spec(block["MultiHeadDotProductAttention_0"]["out"]["kernel"]) == ("tensor", None, "fsdp")
  assert spec(recurrent["linear_x"]["kernel"]) == ("fsdp", "tensor")
  assert spec(recurrent["linear_out"]["kernel"]) == ("tensor", "fsdp")
  assert spec(recurrent["rg_lru"]["a_param"]) == ("tensor",)
  assert spec(recurrent["rg_lru"]["input_gate"]["w"]) == ("tensor", None, None)
  assert spec(recurrent["conv_1d"]["w"]) == (None, "tensor")
  # Adam moments are sharded exactly like their parameters.
  mu = state["opt_state"][1][0].mu
  assert mu["encoder"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"].sharding == (
    block["MlpBlock_0"]["Dense_0"]["kernel"].sharding
  )


def test_train_then_resume_continues_from_the_checkpoint(tiny_config, tmp_path, caplog):
  workdir = tmp_path / "run"
  config = tiny_config(checkpoint_every_steps=2, total_steps=3)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    first = run(config, workdir)
  assert sorted(first.train_losses) == [1, 2, 3]
  compiles = [
    r for r in caplog.records if "train_step" in r.getMessage() and "Compiling" in r.getMessage()
  ]
  assert len(compiles) == 1, [r.getMessage() for r in compiles]  # no recompiles after step 1
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=2, keep=3)
  assert ckpt.steps() == [2, 3]
  assert (workdir / "COMPLETED").read_text().strip() == "3"
  # The same command with more steps resumes at 3: only steps 4 and 5 run.
  again = run(tiny_config(checkpoint_every_steps=2, total_steps=5), workdir)
  assert sorted(again.train_losses) == [4, 5]
  assert int(again.state["step"]) == 5


def test_nan_loss_stops_the_run_naming_the_step(tiny_config, tmp_path):
  config = tiny_config(
    **{
      "optimizer.learning_rate": 1e30,
      "optimizer.grad_clip_norm": 0.0,
      "optimizer.warmup_steps": 0,
      "total_steps": 5,
    }
  )
  with pytest.raises(train.NonFiniteLossError, match=r"at step [2-5]"):
    run(config, tmp_path / "nan")


def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(checkpointing.CheckpointError, match="not writable"):
    run(tiny_config(), blocker / "workdir")


def test_bad_config_is_named_before_compiling(tiny_config, tmp_path):
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by the data-parallel size 8"):
    run(tiny_config(batch_size=6), tmp_path / "bad_batch")
  with pytest.raises(ValueError, match="num_heads 2 is not divisible by mesh.tensor=4"):
    run(tiny_config(**{"mesh.data": 2, "mesh.tensor": 4}), tmp_path / "bad_tensor")
  with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
    run(tiny_config(**{"mesh.data": -1, "mesh.tensor": 3}), tmp_path / "bad_mesh")


def test_mesh_shape_fills_and_checks():
  assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
  assert sharding.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="4 devices"):
    sharding.mesh_shape(2, 2, 1, 8)


def test_decay_mask_skips_norms_biases_posemb_and_a_param():
  params = {
    "tokenizer": {"pos_embedding": 0, "cls": 0, "embedding": {"kernel": 0, "bias": 0}},
    "lru": {"a_param": 0, "conv_1d": {"w": 0, "b": 0}},
    "norm": {"scale": 0},
  }
  mask = experiment.decay_mask(params)
  assert mask["tokenizer"]["embedding"]["kernel"] and mask["lru"]["conv_1d"]["w"]
  assert not any(
    [
      mask["tokenizer"]["pos_embedding"],
      mask["tokenizer"]["cls"],
      mask["tokenizer"]["embedding"]["bias"],
      mask["lru"]["a_param"],
      mask["lru"]["conv_1d"]["b"],
      mask["norm"]["scale"],
    ]
  )


def test_relative_workdir_checkpoints_and_resumes(tiny_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the README's command passes a relative --workdir
  config = tiny_config(checkpoint_every_steps=1, total_steps=2)
  first = run(config, "workdirs/relative")
  assert sorted(first.train_losses) == [1, 2]
  assert (tmp_path / "workdirs" / "relative" / "checkpoints" / "2").is_dir()
  again = run(tiny_config(checkpoint_every_steps=1, total_steps=3), "workdirs/relative")
  assert sorted(again.train_losses) == [3]
