"""The README's Quick start is exactly two commands, and CI runs the second one verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick_start_commands():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1]
  block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_commands_and_ci_runs_the_second():
  commands = quick_start_commands()
  assert len(commands) == 2, commands
  assert "trecvit_dist.main" in commands[0] and "configs/synthetic_tiny.py" in commands[0]
  assert "pytest" in commands[1]
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert commands[1] in ci, "'.ci/run' must call exactly the README's test command"


def test_configs_named_in_the_readme_exist():
  for name in set(re.findall(r"configs/([a-z0-9_]+)\.py", (ROOT / "README.md").read_text())):
    assert (ROOT / "configs" / f"{name}.py").exists(), name
