"""The worker half: run the exact commands tpu.sh would send over ssh in a local shell.

HOME points at a fake worker home holding launch/worker.sh where setup puts it, and the trainer
is a tiny fake module, so this checks end to end that the trainer receives its arguments intact
and that the exit status the supervisor reads is the trainer's.
"""

import json
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"

ENV = {
  "TPU_NAME": "t",
  "ZONE": "z",
  "PROJECT": "p",
  "WORKDIR": "gs://bucket/runs/it's a run",
  "CONFIG": "configs/trecvit_k400.py:B",
}
EXTRA = ['--config.name=it\'s a "test"', "--config.note=$HOME `x`", "two words"]

FAKE_TRAINER = """
import json, os, signal, sys, time
home = os.environ["HOME"]
with open(os.path.join(home, "argv.json"), "w") as f:
  json.dump(sys.argv[1:], f)
print("fake trainer started", flush=True)
if os.environ.get("FAKE_WAIT_FOR_TERM"):
  # Like the real trainer: SIGTERM -> checkpoint -> exit 42.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
  open(os.path.join(home, "ready"), "w").close()  # handler installed: SIGTERM now means 42
  while True:
    time.sleep(0.05)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


def flag_value(argv, flag):
  (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
  return value


@pytest.fixture
def worker(tmp_path, tpu_sh, base_env):
  """A fake worker: remote(subcommand, *flags) runs tpu.sh's ssh command for it locally."""
  home = tmp_path / "home"
  (home / "trecvit_run/src/launch").mkdir(parents=True)
  mods = tmp_path / "mods"
  mods.mkdir()
  # A unique module name: worker.sh's stop kills processes by `-m MODULE`, and other people's
  # processes on this machine must be safe from it.
  module = f"fake_trainer_{uuid.uuid4().hex[:12]}"
  (mods / f"{module}.py").write_text(FAKE_TRAINER)
  env = {
    **base_env,
    "HOME": str(home),
    "PYTHONPATH": str(mods),
    "TRECVIT_PYTHON": sys.executable,
    "TRECVIT_MAIN_MODULE": module,
    "TPU_LOCKFILE": str(tmp_path / "libtpu_lockfile"),
  }

  def install():
    shutil.copy(LAUNCH / "worker.sh", home / "trecvit_run/src/launch/worker.sh")

  def remote(subcommand, *args, extra_env=None, check=True):
    result = tpu_sh(subcommand, "--dry-run", *args, env=ENV)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()[-1:]
    command = flag_value(shlex.split(line), "--command")
    # The worker's login shell runs the command; TPU VM images use bash.
    done = subprocess.run(
      ["bash", "-c", command],
      env={**env, **(extra_env or {})},
      capture_output=True,
      text=True,
      timeout=60,
    )
    if check:
      assert done.returncode == 0, done.stderr
    return done

  def status():
    lines = [x for x in remote("status").stdout.splitlines() if x.startswith("TRECVIT_STATUS")]
    (line,) = lines
    return line.split()[2:]

  def wait_for_exit(timeout=20):
    deadline = time.monotonic() + timeout
    while (state := status())[0] == "running":
      assert time.monotonic() < deadline, "trainer did not exit"
      time.sleep(0.1)
    return state

  ns = type("Worker", (), {})()
  ns.home, ns.module, ns.env, ns.install = home, module, env, install
  ns.remote, ns.status, ns.wait_for_exit = remote, status, wait_for_exit
  ns.run_dir = home / "trecvit_run"
  return ns


def test_status_is_idle_before_setup(worker):
  assert worker.status() == ["idle"]
  worker.install()
  assert worker.status() == ["idle"]


@pytest.mark.parametrize("rc, expected", [(0, "0"), (42, "42"), (3, "3")])
def test_run_passes_args_intact_and_records_exit_status(worker, rc, expected):
  worker.install()
  started = worker.remote("run", "--", *EXTRA, extra_env={"FAKE_RC": str(rc)})
  assert "TRECVIT_STARTED" in started.stdout
  assert worker.wait_for_exit() == ["exited", expected]
  argv = json.loads((worker.home / "argv.json").read_text())
  assert argv == ["--config", ENV["CONFIG"], "--workdir", ENV["WORKDIR"], *EXTRA]
  assert (worker.run_dir / "exit_code").read_text().strip() == expected
  assert "fake trainer started" in (worker.run_dir / "train.log").read_text()
  logs = worker.remote("logs", "--no-follow", "--lines", "50").stdout
  assert "] fake trainer started" in logs  # prefixed with the worker's hostname


