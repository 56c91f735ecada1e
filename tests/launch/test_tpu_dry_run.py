"""tpu.sh --dry-run: the gcloud commands each subcommand would run, and their quoting."""

import shlex

import pytest

ENV = {
  "TPU_NAME": "trecvit-b",
  "ZONE": "us-east5-a",
  "PROJECT": "my-project",
  "ACCELERATOR_TYPE": "v5p-128",
  "WORKDIR": "gs://my-bucket/runs/k400_b",
  "CONFIG": "configs/trecvit_k400.py:B",
}
# Overrides that break naive quoting: spaces, both quote kinds, $ and a backslash.
EXTRA = [
  "--config.data.path=gs://my-bucket/data/k400",
  '--config.name=it\'s a "test" run',
  "--config.note=$HOME `x` \\n",
]
REMOTE_WORKER = "~/trecvit_run/src/launch/worker.sh"


def dry_run_lines(stdout: str) -> list[list[str]]:
  """Parses --dry-run output: one shell-quoted command per line."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def flag_value(argv: list[str], flag: str) -> str:
  """The value of --flag=VALUE in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
  assert len(values) == 1, (flag, argv)
  return values[0]


def gcloud_commands(result):
  assert result.returncode == 0, result.stderr
  lines = dry_run_lines(result.stdout)
  assert lines, "dry run printed nothing"
  return [argv for argv in lines if argv[0] == "gcloud"]


def check_location(argv):
  assert flag_value(argv, "--zone") == ENV["ZONE"]
  assert flag_value(argv, "--project") == ENV["PROJECT"]


