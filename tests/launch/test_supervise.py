"""tpu.sh supervise against a fake gcloud that simulates a slice and its trainer.

The fake keeps the world in a JSON state file: whether the slice exists, forced create failures,
and a script of trainer runs (each: how many status polls it keeps running, then an exit code,
or a preemption of the slice). It logs every call, so the tests check what was done, in order.
"""

import json
import re
import sys
import textwrap

import pytest

FAKE_GCLOUD = textwrap.dedent(
  """
  import json, os, sys

  state_path = os.environ["FAKE_GCLOUD_STATE"]
  with open(state_path) as f:
    s = json.load(f)
  args = sys.argv[1:]
  with open(os.environ["FAKE_GCLOUD_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")

  def save():
    with open(state_path, "w") as f:
      json.dump(s, f)

  def fail(message, code=1):
    save()
    print(message, file=sys.stderr)
    sys.exit(code)

  def statuses():
    run = s["current"]
    if run is None:
      return ["idle", "idle"]
    if run["polls"] > 0 or run.get("preempt"):
      run["polls"] -= 1
      return ["running", "running"]
    if run.get("stopped"):
      return ["exited 143", "exited 143"]
    rc = run["rc"]
    if rc == 0:
      s["completed"] = True
      return ["exited 0", "exited 0"]
    if rc == 42:
      return ["exited 42", "exited 42"]
    detail = f" {run['failure']}" if run.get("failure") else ""  # worker.sh's failure record
    return [f"exited {rc}{detail}", "running"]  # the peer hangs in a collective

  if args[:2] == ["storage", "ls"]:
    if not s["completed"]:
      fail("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
    print(args[2])
  elif args[:2] == ["compute", "tpus"]:
    kind, verb = args[2], args[3]
    if verb == "describe":
      if s["slice"] is None:
        fail(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: {args[4]} not found")
      run = s["current"]
      if run and run.get("preempt") and run["polls"] <= 0:
        s["slice"] = "PREEMPTED"
      if kind == "queued-resources":
        print({"READY": "ACTIVE", "PREEMPTED": "SUSPENDED"}[s["slice"]])
      else:
        print(s["slice"])
    elif verb == "create":
      if s["create_failures"] > 0:
        s["create_failures"] -= 1
        fail("ERROR: (gcloud.compute.tpus.create) There is no more capacity in the zone")
      s["slice"], s["current"] = "READY", None
    elif verb == "delete":
      s["slice"], s["current"] = None, None
    elif verb == "ssh":
      (command,) = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
      if s["slice"] != "READY":
        fail("ssh: connect to host: Connection refused", 255)
      if s["ssh_down"] > 0 and "worker.sh status" in command:
        s["ssh_down"] -= 1
        fail("ssh: connect to host w1: Connection timed out", 255)
      if "worker.sh setup" in command:
        print("TRECVIT_SETUP w0 commit x")
      elif "worker.sh start" in command:
        s["current"] = s["runs"].pop(0)
        s["starts"].append(command)
      elif "worker.sh status" in command:
        for i, st in enumerate(statuses()):
          print(f"TRECVIT_STATUS w{i} {st}")
      elif "worker.sh stop" in command:
        if s["current"] is not None:
          s["current"]["stopped"] = True
      elif "worker.sh logs" in command:
        print("[w0] Traceback: boom")
  save()
  """
)


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  gcloud.chmod(0o755)
  state_path = tmp_path / "state.json"
  calls_path = tmp_path / "calls.jsonl"

  def setup(create_failures=0, runs=(), completed=False, slice=None, current=None, ssh_down=0):
    state = {
      "ssh_down": ssh_down,
      "slice": slice,
      "create_failures": create_failures,
      "runs": [dict(r) for r in runs],
      "current": current,
      "completed": completed,
      "starts": [],
    }
    state_path.write_text(json.dumps(state))
    return {
      "PATH": f"{bin_dir}:/usr/bin:/bin",
      "FAKE_GCLOUD_STATE": str(state_path),
      "FAKE_GCLOUD_CALLS": str(calls_path),
    }

  def calls():
    if not calls_path.exists():
      return []
    return [json.loads(line) for line in calls_path.read_text().splitlines()]

  def state():
    return json.loads(state_path.read_text())

  ns = type("FakeGcloud", (), {})()
  ns.setup, ns.calls, ns.state = setup, calls, state
  return ns


ENV = {
  "TPU_NAME": "trecvit-b",
  "ZONE": "us-east5-a",
  "PROJECT": "my-project",
  "ACCELERATOR_TYPE": "v5p-128",
  "WORKDIR": "gs://my-bucket/runs/k400_b",
  "CONFIG": "configs/trecvit_k400.py:B",
  "SPOT": "1",
}
FAST = ["--backoff", "0.01", "--max-backoff", "0.03", "--poll", "0", "--grace", "0"]


def actions(calls):
  """The calls that change something, as short names, in order."""
  names = []
  for argv in calls:
    if argv[:2] != ["compute", "tpus"]:
      continue
    verb = argv[3]
    if verb in ("create", "delete"):
      names.append(verb)
    elif verb == "ssh":
      command = next(a for a in argv if a.startswith("--command="))
      for word in ("setup", "start", "stop"):
        if f"worker.sh {word}" in command:
          names.append(word)
  return names


def retry_delays(stderr):
  return [float(x) for x in re.findall(r"retry \d+/\d+ in ([0-9.]+)s", stderr)]


