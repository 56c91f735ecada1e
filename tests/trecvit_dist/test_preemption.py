"""Preemption and resume with real processes and real signals.

`python -m trecvit_dist.main` (1 process x 8 devices) and `launch/local.sh 2` (2 processes x 4
devices) are started on the shrunk synthetic_tiny config, sent SIGTERM once a step is logged
(exit 42 and a checkpoint expected), resumed, killed with SIGKILL between checkpoints, and
resumed again to the end. The per-step losses (TensorBoard events) and the final checkpoint
must equal an uninterrupted run's bit for bit. Also: a save torn by SIGKILL, and the
coordination-service barrier naming the processes that did not arrive.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from trecvit_dist import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # per launch; a healthy tiny run takes well under a minute
STEP_RE = re.compile(r"step (\d+)/\d+ loss")


def cli_flags(config) -> list[str]:
  """--config.FIELD=VALUE for every set field: the subprocess runs exactly this config."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return [f"--config.{k}={v}" for k, v in sorted(flat.items()) if v is not None]


def launch(config, workdir, processes: int, log: pathlib.Path, cache: pathlib.Path):
  """Starts the trainer (local.sh for several processes); its output goes to `log`."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHON=sys.executable,
    PYTHONUNBUFFERED="1",
    LOCAL_GRACE="10",
    # Later launches load the executables the first one compiled (same programs, less time).
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  args = ["--config", "configs/synthetic_tiny.py", "--workdir", str(workdir), *cli_flags(config)]
  if processes == 1:
    command = [sys.executable, "-m", "trecvit_dist.main", *args]
  else:
    command = [str(ROOT / "launch" / "local.sh"), str(processes), *args]
  with open(log, "w") as out:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(proc, log: pathlib.Path, pattern: str, timeout_s: float = TIMEOUT_S) -> re.Match:
  """The first match of `pattern` in the log, waiting for it to be written."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if match := re.search(pattern, log.read_text()):
      return match
    if proc.poll() is not None:
      if match := re.search(pattern, log.read_text()):
        return match
      pytest.fail(f"exited {proc.returncode} before /{pattern}/:\n{tail(log)}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no /{pattern}/ within {timeout_s}s:\n{tail(log)}")


def finish(proc, log: pathlib.Path) -> int:
  try:
    return proc.wait(TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"did not exit within {TIMEOUT_S}s:\n{tail(log)}")


def tail(log: pathlib.Path, lines: int = 60) -> str:
  return "\n".join(log.read_text().splitlines()[-lines:])


def trainer_pids(proc, processes: int) -> list[int]:
  """The trainer processes: the launched one, or local.sh's python children."""
  if processes == 1:
    return [proc.pid]
  children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
  pids = [int(p) for p in children if "trecvit_dist.main" in _cmdline(int(p))]
  assert len(pids) == processes, pids
  return pids


def _cmdline(pid: int) -> str:
  try:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
  except OSError:
    return ""


def complete_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def losses(workdir) -> dict[int, list[np.float32]]:
  """Every train/loss value in the workdir's TensorBoard events (all runs), by step."""
  out = {}
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        if value.tag == "train/loss":
          loss = np.float32(tensor_util.make_ndarray(value.tensor))
          out.setdefault(event.step, []).append(loss)
  return out


def assert_same_checkpoint(workdir, reference, step):
  ckpt, ref = (
    checkpointing.Checkpointer(str(w), every_steps=0, keep=1, read_only=True)
    for w in (workdir, reference)
  )
  got_step, state, data_state = ckpt.read(step)
  _, ref_state, ref_data_state = ref.read(step)
  assert data_state == ref_data_state
  flat, ref_flat = (
    {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(s)}
    for s in (state, ref_state)
  )
  assert any("params" in k for k in flat) and any("opt_state" in k for k in flat)
  assert flat.keys() == ref_flat.keys()
  for key in ref_flat:
    np.testing.assert_array_equal(flat[key], ref_flat[key], err_msg=key)  # bit for bit
  ckpt.close()
  ref.close()