def remote_command(argv):
  """The command a `gcloud ... ssh --worker=all` line runs on every worker."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert argv[5] == ENV["TPU_NAME"]
  assert flag_value(argv, "--worker") == "all"
  check_location(argv)
  return flag_value(argv, "--command")


@pytest.mark.parametrize(
  "flags, env, expected",
  [
    ([], {}, []),
    (["--spot"], {}, ["--spot"]),
    ([], {"SPOT": "1"}, ["--spot"]),
    (["--no-spot"], {"SPOT": "1"}, []),  # flags override the environment
    (["--reserved"], {}, ["--reserved"]),
  ],
)
def test_create_queued_resource(tpu_sh, flags, env, expected):
  (argv,) = gcloud_commands(tpu_sh("create", "--dry-run", *flags, env={**ENV, **env}))
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "trecvit-b"]
  check_location(argv)
  assert flag_value(argv, "--node-id") == "trecvit-b"
  assert flag_value(argv, "--accelerator-type") == "v5p-128"
  assert flag_value(argv, "--runtime-version") == "v2-alpha-tpuv5"
  assert [a for a in argv if a in ("--spot", "--reserved")] == expected


def test_create_plain_tpu_vm_with_flags_over_env(tpu_sh):
  (argv,) = gcloud_commands(
    tpu_sh(
      "create",
      "--dry-run",
      "--no-queued",
      "--zone",
      "europe-west4-b",
      "--accelerator-type=v6e-64",
      "--runtime-version",
      "v2-alpha-tpuv6e-custom",
      "--spot",
      env=ENV,
    )
  )
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "trecvit-b"]
  assert flag_value(argv, "--zone") == "europe-west4-b"
  assert flag_value(argv, "--project") == "my-project"
  assert flag_value(argv, "--accelerator-type") == "v6e-64"
  assert flag_value(argv, "--version") == "v2-alpha-tpuv6e-custom"
  assert "--spot" in argv


def test_setup_ships_the_commit_and_installs_on_every_worker(tpu_sh):
  result = tpu_sh("setup", "--dry-run", env=ENV)
  assert result.returncode == 0, result.stderr
  lines = dry_run_lines(result.stdout)
  archive, scp, ssh = lines
  assert archive[0] == "git" and "archive" in archive
  commit = archive[-1]
  assert len(commit) == 40
  tarball = flag_value(archive, "--output")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "trecvit-b:trecvit_src.tar.gz"]
  assert flag_value(scp, "--worker") == "all"
  check_location(scp)
  remote = remote_command(ssh)
  assert "tar -xzf ~/trecvit_src.tar.gz" in remote
  assert remote.endswith(f"launch/worker.sh setup {commit} 3.11")


def test_run_quotes_config_and_overrides_intact(tpu_sh):
  (argv,) = gcloud_commands(tpu_sh("run", "--dry-run", "--", *EXTRA, env=ENV))
  remote = shlex.split(remote_command(argv))
  assert remote == [
    "bash",
    REMOTE_WORKER,
    "start",
    "--config",
    "configs/trecvit_k400.py:B",
    "--workdir",
    "gs://my-bucket/runs/k400_b",
    *EXTRA,
  ]


def test_run_flags_override_env(tpu_sh):
  (argv,) = gcloud_commands(
    tpu_sh(
      "run",
      "--dry-run",
      "--config=configs/trecvit_ssv2.py:L",
      "--workdir",
      "gs://other/runs/x",
      env=ENV,
    )
  )
  remote = shlex.split(remote_command(argv))
  assert remote[3:] == ["--config", "configs/trecvit_ssv2.py:L", "--workdir", "gs://other/runs/x"]


def test_stop_logs_delete(tpu_sh):
  (stop,) = gcloud_commands(tpu_sh("stop", "--dry-run", "--grace", "30", env=ENV))
  remote = remote_command(stop)
  assert f"bash {REMOTE_WORKER} stop 30" in remote
  assert "/tmp/libtpu_lockfile" in remote  # removed even where setup never ran

  (logs,) = gcloud_commands(tpu_sh("logs", "--dry-run", env=ENV))
  assert shlex.split(remote_command(logs)) == ["bash", REMOTE_WORKER, "logs", "100", "follow"]
  (logs,) = gcloud_commands(
    tpu_sh("logs", "--dry-run", "--worker=3", "--lines", "20", "--no-follow", env=ENV)
  )
  assert flag_value(logs, "--worker") == "3"
  assert shlex.split(flag_value(logs, "--command")) == ["bash", REMOTE_WORKER, "logs", "20"]

  (delete,) = gcloud_commands(tpu_sh("delete", "--dry-run", env=ENV))
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "trecvit-b"]
  assert "--force" in delete and "--quiet" in delete
  check_location(delete)
  (delete,) = gcloud_commands(tpu_sh("delete", "--dry-run", env={**ENV, "QUEUED": "0"}))
  assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "trecvit-b"]


def test_supervise_dry_run_shows_one_pass(tpu_sh):
  commands = gcloud_commands(tpu_sh("supervise", "--dry-run", "--spot", "--", *EXTRA, env=ENV))
  verbs = [" ".join(argv[1:5]) for argv in commands]
  assert verbs[0].startswith("storage ls")
  assert commands[0][-1] == "gs://my-bucket/runs/k400_b/COMPLETED"
  assert "compute tpus queued-resources describe" in verbs
  assert "compute tpus queued-resources create" in verbs
  assert "compute tpus tpu-vm scp" in verbs
  assert "compute tpus queued-resources delete" in verbs
  remotes = [flag_value(a, "--command") for a in commands if "--command" in " ".join(a)]
  assert any(shlex.split(r)[2:3] == ["start"] and shlex.split(r)[-3:] == EXTRA for r in remotes)
  assert any("worker.sh status" in r for r in remotes)
  for argv in commands[1:]:
    check_location(argv)


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["create"], {"ZONE": ""}, "ZONE"),
    (["create"], {"PROJECT": ""}, "PROJECT"),
    (["run"], {"CONFIG": ""}, "CONFIG"),
    (["run"], {"WORKDIR": "/local/dir"}, "gs://"),
    (["create", "--spot", "--reserved"], {}, "exclusive"),
    (["create", "--accelerator-type", "tpu9-8"], {}, "--runtime-version"),
    (["create", "--bogus"], {}, "unknown flag"),
    (["frobnicate"], {}, "unknown command"),
    (["supervise", "--backoff", "soon"], {}, "BACKOFF"),
  ],
)
def test_bad_invocations_fail_with_a_message(tpu_sh, args, env, message):
  result = tpu_sh(*args, "--dry-run", env={**ENV, **env})
  assert result.returncode == 2, result.stdout
  assert message in result.stderr


def test_help_documents_everything(tpu_sh):
  result = tpu_sh("--help")
  assert result.returncode == 0
  for word in [
    "create",
    "setup",
    "run",
    "supervise",
    "logs",
    "stop",
    "delete",
    "--dry-run",
    "v5p-128",
    "42",
    *("TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION WORKDIR CONFIG SPOT".split()),
  ]:
    assert word in result.stdout, word
  assert tpu_sh().returncode == 2
