"""The end of a run: WORKDIR/summary.json and the closing lines (final eval, speed, where the
checkpoint and the TensorBoard events are, and the commands that use the trained workdir)."""

from __future__ import annotations

import json
import logging
from typing import Any

from etils import epath

from trecvit_dist import experiment


def summarise(
  config, exp: experiment.Experiment, workdir: str, checkpoints, step: int, steps_run: int,
  wall: float, train_seconds: float, eval_result: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
  """The summary of a run that stopped at `step` after `steps_run` steps in this process."""
  clips_per_sec = steps_run * config.batch_size / train_seconds if steps_run else None
  return dict(
    completed=step >= config.total_steps,
    step=step,
    total_steps=config.total_steps,
    steps_this_run=steps_run,
    wall_time_s=round(wall, 1),
    train_time_s=round(train_seconds, 1),
    clips_per_sec=round(clips_per_sec, 2) if clips_per_sec else None,
    eval=eval_result,
    checkpoint=str(epath.Path(checkpoints) / str(step)),
    tensorboard=f"tensorboard --logdir {workdir}",
    commands=next_commands(exp, workdir),
  )


def write(summary: dict[str, Any], workdir: str) -> None:
  (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def next_commands(exp: experiment.Experiment, workdir: str) -> dict[str, str]:
  """How to use the trained workdir (the CLIs that apply to this model and task)."""
  commands = {}
  if exp.task.needs_labels and not getattr(exp.task, "members", None):  # a mixture: no --head
    commands["predict"] = f"python -m trecvit_dist.predict --workdir {workdir} --video FILE"
  if exp.family.name == "trecvit" and exp.task.name in ("classification", "readout", "mae"):
    commands["export"] = (
      f"python -m trecvit_dist.official export --workdir {workdir} --out P.npz --config-out C.json"
      + ("" if exp.task.name == "classification" else " --encoder-only")
    )
  return commands


def log(summary: dict[str, Any], workdir: str) -> None:
  evals = ", ".join(f"{k} {v:.4g}" for k, v in summary["eval"].items())
  speed = f", {summary['clips_per_sec']} clips/s" if summary["clips_per_sec"] else ""
  lines = [f"Run complete at step {summary['step']}{speed}: eval {evals or 'none'}."]
  lines.append(f"  checkpoint   {summary['checkpoint']}")
  lines.append(f"  TensorBoard  {summary['tensorboard']}")
  lines += [f"  {name:<12} {command}" for name, command in summary["commands"].items()]
  lines.append(f"  summary      {epath.Path(workdir) / 'summary.json'}")
  logging.info("\n".join(lines))


def fmt_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
