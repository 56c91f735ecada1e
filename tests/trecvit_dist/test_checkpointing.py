"""Checkpoints in-process: items and retention, the iterator state of exactly the saved step,
resume onto another device count, unreadable checkpoints, a full disk, init_from.

The real-signal, real-process tests (SIGTERM, kill -9, bit-exact resume, 2 processes, a torn
save, barrier timeouts) are in test_preemption.py.
"""

import contextlib
import logging
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from data_pipelines import pipeline
from trecvit_dist import checkpointing, experiment, official, sharding, train
from trecvit_dist.models import TRecViT

OFFICIAL = pathlib.Path(__file__).resolve().parents[1] / "fixtures/official_trecvit"


def run(config, workdir, devices=None):
  return train.train_and_evaluate(config, str(workdir), devices=devices)


def scalars(workdir, tag) -> dict[int, list[float]]:
  """Every value of a TensorBoard scalar in the workdir's event files, by step."""
  out = {}
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.tag == tag:
          out.setdefault(event.step, []).append(tensor_util.make_ndarray(value.tensor).item())
  return out


def assert_trees_equal(actual, expected):
  """Same leaves in the same order, every one equal bit for bit (a checkpoint read without a
  target has lists where the state has optax's named tuples)."""
  actual, expected = jax.device_get(actual), jax.device_get(expected)
  assert len(jax.tree.leaves(actual)) == len(jax.tree.leaves(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def small_state(seed=0, size=64):
  """A sharded stand-in for a train state (random, so that compression cannot shrink it)."""
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(seed)
  return dict(
    step=jax.device_put(np.int32(seed), NamedSharding(mesh, P())),
    params=dict(
      w=jax.device_put(rng.normal(size=(size, size)).astype(np.float32), NamedSharding(mesh, P())),
      sharded=jax.device_put(
        rng.normal(size=(size, size)).astype(np.float32), NamedSharding(mesh, P("data"))
      ),
    ),
  )


# ----------------------------------------------------------------------------- saving


def test_saves_every_n_keeps_last_k_and_every_nth_and_resumes_on_4_devices(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  overrides = {
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 2,
    "keep_every_steps": 4,
    "mesh.fsdp": 2,  # parameters sharded, so resuming on 4 devices really re-shards them
  }
  result = run(tiny_config(total_steps=10, **overrides), workdir)

  # Saved at 2, 4, ..., 10; kept: the last 2 (8, 10) and every 4th (4, 8).
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=2, keep=2)
  assert ckpt.steps() == [4, 8, 10]
  for step in ckpt.steps():
    names = {p.name for p in (workdir / "checkpoints" / str(step)).iterdir()}
    assert {"state", "data_iter", "config"} <= names
    saved_step, state, data_state = ckpt.read(step)
    assert set(state) == {"step", "params", "opt_state", "rng"}
    assert int(state["step"]) == step
    # The iterator state saved with step s is the one after exactly s batches.
    assert data_state["global_batches"] == step
    assert data_state["next_position"] == step * 8
  _, final, _ = ckpt.read(10)
  assert_trees_equal(final, result.state)
  saved_config = ckpt.manager.restore(
    10, args=checkpointing.ocp.args.Composite(config=checkpointing.ocp.args.JsonRestore())
  ).config
  assert saved_config["checkpoint_every_steps"] == 2 and saved_config["total_steps"] == 10

  # perf/checkpoint_blocking_ms: once per save, with the next logged scalars.
  blocking = scalars(workdir, "perf/checkpoint_blocking_ms")
  assert sorted(blocking) == [3, 5, 7, 9]  # saves at 2, 4, 6, 8 (10 is after the last log)
  assert all(0 < v[0] < 60_000 for v in blocking.values())

  # Saved on 8 devices (data 4 x fsdp 2): restores exactly onto 4 devices with fsdp 4 ...
  mesh4 = sharding.make_mesh(1, 4, 1, jax.devices()[:4])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh4, x.sharding.spec)
    ),
    result.state,
  )
  step, restored, _ = ckpt.restore_latest(abstract)
  assert step == 10
  assert_trees_equal(restored, result.state)
  assert all(
    leaf.sharding.mesh.devices.size == 4 and leaf.sharding == a.sharding
    for leaf, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True)
  )
  ckpt.close()
  # ... and the trainer resumes there with mesh.data=-1 over 4 devices.
  more = run(
    tiny_config(total_steps=12, **{**overrides, "mesh.fsdp": 1, "mesh.data": -1}),
    workdir,
    devices=jax.devices()[:4],
  )
  assert sorted(more.train_losses) == [11, 12]
  assert all(np.isfinite(v) for v in more.train_losses.values())
  assert {d.id for d in jax.tree.leaves(more.state)[0].sharding.device_set} == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- bad checkpoints


