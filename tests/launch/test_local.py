"""launch/local.sh: real multi-process runs with a fake trainer module.

TRECVIT_MAIN_MODULE points local.sh at a tiny module written into tmp_path, so these tests prove
the launcher's wiring (flags, coordinator, exit codes, no hangs) without the real trainer.
"""

import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

LOCAL_SH = pathlib.Path(__file__).resolve().parents[2] / "launch" / "local.sh"

# Checks its flags, joins a real jax.distributed cluster of N processes over the coordinator
# local.sh chose, and sums across processes.
DISTRIBUTED_TRAINER = textwrap.dedent(
  """
  import argparse, json, os, sys

  parser = argparse.ArgumentParser()
  parser.add_argument("--config")
  parser.add_argument("--workdir")
  parser.add_argument("--config.name", dest="name")
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  args = parser.parse_args()
  assert args.coordinator_address.startswith("127.0.0.1:"), args.coordinator_address

  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  assert jax.process_index() == args.process_id
  gathered = multihost_utils.process_allgather(np.array([args.process_id + 1.0]))
  result = dict(
    config=args.config,
    workdir=args.workdir,
    name=args.name,
    process_count=jax.process_count(),
    local_devices=jax.local_device_count(),
    global_devices=jax.device_count(),
    sum=float(np.sum(gathered)),
  )
  with open(os.path.join(args.workdir, f"result.{args.process_id}.json"), "w") as f:
    json.dump(result, f)
  print("sum", result["sum"])
  jax.distributed.shutdown()
  """
)

# Exit behaviour chosen per process id through the environment, no jax (fast).
SCRIPTED_TRAINER = textwrap.dedent(
  """
  import os, signal, sys, time

  pid = int(sys.argv[sys.argv.index("--process_id") + 1])
  print("started", pid, flush=True)
  mode = os.environ["FAKE_MODE"]
  if mode == "crash":
    if pid == 1:
      sys.exit(3)
    time.sleep(120)  # like a peer blocked in a collective, forever
  elif mode == "preempted":
    time.sleep(0.5 * pid)  # the processes finish their part of the save at different times
    sys.exit(42)
  elif mode == "checkpoint_on_sigterm":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
    open(os.environ["FAKE_READY"] + f".{pid}", "w").close()
    time.sleep(120)
  """
)


@pytest.fixture
def run_local(tmp_path, base_env):
  mods = tmp_path / "mods"
  mods.mkdir()
  (mods / "fake_distributed_trainer.py").write_text(DISTRIBUTED_TRAINER)
  (mods / "fake_scripted_trainer.py").write_text(SCRIPTED_TRAINER)
  env = {
    **base_env,
    "PYTHON": sys.executable,
    "PYTHONPATH": str(mods),
    "JAX_PLATFORMS": "cpu",
    # conftest gives the test process 8 devices; each trainer process gets 2.
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "LOCAL_GRACE": "5",
  }

  def start(n, *args, module, extra_env=None):
    return subprocess.Popen(
      ["bash", str(LOCAL_SH), str(n), *args],
      env={**env, "TRECVIT_MAIN_MODULE": module, **(extra_env or {})},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  return start


@pytest.mark.slow
def test_two_processes_share_one_coordinator(run_local, tmp_path):
  proc = run_local(
    2,
    "--config",
    "configs/synthetic_tiny.py:smoke",
    "--workdir",
    str(tmp_path),
    "--config.name=a 'quoted' name",
    module="fake_distributed_trainer",
  )
  out, err = proc.communicate(timeout=300)  # two jax starts and a gloo handshake, under load
  assert proc.returncode == 0, out + err
  for i in range(2):
    result = (tmp_path / f"result.{i}.json").read_text()
    assert '"sum": 3.0' in result  # 1 + 2: a real cross-process reduction
    assert '"process_count": 2' in result
    assert '"local_devices": 2' in result and '"global_devices": 4' in result
    assert "configs/synthetic_tiny.py:smoke" in result and "a 'quoted' name" in result
    # Output lines carry the process id. (Not "[i] sum 3.0" verbatim: gloo's unbuffered C++
    # stderr can land mid-line in the same process's stream.)
    assert out.count("sum 3.0") == 2 and f"[{i}] " in out


def test_a_failing_process_stops_the_others(run_local):
  start = time.monotonic()
  proc = run_local(2, module="fake_scripted_trainer", extra_env={"FAKE_MODE": "crash"})
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 3, out + err
  assert time.monotonic() - start < 30  # did not wait for the "hung" process 0
  assert "process 1 exited with status 3" in err


def test_all_preempted_exits_42(run_local):
  proc = run_local(3, module="fake_scripted_trainer", extra_env={"FAKE_MODE": "preempted"})
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 42, out + err
  assert "status 143" not in err  # the later ones were not stopped: they exited 42 themselves


def test_sigterm_is_forwarded_so_the_trainer_can_checkpoint(run_local, tmp_path):
  ready = tmp_path / "ready"
  proc = run_local(
    2,
    module="fake_scripted_trainer",
    extra_env={"FAKE_MODE": "checkpoint_on_sigterm", "FAKE_READY": str(ready)},
  )
  deadline = time.monotonic() + 30
  while not all(pathlib.Path(f"{ready}.{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline and proc.poll() is None
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 42, out + err


def test_usage_errors(run_local):
  for n in ("0", "two"):
    proc = run_local(n, module="fake_scripted_trainer")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "positive integer" in err