# ----------------------------------------------------------------------------- bit-exact resume


@pytest.mark.slow
@pytest.mark.parametrize(
  "processes, total_steps, every, sigterm_after",
  [(1, 30, 10, 5), (2, 12, 4, 2)],
  ids=["1x8", "2x4"],
)
def test_sigterm_and_kill9_resume_bit_exactly(
  processes, total_steps, every, sigterm_after, tiny_config, tmp_path
):
  overrides = {"total_steps": total_steps, "checkpoint_every_steps": every, "log_every_steps": 1}
  config = tiny_config(**overrides)
  cache = tmp_path / "jax_cache"

  # Uninterrupted reference.
  reference = tmp_path / "reference"
  proc = launch(config, reference, processes, tmp_path / "reference.log", cache)
  assert finish(proc, tmp_path / "reference.log") == 0, tail(tmp_path / "reference.log")
  ref_losses = losses(reference)
  assert sorted(ref_losses) == list(range(1, total_steps + 1))

  # 1. SIGTERM once a step is logged: every process stops at one step, saves, exits 42. With
  # two processes only the last one is signalled; the others learn it from the coordinator.
  workdir = tmp_path / "run"
  log = tmp_path / "1_sigterm.log"
  proc = launch(config, workdir, processes, log, cache)
  wait_for(proc, log, rf"step {sigterm_after}/")
  os.kill(trainer_pids(proc, processes)[-1], signal.SIGTERM)
  assert finish(proc, log) == checkpointing.EXIT_PREEMPTED, tail(log)
  saved = re.findall(r"Preempted: saved step (\d+)", log.read_text())
  assert len(saved) == processes and len(set(saved)) == 1, saved  # all at the same step
  stopped = int(saved[0])
  assert sigterm_after <= stopped < total_steps
  assert stopped in complete_steps(workdir)

  # 2. The same command resumes there; SIGKILL once the next periodic checkpoint is complete.
  log = tmp_path / "2_kill9.log"
  proc = launch(config, workdir, processes, log, cache)
  assert int(wait_for(proc, log, r"Resumed from .* at step (\d+)").group(1)) == stopped
  next_checkpoint = (stopped // every + 1) * every
  deadline = time.monotonic() + TIMEOUT_S
  while next_checkpoint not in complete_steps(workdir) and time.monotonic() < deadline:
    assert proc.poll() is None, tail(log)
    time.sleep(0.01)
  for pid in trainer_pids(proc, processes):
    os.kill(pid, signal.SIGKILL)
  finish(proc, log)
  assert "Finished at step" not in log.read_text()
  last_complete = complete_steps(workdir)[-1]
  assert next_checkpoint <= last_complete < total_steps, "killed too late to test anything"

  # 3. Resumes from the newest complete checkpoint and runs to the end.
  log = tmp_path / "3_resume.log"
  proc = launch(config, workdir, processes, log, cache)
  assert finish(proc, log) == 0, tail(log)
  resumed = int(wait_for(proc, log, r"Resumed from .* at step (\d+)").group(1))
  assert resumed == last_complete

  # Every loss logged by any of the runs (steps re-run after SIGKILL included) and the final
  # checkpoint (params, optimizer state, step, RNG, iterator state) equal the reference's.
  got = losses(workdir)
  assert set(range(1, stopped + 1)) | set(range(resumed + 1, total_steps + 1)) <= set(got)
  for step, values in sorted(got.items()):
    for value in values:
      assert value == ref_losses[step][0], (step, value, ref_losses[step][0])
  assert_same_checkpoint(workdir, reference, total_steps)


# ----------------------------------------------------------------------------- torn save


TORN_SAVE = """
import jax, numpy as np, sys, time
from trecvit_dist import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1], every_steps=1, keep=5)
ckpt.save(1, {"w": jax.numpy.ones((64, 64))}, {"position": 1}, {})
ckpt.wait()
print("saved 1", flush=True)
big = np.random.default_rng(0).normal(size=(64, 2**20)).astype(np.float32)  # 256 MiB
ckpt.save(2, {"w": jax.device_put(big)}, {"position": 2}, {})
time.sleep(600)
"""


@pytest.mark.slow
def test_save_killed_midway_is_skipped_and_named(tmp_path, caplog):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  log = tmp_path / "torn.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [sys.executable, "-c", TORN_SAVE, str(workdir)],
      cwd=ROOT,
      env=env,
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  wait_for(proc, log, "saved 1")
  torn = workdir / "checkpoints" / "2.orbax-checkpoint-tmp"
  deadline = time.monotonic() + TIMEOUT_S
  while not torn.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
  proc.kill()  # SIGKILL while step 2 is being written
  proc.wait()
  assert torn.exists() and not (workdir / "checkpoints" / "2").exists(), tail(log)

  ckpt = checkpointing.Checkpointer(str(workdir), every_steps=1, keep=5)
  abstract = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=_one_device())}
  with caplog.at_level("WARNING"):
    step, state, data_state = ckpt.restore_latest(abstract)
  assert (step, data_state) == (1, {"position": 1})
  np.testing.assert_array_equal(state["w"], np.ones((64, 64), np.float32))
  assert any(
    "incomplete checkpoint" in r.getMessage() and str(torn) in r.getMessage()
    for r in caplog.records
  )
  ckpt.close()
  assert not torn.exists()  # removed once reported


