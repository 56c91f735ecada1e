"""Training and evaluation: one function, top to bottom.

Sections: inputs (workdir, data splits, classes, init_from: every input checked before anything
slow) -> mesh -> experiment (model family, task, optimizer, shardings: see experiment.py) -> data
iterator -> checkpoint restore (config compared with the checkpoints', arrays verified) -> the
train step compiled ahead -> loop -> summary. The step is a pure function
`train_step(state, batch) -> (state, metrics)`, compiled once with explicit shardings and the
state donated. config.model.name picks the model family (models/) and config.task the task
(tasks/); nothing here knows either's internals.

Failures: an exception anywhere finishes the checkpoint save in flight (the newest complete step
stays the newest), stops the input workers and the writer, and propagates with the step the run
had reached (`failed_step`); main.py prints it as the last line and exits 1. SIGTERM: exit 42
with nothing lost since the last complete checkpoint (checkpointing.PreemptionWatcher).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import pipeline, synthetic
from trecvit_dist import checkpointing, config_base, experiment, init_from, metrics, sharding
from trecvit_dist.experiment import State

STATS = ("skipped_records", "looped_clips")  # the pipeline's per-batch counts, logged as data/*


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass
class RunResult:
  step: int
  train_losses: dict[int, float]  # every step this process ran, in order
  eval_metrics: dict[str, float]  # of the last evaluation
  preempted: bool
  state: State  # final train state (sharded global arrays)
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)  # = WORKDIR/summary.json


def failed_step(error: BaseException) -> int | None:
  """The step a failed run had reached when `error` stopped it; None if it failed before."""
  return getattr(error, "trecvit_step", None)


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """data.path, or the synthetic dataset generated into WORKDIR/data when it is empty."""
  if config.data.path:
    return config.data.path
  syn = config.data.synthetic
  if not syn.num_train:
    raise ValueError(
      "data.path is empty and the config defines no synthetic dataset; set --config.data.path."
    )
  path = str(epath.Path(workdir) / "data")
  if jax.process_index() == 0:  # one writer; the others wait for complete files
    synthetic.ensure(path, **syn.to_dict())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data generated")
  return path


def check_data(config: ml_collections.ConfigDict, data_path: str) -> None:
  """Opens every shard of the train and eval splits (footers and indices, no records)."""
  d = config.data
  for field, split in (("data.train_split", d.train_split), ("data.eval_split", d.eval_split)):
    try:
      pipeline.check_split(data_path, split)
    except ValueError as e:
      if not epath.Path(data_path).is_dir():  # the directory itself, not the split
        field, split = "data.path", data_path
      raise ValueError(f"{field}={split!r}: {e}") from e


def num_classes_of(config, data_path: str) -> int:
  """model.num_classes, else the length of DATA/classes.txt (a task without labels: not read)."""
  if config.model.num_classes:
    return config.model.num_classes
  if not experiment.task_class(config).needs_labels:  # unlabelled data may have no classes.txt
    return 1
  classes = pipeline.read_classes(data_path)
  if not classes:
    raise ValueError(
      f"{data_path}/classes.txt lists no classes: the data is unlabelled. Train it with "
      "task=mae (e.g. configs/trecvit_mae_k400.py), or convert it with labels."
    )
  return len(classes)


def check_init_from(source: str) -> None:
  """init_from is an .npz that opens, or a workdir with a checkpoint (read fully at init)."""
  path = epath.Path(source)
  if source.endswith(".npz"):
    if not path.exists():
      raise ValueError(f"init_from={source} does not exist: give the path of an .npz file.")
    try:  # the zip directory only; init_from.load reads the arrays, still before any compile
      with path.open("rb") as f, np.load(f) as npz:
        names = npz.files
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file raises many kinds)
      raise ValueError(f"init_from={source} is not a readable .npz file: {e}") from e
    if not names:
      raise ValueError(f"init_from={source} holds no arrays.")
    return
  if not path.is_dir():
    raise ValueError(
      f"init_from={source} is neither an .npz file nor a directory: give an official .npz "
      "(e.g. trecvit_B_k400.npz) or another run's workdir."
    )
  source_ckpt = checkpointing.Checkpointer(source, every_steps=0, keep=1, read_only=True)
  try:
    if not source_ckpt.steps():
      raise ValueError(
        f"init_from={source} has no checkpoint under {source_ckpt.directory}: give a workdir "
        "that has trained at least one checkpoint, or an .npz."
      )
  finally:
    source_ckpt.close()


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> RunResult:
  """Trains (resuming from the workdir if it has checkpoints) and evaluates; see module doc.

  devices: the devices of the mesh (default: all of them).
  """
  t_start = time.perf_counter()
  preemption = checkpointing.PreemptionWatcher(exit_until_started=True)
  ckpt = train_iter = writer = None
  step = None
  try:
    # --- Inputs: all checked before anything slow; a bad data path leaves no workdir behind.
    if "://" not in workdir:  # Orbax needs absolute local paths; gs:// paths are absolute
      workdir = os.path.abspath(workdir)
    checkpointing.check_workdir(workdir)
    if config.data.path:
      check_data(config, config.data.path)
    if config.init_from and not checkpointing.has_steps(workdir):
      check_init_from(config.init_from)
    checkpointing.check_workdir_writable(workdir)
    data_path = resolve_data(config, workdir)
    if not config.data.path:
      check_data(config, data_path)
    num_classes = num_classes_of(config, data_path)

    # --- Mesh, then everything the config defines, checked before any compile.
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    exp = experiment.build(config, mesh, num_classes)
    task = exp.task
    logging.info(
      "Mesh %s over %d devices in %d processes.", dict(mesh.shape), mesh.size, jax.process_count()
    )
    logging.info(
      "%s for task %s: %s, %.2fM parameters.",
      exp.family.name,
      task.name,
      exp.model_cfg,
      exp.num_params / 1e6,
    )

    # --- Checkpoints: the config they were written with must match this one.
    ckpt = checkpointing.Checkpointer(
      workdir,
      every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints,
      keep_every_steps=config.keep_every_steps,
    )
    if saved := ckpt.saved_config():
      where = f"checkpoint step {saved[0]} in {ckpt.directory}"
      for change in config_base.resume_changes(saved[1], config, where):
        logging.warning("Config changed since %s: %s", where, change)

    # --- Data: every process reads its rows of each global batch.
    d = config.data
    options = dict(
      global_batch_size=config.batch_size,
      num_frames=d.num_frames,
      stride=d.stride,
      image_size=d.image_size,
      seed=config.seed,
      worker_count=d.workers,
      flip=d.flip,
      randaugment=d.randaugment,
      scale_jitter=tuple(d.scale_jitter),
      skip_corrupt_records=d.skip_corrupt_records,
    )
    train_iter = pipeline.train_iterator(
      data_path, d.train_split, **{**options, **task.data_options(train=True)}
    )
    batch_keys = list(exp.batch_spec(config.batch_size, train=True))

    # --- Checkpoint restore. Resume order: existing checkpoint -> init_from -> scratch.
    restored = ckpt.restore_latest(exp.abstract_state)  # arrays verified finite and unchanged
    if restored is not None:
      start_step, state, data_state = restored
      train_iter.set_state(data_state)
      origin = f"restored from checkpoint step {start_step}"
      logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    else:
      start_step = 0
      state = exp.init_state()
      origin = "initialised from scratch"
      if config.init_from:
        state["params"] = init_from.load(
          state["params"],
          config.init_from,
          family=exp.family,
          model_cfg=exp.model_cfg,
          image_size=d.image_size,
          fresh_prefixes=task.fresh_prefixes,
        )
        origin = f"parameters loaded from init_from={config.init_from}"
        logging.info("Initialised parameters from %s.", config.init_from)
    # What a NaN loss says about its cause: restored checkpoints are verified finite.
    divergence = (
      f"The parameters and optimizer state were finite at the start ({origin}; checked), so "
      "training diverged: lower optimizer.learning_rate, check the data, or use "
      "model.dtype=float32."
    )
    if config.init_from and restored is None:
      if bad := checkpointing.non_finite_arrays(state["params"]):
        divergence = (
          f"The {origin} already held NaN or Inf in {len(bad)} array(s), e.g. {bad[:3]}: fix "
          "that source; the learning rate is not the cause."
        )
        logging.warning(divergence)
    step = start_step

    # --- Compiled steps: the train step ahead of the loop (so a SIGTERM during the compile
    # exits at once, and perf/steps_per_sec never counts it); state donated.
    logging.info("Compiling the train step.")
    with exp.scope():
      train_step = (
        exp.train_step()
        .lower(exp.abstract_state, exp.batch_spec(config.batch_size, train=True))
        .compile()
      )
    eval_step, images_step = exp.eval_step(), exp.images_step()
    batch_shardings = exp.batch_shardings(config.batch_size, train=True)

    writer = metrics.create_writer(workdir)
    if start_step == 0 and jax.process_index() == 0:
      writer.write_hparams({k: str(v) for k, v in flatten_config(config).items()})
    flops_per_step = exp.train_flops_per_clip() * config.batch_size
    peak = metrics.peak_flops_per_device(config.peak_flops_per_device)
    config_json = config.to_dict()

    def run_eval(step):
      result, images, stats = evaluate(exp, eval_step, images_step, state["params"], data_path)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      if images is not None:
        writer.write_images(step, {task.image_tag: images})
      logging.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in result.items()})
      if any(stats.values()):
        logging.warning("Eval split %r at step %d: %s.", d.eval_split, step, _stats_text(stats))
      return result

    # --- Loop. Metrics are fetched one step late so the host never waits on the device.
    train_losses: dict[int, float] = {}
    eval_result: dict[str, float] = {}
    pending = None  # (step, metrics of that step, still on device)
    accumulated = None
    stats = np.zeros(len(STATS), np.int64)  # this process's counts since the run started
    looped_warned = False
    train_seconds, t_last, steps_since = 0.0, time.perf_counter(), 0
    preempted = False
    profile_start, profile_stop = config.profile_steps
    preemption.started()  # from here on a SIGTERM stops the loop after a step and a save
    with exp.scope():
      while step < config.total_steps:
        if profile_stop > profile_start and step == profile_start and jax.process_index() == 0:
          jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
        local = next(train_iter)
        stats += [int(local[f"{pipeline.STATS_PREFIX}{k}"]) for k in STATS]
        if task.needs_labels and np.any(local["label"] < 0):
          raise ValueError(
            f"Unlabelled videos (label -1) in {data_path} split {d.train_split!r} at step "
            f"{step}; task={task.name} needs labels: use task=mae for unlabelled data, or "
            "convert with labels."
          )
        batch = pipeline.global_batch({k: local[k] for k in batch_keys}, batch_shardings)
        state, step_metrics = train_step(state, batch)
        step += 1
        steps_since += 1
        data_state = train_iter.get_state()  # the iterator after exactly `step` batches

        if pending is not None:
          accumulated, train_losses = _fetch(pending, accumulated, train_losses, divergence)
        pending = (step, step_metrics)

        if profile_stop > profile_start and step == profile_stop and jax.process_index() == 0:
          jax.profiler.stop_trace()

        is_last = step == config.total_steps
        if step % config.log_every_steps == 0 or is_last:
          accumulated, train_losses = _fetch(pending, accumulated, train_losses, divergence)
          pending = None
          elapsed = time.perf_counter() - t_last
          train_seconds += elapsed
          steps_per_sec = steps_since / elapsed
          scalars = {f"train/{k}": float(v) for k, v in accumulated.compute().items()}
          scalars["perf/steps_per_sec"] = steps_per_sec
          scalars["perf/clips_per_sec"] = steps_per_sec * config.batch_size
          if peak:
            scalars["perf/mfu"] = flops_per_step * steps_per_sec / (peak * jax.device_count())
          if (blocking_ms := ckpt.take_blocking_ms()) is not None:
            scalars["perf/checkpoint_blocking_ms"] = blocking_ms
          totals = dict(zip(STATS, _sum_over_processes(stats), strict=True))
          scalars.update({f"data/{k}": v for k, v in totals.items()})
          writer.write_scalars(step, scalars)
          eta = (config.total_steps - step) / max(steps_per_sec, 1e-9)
          logging.info(
            "step %d/%d loss %.4f %.2f steps/s ETA %s",
            step,
            config.total_steps,
            scalars["train/loss"],
            steps_per_sec,
            _fmt_seconds(eta),
          )
          if totals["looped_clips"] and not looped_warned:
            looped_warned = True
            logging.warning(
              "Training data: %s so far (data/looped_clips); the clip is num_frames x stride "
              "= %d x %d frames: lower them, or use longer videos.",
              _stats_text(totals),
              d.num_frames,
              d.stride,
            )
          accumulated, steps_since = None, 0
          t_last = time.perf_counter()

        stop = preemption.should_stop(step) and not is_last
        ckpt.save(step, state, data_state, config_json, force=stop or is_last)
        if stop:
          preempted = True
          logging.warning(
            "Preempted: saved step %d; exiting with code %d to be resumed.",
            step,
            checkpointing.EXIT_PREEMPTED,
          )
          break
        if step % config.eval_every_steps == 0 or is_last:
          eval_started = time.perf_counter()
          eval_result = run_eval(step)
          t_last += time.perf_counter() - eval_started  # steps/s counts training time only
      if start_step >= config.total_steps:  # rerunning a finished run: just evaluate it again
        eval_result = run_eval(step)
    if pending is not None:
      _, train_losses = _fetch(pending, accumulated, train_losses, divergence)
    ckpt.close()  # waits for the last save: a preempted run exits only once it is complete
    train_iter.close()
    writer.flush()
  except BaseException as error:
    _stop_after_failure(error, step, ckpt, train_iter, writer)
    raise
  finally:
    preemption.close()

  wall = time.perf_counter() - t_start
  steps_run = step - start_step
  summary = dict(
    completed=not preempted,
    step=step,
    total_steps=config.total_steps,
    steps_this_run=steps_run,
    wall_time_s=round(wall, 1),
    train_time_s=round(train_seconds, 1),
    clips_per_sec=round(steps_run * config.batch_size / train_seconds, 2) if steps_run else None,
    eval=eval_result,
    checkpoint=str(ckpt.directory / str(step)),
    tensorboard=f"tensorboard --logdir {workdir}",
    commands=_next_commands(exp, workdir),
  )
  if not preempted and jax.process_index() == 0:
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (epath.Path(workdir) / "COMPLETED").write_text(f"{config.total_steps}\n")
  logging.info("Finished at step %d in %s.", step, _fmt_seconds(wall))
  if not preempted:
    _log_summary(summary, workdir)
  return RunResult(
    step=step,
    train_losses=train_losses,
    eval_metrics=eval_result,
    preempted=preempted,
    state=state,
    summary=summary,
  )


def _stop_after_failure(error: BaseException, step, ckpt, train_iter, writer) -> None:
  """Finishes the save in flight and stops the workers, so the error is the last word."""
  if step is not None:
    try:
      error.trecvit_step = step
    except AttributeError:  # an exception type without a __dict__
      pass
  # The checkpointer first waits for the save in flight.
  for name, closer in (("checkpoint", ckpt), ("input pipeline", train_iter), ("writer", writer)):
    if closer is None:
      continue
    try:
      closer.close()
    except Exception as e:  # noqa: BLE001 (the first error is the one to report)
      logging.warning("While stopping after the error, the %s failed too: %s", name, e)


def _fetch(pending, accumulated, train_losses, cause: str):
  """Moves one step's metrics to the host; stops the run on a non-finite loss (cause: what the
  start of the run says about why)."""
  step, step_metrics = pending
  host = jax.device_get(step_metrics)
  loss = float(host.loss.compute())
  if not np.isfinite(loss):
    raise NonFiniteLossError(
      f"Loss is {loss} at step {step}. {cause} Checkpoints with NaN or Inf are never written."
    )
  train_losses[step] = loss
  return (host if accumulated is None else accumulated.merge(host)), train_losses


def _sum_over_processes(counts: np.ndarray) -> list[int]:
  """Sums of per-process counts (a collective: every process calls it at the same steps)."""
  if jax.process_count() == 1:
    return [int(c) for c in counts]
  gathered = multihost_utils.process_allgather(np.asarray(counts, np.int32))
  return [int(c) for c in np.asarray(gathered).reshape(-1, len(counts)).sum(axis=0)]


def _stats_text(totals: dict[str, int]) -> str:
  return (
    f"{totals['skipped_records']} corrupt record(s) skipped, {totals['looped_clips']} clip(s) "
    "looped (their video is shorter than the clip)"
  )


def evaluate(exp: experiment.Experiment, eval_step, images_step, params, data_path: str):
  """One pass over the eval split -> ({metric: mean over samples}, images or None, {stat: n}).

  images_step, if given, runs on the first batch (the same RNG as that batch's metrics) and is
  replicated, so every process has the whole image array.
  """
  config, d = exp.config, exp.config.data
  batch_size = experiment.eval_batch_size(config)
  options = dict(
    global_batch_size=batch_size,
    num_frames=d.num_frames,
    stride=d.stride,
    image_size=d.image_size,
    num_clips=d.eval_clips,
    num_crops=d.eval_crops,
    worker_count=0,
    skip_corrupt_records=d.skip_corrupt_records,
  )
  it = pipeline.eval_iterator(
    data_path, d.eval_split, **{**options, **exp.task.data_options(train=False)}
  )
  shardings = exp.batch_shardings(batch_size, train=False)
  totals, images = None, None
  stats = np.zeros(len(STATS), np.int64)
  for i, local in enumerate(it):
    stats += [int(local[f"{pipeline.STATS_PREFIX}{k}"]) for k in STATS]
    batch = pipeline.global_batch({k: local[k] for k in shardings}, shardings)
    sums = eval_step(params, batch, i)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if images_step is not None and images is None:
      # Replicated: this process's first shard is the whole array.
      images = np.asarray(images_step(params, batch, i).addressable_data(0))
  totals = jax.device_get(totals)
  count = max(float(totals.pop("count")), 1.0)
  result = {k: float(v) / count for k, v in totals.items()}
  return result, images, dict(zip(STATS, _sum_over_processes(stats), strict=True))


def _next_commands(exp: experiment.Experiment, workdir: str) -> dict[str, str]:
  """How to use the trained workdir (the CLIs that apply to this model and task)."""
  commands = {}
  if exp.task.needs_labels:
    commands["predict"] = f"python -m trecvit_dist.predict --workdir {workdir} --video FILE"
  if exp.family.name == "trecvit":
    commands["export"] = (
      f"python -m trecvit_dist.official export --workdir {workdir} --out P.npz --config-out C.json"
    )
  return commands


def _log_summary(summary: dict[str, Any], workdir: str) -> None:
  evals = ", ".join(f"{k} {v:.4g}" for k, v in summary["eval"].items())
  speed = f", {summary['clips_per_sec']} clips/s" if summary["clips_per_sec"] else ""
  lines = [f"Run complete at step {summary['step']}{speed}: eval {evals or 'none'}."]
  lines.append(f"  checkpoint   {summary['checkpoint']}")
  lines.append(f"  TensorBoard  {summary['tensorboard']}")
  lines += [f"  {name:<12} {command}" for name, command in summary["commands"].items()]
  lines.append(f"  summary      {epath.Path(workdir) / 'summary.json'}")
  logging.info("\n".join(lines))


def flatten_config(config) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(config.to_dict()).items()}


def _fmt_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