def _corrupt(step_dir: pathlib.Path) -> None:
  """Removes the array data of a checkpoint step (a disk losing files)."""
  for data in step_dir.glob("state/**/d"):
    shutil.rmtree(data)


def test_unreadable_checkpoints_fall_back_then_fail_loudly(tiny_config, tmp_path, caplog):
  workdir = tmp_path / "run"
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, keep=5)
  for step in (1, 2):
    ckpt.save(step, small_state(step), {"position": step}, {})
  ckpt.close()
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small_state()
  )

  _corrupt(workdir / "checkpoints" / "2")
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, keep=5)
  with caplog.at_level(logging.WARNING):
    step, state, data_state = ckpt.restore_latest(abstract)
  assert (step, data_state) == (1, {"position": 1})
  assert_trees_equal(state, small_state(1))
  assert any("step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)

  _corrupt(workdir / "checkpoints" / "1")
  with pytest.raises(
    checkpointing.CheckpointError, match=r"\(steps \[1, 2\]\) but none can be read"
  ):
    ckpt.restore_latest(abstract)
  ckpt.close()
  # The trainer refuses too, instead of starting over.
  with pytest.raises(checkpointing.CheckpointError, match="Refusing to start over"):
    run(tiny_config(), workdir)


@contextlib.contextmanager
def _small_disk(kind: str, path: pathlib.Path, limit_bytes: int):
  """A directory where writing more than limit_bytes fails (yields, then the limit applies)."""
  if kind == "tmpfs":
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={limit_bytes}", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
      pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE variant still runs)")
    try:
      yield lambda: contextlib.nullcontext()
    finally:
      subprocess.run(["umount", "-l", str(path)], check=True)
  else:
    # Files may not grow past limit_bytes while the limit is on (EFBIG instead of ENOSPC).
    @contextlib.contextmanager
    def limited():
      soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
      previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
      try:
        yield
      finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)

    path.mkdir()
    yield limited


@pytest.mark.parametrize(
  "kind, limit_bytes, error",
  [
    ("tmpfs", 3 * 2**20, "No space left on device"),  # limit: the disk's size
    ("rlimit_fsize", 2**18, "File too large"),  # limit: the largest file
  ],
)
# Orbax's background writer reports its closed event loop after the failure; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
  kind, limit_bytes, error, tmp_path, caplog
):
  size = 512  # two float32 [512, 512] arrays: 2 MiB of incompressible data per checkpoint
  with _small_disk(kind, tmp_path / "disk", limit_bytes) as limit:
    workdir = tmp_path / "disk" / "run"
    ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, keep=5)
    ckpt.save(1, small_state(1, size), {"position": 1}, {})
    ckpt.wait()
    with limit(), pytest.raises(Exception, match=error):
      ckpt.save(2, small_state(2, size), {"position": 2}, {})
      ckpt.wait()
    with contextlib.suppress(Exception):
      ckpt.close()  # the manager may re-raise the same failure

    ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, keep=5)
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small_state(0, size)
    )
    with caplog.at_level(logging.WARNING):
      step, state, data_state = ckpt.restore_latest(abstract)
    assert (step, data_state) == (1, {"position": 1})
    assert_trees_equal(state, small_state(1, size))
    assert any("2.orbax-checkpoint-tmp" in r.getMessage() for r in caplog.records)
    ckpt.close()


# ----------------------------------------------------------------------------- iterator state


