"""Tasks, one module each, picked by `--config.task` (see tasks/task.py for what a task owns).

Adding a task: a module defining a `Task` subclass as `TASK` and one line in TASKS (or
`register(TaskClass)` at run time, e.g. from a test).
"""

from __future__ import annotations

import importlib

from trecvit_dist.tasks.task import Task

# name -> the module that defines TASK (imported on first use).
TASKS: dict[str, str] = {
  "classification": "trecvit_dist.tasks.classification",
  "mae": "trecvit_dist.tasks.mae",
  "memorisation": "trecvit_dist.tasks.memorisation",
  "point_tracking": "trecvit_dist.tasks.point_tracking",
  "readout": "trecvit_dist.tasks.readout",
}
_registered: dict[str, type[Task]] = {}


def register(task: type[Task]) -> None:
  """Makes config.task=task.name pick `task` (replaces an earlier one of that name)."""
  _registered[task.name] = task


def get(name: str) -> type[Task]:
  """The task class registered as `name`; an unknown name lists the known ones."""
  if name in _registered:
    return _registered[name]
  if name not in TASKS:
    known = sorted(set(TASKS) | set(_registered))
    raise ValueError(f"Unknown config.task {name!r}; choose one of {known}.")
  task = importlib.import_module(TASKS[name]).TASK
  _registered[name] = task
  return task


def names() -> list[str]:
  return sorted(set(TASKS) | set(_registered))


__all__ = ["TASKS", "Task", "get", "names", "register"]
