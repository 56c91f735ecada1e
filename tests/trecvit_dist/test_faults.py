"""Fault injection through the real CLI: real processes, real signals, real files.

One tiny run (4 steps, checkpoints at 2 and 4) is trained once per module; each fault then runs
`python -m trecvit_dist.main` once on a copy of its workdir (or a fresh one) and checks the exit
code, the last line printed, and what is left on disk: bad inputs fail before any compile and
leave no workdir behind, a changed config is refused with the fields to allow, a checkpoint with
flipped bytes is skipped and saved anew, a corrupt record stops the loop without dropping the
save in flight (or is skipped and counted), SIGTERM during start-up or compile exits 42.
Compiles are shared through JAX's persistent cache. The multi-process and bit-exact preemption
cases are in test_preemption.py; the supervisor's side in tests/launch/.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from data_pipelines import pipeline, shards
from trecvit_dist import checkpointing, config_base

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
EXIT_PREEMPTED = 42


def cli_flags(config) -> list[str]:
  """--config.FIELD=VALUE for every set field: the subprocess runs exactly this config."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return [f"--config.{k}={v}" for k, v in sorted(flat.items()) if v is not None]


@pytest.fixture(scope="module")
def trainer(load_config_fn, shrink_fn, tiny_data, tmp_path_factory):
  """start(workdir, *flags, env=...) -> Popen of the CLI on the shrunk synthetic_tiny config."""
  cache = tmp_path_factory.mktemp("jax_cache")
  config = shrink_fn(load_config_fn("synthetic_tiny"), tiny_data, total_steps=4)
  config.checkpoint_every_steps = 2
  base_flags = cli_flags(config)

  def start(workdir, *flags, env=None):
    environment = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      PYTHONUNBUFFERED="1",
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
      **(env or {}),
    )
    # Left to the trainer: with the tpu extra installed it must not probe for TPUs on a CPU host.
    environment.pop("JAX_PLATFORMS", None)
    command = [sys.executable, "-m", "trecvit_dist.main", "--config", "configs/synthetic_tiny.py"]
    command += ["--workdir", str(workdir), *base_flags, *flags]
    return subprocess.Popen(
      command,
      cwd=ROOT,
      env=environment,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )

  return start


def run(trainer, workdir, *flags, env=None) -> tuple[int, str]:
  """(exit code, output) of one CLI run."""
  proc = trainer(workdir, *flags, env=env)
  out, _ = proc.communicate(timeout=TIMEOUT_S)
  return proc.returncode, out


def last_line(out: str) -> str:
  return out.rstrip().splitlines()[-1]