def _one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


# ----------------------------------------------------------------------------- agreement


AGREE = """
import sys, time
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from trecvit_dist import checkpointing
me = jax.process_index()
print("values", checkpointing.agree("hello", f"p{me}", timeout_s=60), flush=True)
ckpt = checkpointing.Checkpointer(sys.argv[3], every_steps=1, keep=2, barrier_timeout_s=60)
mesh = jax.make_mesh((2,), ("x",))  # one device per process
sharded = jax.make_array_from_process_local_data(
  jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")), np.arange(4.0) + 4 * me
)
try:
  ckpt.save(1, {"w": sharded}, {"next_position": 8 * (1 + me)}, {})  # iterator states differ
except checkpointing.CheckpointError as e:
  print("save refused:", e, flush=True)
print("saved 2:", ckpt.save(2, {"w": sharded}, {"next_position": 16}, {}), flush=True)
ckpt.wait()
if me == 0:
  try:
    checkpointing.agree("save_7", "x", timeout_s=3)
  except checkpointing.CheckpointError as e:
    print("timeout:", e, flush=True)
else:
  time.sleep(8)  # alive, but never arrives
print("done", flush=True)
"""


@pytest.mark.slow
def test_two_processes_write_their_shards_agree_or_fail_naming_the_missing(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as out:
      command = [sys.executable, "-c", AGREE, f"127.0.0.1:{port}", str(i), str(tmp_path / "run")]
      procs.append(
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
      )
  for proc, log in zip(procs, logs, strict=True):
    finish(proc, log)
  out0, out1 = (log.read_text() for log in logs)
  assert "values ['p0', 'p1']" in out0 and "values ['p0', 'p1']" in out1, out0 + out1
  assert "save refused: Processes disagree on the checkpoint of step 1" in out0, out0
  assert "save refused: Processes disagree on the checkpoint of step 1" in out1, out1
  assert "timeout: Processes [1] of 2 did not reach 'save_7' within 3s" in out0, out0
  assert "done" in out0 and "done" in out1
  # Each process wrote the shard it holds; together they are the global array.
  assert "saved 2: True" in out0 and "saved 2: True" in out1
  checkpoints = tmp_path / "run" / "checkpoints"
  assert [p.name for p in checkpoints.iterdir()] == ["2"]
  state_dir = checkpoints / "2" / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in state_dir.iterdir()}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), every_steps=0, keep=1, read_only=True)
  step, state, data_state = ckpt.read()
  assert (step, data_state) == (2, {"next_position": 16})
  np.testing.assert_array_equal(state["w"], np.arange(8.0))
  ckpt.close()
