"""Shared helpers for the launcher tests: script paths and a clean environment for them."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

# The variables tpu.sh reads; cleared so a developer's own settings cannot leak into a test.
TPU_ENV = (
  "TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION WORKDIR CONFIG SPOT RESERVED QUEUED "
  "MAX_RETRIES BACKOFF MAX_BACKOFF POLL_INTERVAL STOP_GRACE UNREACHABLE_LIMIT WORKER LOG_LINES "
  "FOLLOW GIT_REF PYTHON_VERSION DELETE_WHEN_DONE DRY_RUN GCLOUD"
).split()


@pytest.fixture
def base_env(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in TPU_ENV}
  env["TMPDIR"] = str(tmp_path)
  return env


@pytest.fixture
def tpu_sh(base_env):
  """Runs launch/tpu.sh with the given args and extra environment; returns CompletedProcess."""

  def run(*args, env=None, timeout=60):
    return subprocess.run(
      ["bash", str(LAUNCH / "tpu.sh"), *args],
      env={**base_env, **(env or {})},
      capture_output=True,
      text=True,
      timeout=timeout,
    )

  return run


@pytest.fixture
def python_exe():
  return sys.executable