def test_iterator_state_is_the_same_on_every_process(tiny_data):
  """One saved iterator state serves every process and every process count."""
  states = []
  for count in (1, 2, 4):
    for index in range(count):
      it = pipeline.train_iterator(
        str(tiny_data),
        "train",
        global_batch_size=8,
        num_frames=4,
        stride=2,
        image_size=32,
        seed=0,
        process_index=index,
        process_count=count,
      )
      for _ in range(3):
        next(it)
      states.append(it.get_state())
      it.close()
  assert all(s == states[0] for s in states), states
  assert states[0]["global_batches"] == 3 and states[0]["next_position"] == 24


# ----------------------------------------------------------------------------- init_from


def _official_tiny(tiny_config, **overrides):
  """The trainer config of tests/fixtures/official_trecvit/tiny_config.json, learning rate 0
  (so one step leaves the parameters as loaded), on the 4-class synthetic data (npz: 10)."""
  return tiny_config(
    **{
      "model.width": 64,
      "model.depth": 2,
      "model.mlp_dim": 128,
      "model.num_heads": 4,
      "model.patch_size": (1, 8, 8),
      "model.rep_size": 96,
      "model.conv1d_temporal_width": 4,
      "model.state_multiplier": 2,
      "model.min_rad": 0.5,
      "data.image_size": 32,
      "data.num_frames": 8,
      "optimizer.learning_rate": 0.0,
      "total_steps": 1,
      **overrides,
    }
  )


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_init_from_official_npz_and_from_another_workdir(tiny_config, tmp_path):
  npz = str(OFFICIAL / "tiny_params.npz")
  config = _official_tiny(tiny_config, init_from=npz)
  first = run(config, tmp_path / "from_npz")

  cfg = experiment.model_config(config, 4)
  flat_npz = official.load_npz(npz)
  assert flat_npz["decoder/cls_head/kernel"].shape[-1] == 10
  expected = _flat(
    official.import_params(
      {k: v for k, v in flat_npz.items() if not k.startswith("decoder/cls_head")},
      cfg,
      (32, 32),
      allow_missing_prefixes=("decoder/cls_head",),
    )
  )
  loaded = _flat(first.state["params"])
  assert set(loaded) == set(expected) | {"decoder/cls_head/kernel", "decoder/cls_head/bias"}
  for key, value in expected.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  # The 4-class head is the scratch initialisation, not the npz's 10-class one.
  tx, _ = experiment.make_optimizer(config)
  sample = jnp.zeros((1, 8, 32, 32, 3), jnp.float32)
  init = experiment.make_init_state(TRecViT(cfg), tx, (sample,), config.seed)
  scratch = _flat(jax.jit(lambda r: nn.meta.unbox(init(r)))(jax.random.key(config.seed))["params"])
  for key in ("decoder/cls_head/kernel", "decoder/cls_head/bias"):
    assert loaded[key].shape[-1] == 4
    np.testing.assert_array_equal(loaded[key], scratch[key])

  # From that workdir's checkpoint, with 7 classes, on 4 devices: params only, head re-initialised.
  source_step, source_state, _ = checkpointing.Checkpointer(
    str(tmp_path / "from_npz"), every_steps=0, keep=1, read_only=True
  ).read()
  config = _official_tiny(
    tiny_config,
    init_from=str(tmp_path / "from_npz"),
    **{"model.num_classes": 7, "mesh.data": -1},
  )
  second = run(config, tmp_path / "from_workdir", devices=jax.devices()[:4])
  assert source_step == 1 and int(second.state["step"]) == 1  # the source's step is not resumed
  loaded, source = _flat(second.state["params"]), _flat(source_state["params"])
  for key, value in source.items():
    if key.startswith("decoder/cls_head"):
      assert loaded[key].shape[-1] == 7
    else:
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_sigterm_sets_the_flag_and_a_failing_run_gets_the_old_handler_back():
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(RuntimeError, match="boom"), checkpointing.PreemptionWatcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not watcher.flag and time.monotonic() < deadline:
      time.sleep(0.01)
    assert watcher.should_stop(2)
    raise RuntimeError("boom")
  assert signal.getsignal(signal.SIGTERM) is before