def test_stop_checkpoints_then_frees_the_tpu(worker, tmp_path):
  worker.install()
  lockfile = tmp_path / "libtpu_lockfile"
  lockfile.write_text("")
  worker.remote("run", extra_env={"FAKE_WAIT_FOR_TERM": "1"})
  assert worker.status() == ["running"]
  # Under load the fake trainer may not have installed its SIGTERM handler yet: wait for it.
  deadline = time.monotonic() + 30
  while not (worker.home / "ready").exists():
    assert time.monotonic() < deadline, "fake trainer never became ready"
    time.sleep(0.05)
  # A second run must not start a second trainer on a busy TPU.
  again = worker.remote("run", check=False)
  assert again.returncode != 0 and "already running" in again.stderr
  # A stale trainer from a manual run, unknown to the pid files, that ignores SIGTERM.
  stale = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
      "-m",
      worker.module,
    ],
  )
  try:
    stopped = worker.remote("stop", "--grace", "2")
    assert "TRECVIT_STOPPED" in stopped.stdout
    assert worker.status() == ["exited", "42"]  # SIGTERM reached the trainer: checkpoint path
    assert stale.wait(timeout=10) == -signal.SIGKILL
    assert not lockfile.exists()
  finally:
    stale.kill()


def test_killed_trainer_reports_lost(worker):
  worker.install()
  worker.remote("run", extra_env={"FAKE_WAIT_FOR_TERM": "1"})
  wrapper = int((worker.run_dir / "pid").read_text())
  trainer = int((worker.run_dir / "trainer_pid").read_text())
  subprocess.run(["kill", "-KILL", str(wrapper), str(trainer)], check=True)
  deadline = time.monotonic() + 10
  while worker.status() != ["lost"]:
    assert time.monotonic() < deadline
    time.sleep(0.1)


FAKE_UV = """#!/usr/bin/env bash
# Records its arguments; `uv venv ... DIR` makes DIR/bin/python the test's interpreter.
echo "$PWD :: $*" >>"$FAKE_UV_LOG"
if [[ $1 == venv ]]; then
  mkdir -p "${@: -1}/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$FAKE_UV_PYTHON" >"${@: -1}/bin/python"
  chmod +x "${@: -1}/bin/python"
fi
"""


@pytest.mark.parametrize("with_constraints", [True, False])
def test_setup_installs_pinned_versions_from_the_shipped_tree(
  worker, tpu_sh, tmp_path, with_constraints
):
  # The tarball setup would scp: the worker half plus a pinned constraints file.
  tree = tmp_path / "tree"
  (tree / "launch").mkdir(parents=True)
  shutil.copy(LAUNCH / "worker.sh", tree / "launch/worker.sh")
  if with_constraints:
    (tree / "constraints.txt").write_text("jax==0.10.2\n")
  subprocess.run(
    ["tar", "-czf", str(worker.home / "trecvit_src.tar.gz"), "-C", str(tree), "."], check=True
  )
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "uv").write_text(FAKE_UV)
  (bin_dir / "uv").chmod(0o755)
  uv_log = tmp_path / "uv.log"
  result = worker.remote(
    "setup",
    check=False,
    extra_env={
      "PATH": f"{bin_dir}:/usr/bin:/bin",
      "FAKE_UV_LOG": str(uv_log),
      "FAKE_UV_PYTHON": sys.executable,
    },
  )
  if not with_constraints:
    assert result.returncode != 0
    assert "constraints.txt missing" in result.stderr
    assert not uv_log.exists()
    return
  assert result.returncode == 0, result.stderr
  src = worker.run_dir / "src"
  commit = (src / ".commit").read_text().strip()
  assert len(commit) == 40 and f"commit {commit} jax" in result.stdout
  assert (src / "constraints.txt").exists() and not (worker.run_dir / "src.new").exists()
  venv = worker.run_dir / "venv"
  make_venv, install = uv_log.read_text().splitlines()[-2:]
  assert make_venv.endswith(f" :: venv --quiet --allow-existing --python 3.11 {venv}")
  assert (
    install
    == f"{src} :: pip install --quiet --python {venv}/bin/python -c constraints.txt -e .[tpu]"
  )