def steps_on_disk(workdir) -> list[str]:
  return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def base(trainer, tmp_path_factory):
  """(workdir, output) of the tiny run every fault starts from: steps 1-4, checkpoints 2, 4."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  code, out = run(trainer, workdir)
  assert code == 0, out
  return workdir, out


def copy_of(base, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(base[0], workdir)
  return workdir


# ----------------------------------------------------------------------------- a clean run


def test_a_clean_run_is_quiet_and_summarised(base):
  workdir, out = base
  lines = out.rstrip().splitlines()
  # Ours only: no Orbax/absl INFO, no TensorFlow notice, no TPU probe on this CPU-only host.
  assert not re.search(r"orbax|checkpoint_manager|oneDNN|absl::|E0000|worker hostname", out), out
  saves = [line for line in lines if "Checkpoint step" in line]
  assert len(saves) == 2 and re.search(r"step 2: writing [\d.]+ KiB .*waited \d+ ms", saves[0])
  assert len(lines) < 30, out
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 4 and summary["completed"] and set(summary["eval"]) == {"loss", "top1"}
  assert summary["checkpoint"] == str(workdir / "checkpoints" / "4")
  assert summary["clips_per_sec"] > 0 and summary["wall_time_s"] > summary["train_time_s"] > 0
  assert "trecvit_dist.predict --workdir" in summary["commands"]["predict"]
  assert "trecvit_dist.official export --workdir" in summary["commands"]["export"]
  assert "official export" in out and "summary.json" in last_line(out)
  # The whole log, Orbax's INFO lines included, is in the workdir.
  (log,) = (workdir / "logs").iterdir()
  assert "orbax" in log.read_text() and len(log.read_text().splitlines()) > len(lines)


# ----------------------------------------------------------------------------- inputs


def test_bad_inputs_fail_in_one_line_before_compiling(trainer, base, tmp_path):
  fresh = tmp_path / "fresh"
  code, out = run(trainer, fresh, f"--config.data.path={tmp_path / 'no_data'}")
  assert code == 1 and not fresh.exists(), out  # no empty workdir left behind
  missing = re.escape(str(tmp_path / "no_data"))
  error = rf"Error: data.path='{missing}': Data directory {missing} does not exist.*"
  assert re.fullmatch(error, last_line(out)), out

  code, out = run(trainer, copy_of(base, tmp_path), "--config.data.eval_split=val")
  assert code == 1 and "Compiling" not in out, out
  assert last_line(out).startswith("Error: data.eval_split='val': No shards for split 'val'")
  assert "Traceback" not in out and "Full log and traceback:" in out

  (tmp_path / "a_file").write_text("")
  code, out = run(trainer, tmp_path / "a_file")
  assert code == 1 and "is a file, not a directory" in last_line(out), out

  code, out = run(trainer, fresh, f"--config.init_from={tmp_path / 'missing.npz'}")
  assert code == 1 and "Compiling" not in out, out
  assert re.search(r"init_from=.*missing.npz does not exist", last_line(out))

  code, out = run(trainer, tmp_path / "a_file", "--verbosity=0")  # everything back
  assert code == 1 and "Traceback (most recent call last)" in out, out


# ----------------------------------------------------------------------------- config drift


def test_a_changed_config_is_refused_naming_the_fields(trainer, base, tmp_path):
  workdir = copy_of(base, tmp_path)
  code, out = run(
    trainer,
    workdir,
    "--config.optimizer.learning_rate=0.5",
    "--config.data.num_frames=2",
    "--config.log_every_steps=2",  # does not change what the run computes: passes
  )
  assert code == 1 and "Compiling" not in out, out
  message = out[out.index("Error:") :]
  assert "checkpoint step 4" in message
  assert "optimizer.learning_rate: 0.001 -> 0.5" in message and "data.num_frames: 4 -> 2" in message
  assert "log_every_steps" not in message
  assert message.rstrip().endswith(
    "--config.allow_config_change=data.num_frames,optimizer.learning_rate"
  )
  assert steps_on_disk(workdir) == ["2", "4"]


def test_resume_changes_pass_what_is_free_or_allowed(tiny_config):
  saved = json.loads(json.dumps(tiny_config().to_dict()))
  del saved["data"]["skip_corrupt_records"]  # a field added since the checkpoint: not compared
  config = tiny_config(
    total_steps=10, batch_size=16, checkpoint_every_steps=5, allow_config_change="batch_size"
  )
  config.mesh.fsdp = 2
  assert config_base.resume_changes(saved, config, "ckpt") == [
    "batch_size: 8 -> 16 (allow_config_change)",
    "total_steps: 3 -> 10",
  ]
  config.allow_config_change = "optimizer"  # a whole section
  config.optimizer.b2 = 0.95
  with pytest.raises(config_base.ConfigChangeError, match=r"batch_size: 8 -> 16\n"):
    config_base.resume_changes(saved, config, "ckpt")
  config.allow_config_change = "optimiser.b2"
  with pytest.raises(ValueError, match=r"\['optimiser.b2'\], which are not config fields"):
    config_base.resume_changes(saved, config, "ckpt")


# ----------------------------------------------------------------------------- checkpoints


def flip_bytes(step_dir: pathlib.Path) -> pathlib.Path:
  """Flips 64 bytes in the middle of the largest data file of a saved state."""
  path = max(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  at = len(data) // 2
  data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
  path.write_bytes(bytes(data))
  return path


def test_a_checkpoint_with_flipped_bytes_is_skipped_and_saved_anew(trainer, base, tmp_path):
  workdir = copy_of(base, tmp_path)
  flipped = flip_bytes(workdir / "checkpoints" / "4")
  code, out = run(trainer, workdir)
  assert code == 0, out
  assert re.search(rf"Checkpoint step 4 .* unreadable.*checksums.*{flipped}", out), out
  assert "Resumed from" in out and "at step 2." in out
  assert "Moved the unreadable checkpoint step 4 aside" in out
  assert steps_on_disk(workdir) == ["2", "4", "4.corrupt"]
  # Steps 3 and 4 re-run from step 2 rewrite step 4 exactly as the uninterrupted run did.
  new, reference = (read_state(w, 4) for w in (workdir, base[0]))
  assert new.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(new[key], value, err_msg=key)


def read_state(workdir, step: int) -> dict[str, np.ndarray]:
  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=0, keep=1, read_only=True)
  _, state, _ = ckpt.read(step)
  ckpt.close()
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(state)}


def test_a_state_with_nan_is_never_written(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), every_steps=1, keep=2)
  ckpt.save(1, {"w": np.ones(4, np.float32)}, {"position": 1}, {})
  with pytest.raises(checkpointing.NonFiniteStateError, match=r"step 2 .*\['w'\].*step 1"):
    ckpt.save(2, {"w": np.array([1, np.nan, 0, 0], np.float32)}, {"position": 2}, {})
  ckpt.close()
  assert steps_on_disk(tmp_path / "run") == ["1"]


# ----------------------------------------------------------------------------- data


def corrupt_data(src, dst, first_bad_batch: range) -> tuple[str, int]:
  """A copy of src whose train split has one unreadable record, hit by a batch in
  first_bad_batch (1-based, the tiny run's stream); returns (shard path, that batch)."""
  for shard in range(len(shards.find_shards(src, "train"))):
    for offset in (0.25, 0.4, 0.6, 0.75):
      shutil.rmtree(dst, ignore_errors=True)
      shutil.copytree(src, dst)
      path = shards.find_shards(dst, "train")[shard]
      data = bytearray(pathlib.Path(path).read_bytes())
      at = int(len(data) * offset)
      data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
      pathlib.Path(path).write_bytes(bytes(data))
      clip = dict(num_frames=4, stride=2, image_size=32, seed=0, flip=False)
      it = pipeline.train_iterator(
        str(dst), "train", global_batch_size=8, scale_jitter=(1.0, 1.0), **clip
      )
      batch = 0
      try:
        while batch < first_bad_batch.stop - 1:
          batch += 1
          next(it)
      except pipeline.CorruptRecordError:
        if batch in first_bad_batch:
          return path, batch
      except ValueError:  # the flip hit a block header: the shard does not even open
        pass
      finally:
        it.close()
  raise AssertionError("no offset corrupts a record in the wanted batches")


def test_a_corrupt_record_stops_the_loop_after_the_save_in_flight_or_is_skipped(
  trainer, tiny_data, tmp_path, tb_scalars
):
  path, bad_batch = corrupt_data(tiny_data, tmp_path / "data", range(2, 5))
  workdir = tmp_path / "run"
  flags = [
    f"--config.data.path={tmp_path / 'data'}",
    "--config.checkpoint_every_steps=1",  # the previous step's save is in flight
    f"--config.total_steps={bad_batch + 1}",
  ]
  failure = tmp_path / "failure"
  code, out = run(trainer, workdir, *flags, env={"TRECVIT_FAILURE_FILE": str(failure)})
  assert code == 1, out
  error = rf"Error: Cannot read record \d+ of shard {re.escape(path)} .*"
  assert re.fullmatch(error, last_line(out)), out
  assert "Traceback" not in out
  # The save started just before the error completed: it is the newest step, nothing is torn.
  assert steps_on_disk(workdir) == [str(s) for s in range(1, bad_batch)]
  assert failure.read_text().startswith(f"step={bad_batch - 1} error=")

  code, out = run(trainer, workdir, *flags, "--config.data.skip_corrupt_records=True")
  assert code == 0, out
  assert "Skipping a corrupt record" in out
  skipped = tb_scalars(workdir, "data/skipped_records")
  assert skipped[bad_batch] == 1 and max(skipped) == bad_batch + 1


# ----------------------------------------------------------------------------- SIGTERM


def sigterm_after(proc, pattern: str) -> str:
  """Sends SIGTERM once a line matches; returns the output up to the process's exit."""
  out = ""
  for line in proc.stdout:
    out += line
    if re.search(pattern, line):
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=TIMEOUT_S)
  return out + rest


@pytest.mark.parametrize("moment", ["start-up", "compile"])
def test_sigterm_before_training_exits_42_losing_nothing(trainer, base, tmp_path, moment):
  workdir = copy_of(base, tmp_path)
  proc = trainer(workdir, "--config.total_steps=6")
  pattern = r"Process 0/1" if moment == "start-up" else r"Compiling the train step"
  out = sigterm_after(proc, pattern)
  assert proc.returncode == EXIT_PREEMPTED, out
  assert "exiting with code 42" in last_line(out) and "step 5/" not in out
  assert steps_on_disk(workdir) == ["2", "4"]