@pytest.mark.parametrize("queued", ["1", "0"])
def test_recovers_from_everything_then_stops_on_completion(tpu_sh, fake_gcloud, queued):
  env = fake_gcloud.setup(
    create_failures=1,
    runs=[
      {"polls": 1, "preempt": True},  # the slice is preempted under a running trainer
      {"polls": 0, "rc": 42},  # the trainer reports preemption itself
      {"polls": 1, "rc": 1},  # a crash on one worker (the other hangs)
      {"polls": 1, "rc": 0},  # completes
    ],
  )
  result = tpu_sh(
    "supervise", *FAST, "--max-retries", "10", "--", "--config.name=a b",
    env={**ENV, **env, "QUEUED": queued},
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert actions(fake_gcloud.calls()) == [
    "create",  # fails: no capacity
    "create",
    "setup",
    "start",
    "delete",  # slice PREEMPTED / SUSPENDED
    "create",
    "setup",
    "start",
    "delete",  # trainer exit 42
    "create",
    "setup",
    "start",
    "stop",  # trainer exit 1: stop the hung peer, re-run on the same slice without setup
    "start",
  ]
  # Bounded exponential backoff: 0.01, 0.02, then capped at 0.03.
  assert retry_delays(result.stderr) == [0.01, 0.02, 0.03, 0.03]
  # Every decision is logged with a timestamp.
  assert re.search(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ tpu.sh: supervise: .*preempted", result.stderr, re.M
  )
  assert "run completed" in result.stderr
  # Stops on completion: nothing after the status poll that saw exit 0 everywhere.
  last = fake_gcloud.calls()[-1]
  assert last[3] == "ssh" and "worker.sh status" in " ".join(last)
  starts = fake_gcloud.state()["starts"]
  assert all("configs/trecvit_k400.py:B" in c and "'--config.name=a b'" in c for c in starts)
  create = next(c for c in fake_gcloud.calls() if c[:2] == ["compute", "tpus"] and c[3] == "create")
  assert "--spot" in create


def test_gives_up_after_max_retries(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(create_failures=100)
  result = tpu_sh("supervise", *FAST, "--max-retries", "3", env={**ENV, **env})
  assert result.returncode == 1
  assert actions(fake_gcloud.calls()) == ["create"] * 4  # the first try + 3 retries
  assert "giving up after 3 retries" in result.stderr


def test_trainer_failures_count_toward_retries(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(runs=[{"polls": 0, "rc": 7}] * 5)
  result = tpu_sh("supervise", *FAST, "--max-retries", "2", env={**ENV, **env})
  assert result.returncode == 1
  assert actions(fake_gcloud.calls()) == [
    "create", "setup", "start", "stop", "start", "stop", "start", "stop",
  ]  # fmt: skip
  assert "w0:exit=7" in result.stderr
  assert "[w0] Traceback: boom" in result.stderr  # the failing worker's log tail


def test_the_same_failure_twice_stops_without_burning_retries(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(
    runs=[
      {"polls": 0, "rc": 1, "failure": "step=40 error=aaa"},
      {"polls": 0, "rc": 1, "failure": "step=80 error=aaa"},  # later: progress was made
      {"polls": 0, "rc": 1, "failure": "step=80 error=bbb"},  # another error
      {"polls": 0, "rc": 1, "failure": "step=80 error=aaa"},  # seen before: deterministic
      {"polls": 0, "rc": 0},
    ]
  )
  result = tpu_sh("supervise", *FAST, "--max-retries", "10", env={**ENV, **env})
  assert result.returncode == 1, result.stderr
  assert actions(fake_gcloud.calls()).count("start") == 4
  assert "w0:exit=1@step=80,error=aaa" in result.stderr
  assert "failed the same way twice (step=80,error=aaa)" in result.stderr
  assert "not retrying" in result.stderr


def test_already_completed_run_does_nothing(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(completed=True)
  result = tpu_sh("supervise", *FAST, env={**ENV, **env})
  assert result.returncode == 0, result.stderr
  assert [c[:2] for c in fake_gcloud.calls()] == [["storage", "ls"]]


def test_delete_when_done(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(runs=[{"polls": 0, "rc": 0}])
  result = tpu_sh("supervise", *FAST, "--delete-when-done", env={**ENV, **env})
  assert result.returncode == 0, result.stderr
  assert actions(fake_gcloud.calls()) == ["create", "setup", "start", "delete"]
  assert fake_gcloud.state()["slice"] is None


def test_a_restarted_supervisor_adopts_a_running_trainer(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(slice="READY", current={"polls": 2, "rc": 0})
  result = tpu_sh("supervise", *FAST, env={**ENV, **env})
  assert result.returncode == 0, result.stderr
  assert actions(fake_gcloud.calls()) == []
  assert "adopting the trainer" in result.stderr


def test_exit_codes_from_before_the_supervisor_started_are_not_trusted(tpu_sh, fake_gcloud):
  # A finished run of some other workdir on this slice must not count as this run's completion:
  # only WORKDIR/COMPLETED could say that, and it is absent, so the run is (re)started.
  env = fake_gcloud.setup(
    slice="READY", current={"polls": 0, "rc": 0}, runs=[{"polls": 0, "rc": 0}]
  )
  result = tpu_sh("supervise", *FAST, env={**ENV, **env})
  assert result.returncode == 0, result.stderr
  assert actions(fake_gcloud.calls()) == ["setup", "start"]


def test_workers_unreachable_for_too_long_get_a_new_slice(tpu_sh, fake_gcloud):
  env = fake_gcloud.setup(
    slice="READY", current={"polls": 5, "rc": 0}, ssh_down=2, runs=[{"polls": 0, "rc": 0}]
  )
  result = tpu_sh("supervise", *FAST, env={**ENV, **env, "UNREACHABLE_LIMIT": "2"})
  assert result.returncode == 0, result.stderr
  assert actions(fake_gcloud.calls()) == ["delete", "create", "setup", "start"]
  assert "workers unreachable (1/2): ssh: connect to host w1" in result.stderr
