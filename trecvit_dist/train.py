"""Training and evaluation: one function, top to bottom.

Sections: inputs (run_inputs: every input checked before anything slow) -> mesh -> experiment
(model family, task, optimizer, shardings: experiment.py) -> data iterator -> checkpoint restore
(config compared with the checkpoints', arrays verified) -> the train step compiled ahead ->
loop -> summary (run_summary). The step is a pure `train_step(state, batch) -> (state,
metrics)`, compiled once with explicit shardings and the state donated; with data.mixture once
per distinct (head, batch shape) of the members, each global batch coming whole from one
dataset, and evaluation runs every member's eval split (eval/<member>/top1, ...). Nothing here
knows a model family's (models/) or a task's (tasks/) internals.

Failures: an exception anywhere finishes the checkpoint save in flight (the newest complete step
stays the newest), stops the input workers and the writer, and propagates with the step the run
had reached (`failed_step`); main.py prints it as the last line and exits 1. SIGTERM: exit 42
with nothing lost since the last complete checkpoint (checkpointing.PreemptionWatcher).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from etils import epath

from data_pipelines import mixture, pipeline
from trecvit_dist import (
  checkpointing,
  config_base,
  evaluation,
  experiment,
  init_from,
  metrics,
  run_inputs,
  run_summary,
  sharding,
)
from trecvit_dist.experiment import State


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
    inputs = run_inputs.prepare(config, workdir)
    build_config, members, data_path = inputs.build_config, inputs.members, inputs.data_path
    is_mixture = bool(members)

    # --- Mesh, then everything the config defines, checked before any compile.
    mesh = sharding.mesh_from_config(config.mesh, devices)
    exp = experiment.build(build_config, mesh, inputs.num_classes)
    task = exp.task
    if config.init_from and not checkpointing.has_steps(workdir):
      init_from.check(
        config.init_from,
        family=exp.family,
        model_cfg=exp.model_cfg,
        image_size=config.data.image_size,
      )
    if is_mixture and not getattr(task, "members", None):
      raise ValueError(
        f"data.mixture is set but task={task.name} trains on one dataset: use "
        "task=classification (one classifier head per mixture head), or set data.mixture=()."
      )
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
      mean=d.get("mean"),  # (video - mean) / std when set
      std=d.get("std"),
    )
    # One experiment view per dataset: the same model and state, the member's task (frames, head).
    if is_mixture:
      views = [dataclasses.replace(exp, task=task.member_task(i)) for i in range(len(members))]
      sources = [(m.path, m.train_split, m.eval_split, m.name) for m in members]
      train_iter = mixture.MixtureIterator(
        [
          pipeline.train_iterator(path, split, **{**options, **v.task.data_options(train=True)})
          for (path, split, _, _), v in zip(sources, views, strict=True)
        ],
        [m.weight for m in members],
        config.seed,
      )
    else:
      views, sources = [exp], [(data_path, d.train_split, d.eval_split, "")]
      train_iter = pipeline.train_iterator(
        data_path, d.train_split, **{**options, **task.data_options(train=True)}
      )

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
    # exits at once, and perf/steps_per_sec never counts it); state donated. A mixture compiles
    # one per distinct (head, batch shape) of its members.
    compiled: dict[Any, tuple] = {}
    steps = []  # per member: (train_step, batch shardings, eval_step)
    for v in views:
      spec = v.batch_spec(config.batch_size, train=True)
      key = (getattr(v.task, "member", None) and v.task.member.head, _shapes(spec))
      if key not in compiled:
        logging.info("Compiling the train step%s.", f" for {key}" if is_mixture else "")
        with exp.scope():
          train_step = v.train_step().lower(exp.abstract_state, spec).compile()
        compiled[key] = (
          train_step,
          v.batch_shardings(config.batch_size, train=True),
          v.eval_step(),
        )
      steps.append(compiled[key])
    images_step = exp.images_step()
    # Processes compile at different speeds; the first collective after it (gloo's context setup
    # on CPU) waits only 30 s for the others, so they meet here first, on a barrier with a timeout.
    checkpointing.agree("train step compiled", "")

    writer = metrics.create_writer(workdir)
    if start_step == 0 and jax.process_index() == 0:
      writer.write_hparams({k: str(v) for k, v in flatten_config(config).items()})
    flops_per_step = exp.train_flops_per_clip() * config.batch_size
    peak = metrics.peak_flops_per_device(config.peak_flops_per_device)
    config_json = config.to_dict()

    def run_eval(step):
      result = {}
      for i, (v, (path, _, split, name), (_, _, eval_step)) in enumerate(
        zip(views, sources, steps, strict=True)
      ):
        member_images = images_step if i == 0 else None
        metrics_i, images, stats = evaluation.evaluate(
          v, eval_step, member_images, state["params"], path, split=split
        )
        result.update({f"{name}/{k}" if name else k: value for k, value in metrics_i.items()})
        if images is not None:
          writer.write_images(step, {task.image_tag: images})
        if any(stats.values()):
          logging.warning(
            "Eval split %r of %s at step %d: %s.", split, path, step, evaluation.stats_text(stats)
          )
      writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
      logging.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in result.items()})
      return result

    # --- Loop. Metrics are fetched one step late so the host never waits on the device.
    train_losses: dict[int, float] = {}
    eval_result: dict[str, float] = {}
    pending = None  # (step, metrics of that step, still on device)
    accumulated = None
    stats = np.zeros(len(evaluation.STATS), np.int64)  # this process's counts since the run started
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
        member = int(local.get(mixture.MEMBER_KEY, 0))  # the dataset of this batch
        train_step, batch_shardings, _ = steps[member]
        stats += [int(local[f"{pipeline.STATS_PREFIX}{k}"]) for k in evaluation.STATS]
        if task.needs_labels and np.any(local["label"] < 0):
          path, split = sources[member][:2]
          raise ValueError(
            f"Unlabelled videos (label -1) in {path} split {split!r} at step {step}; "
            f"task={task.name} needs labels: use task=mae for unlabelled data, or convert with "
            "labels."
          )
        batch = pipeline.global_batch({k: local[k] for k in batch_shardings}, batch_shardings)
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
          totals = dict(zip(evaluation.STATS, evaluation.sum_over_processes(stats), strict=True))
          scalars.update({f"data/{k}": v for k, v in totals.items()})
          writer.write_scalars(step, scalars)
          eta = (config.total_steps - step) / max(steps_per_sec, 1e-9)
          logging.info(
            "step %d/%d loss %.4f %.2f steps/s ETA %s",
            step,
            config.total_steps,
            scalars["train/loss"],
            steps_per_sec,
            run_summary.fmt_seconds(eta),
          )
          if totals["looped_clips"] and not looped_warned:
            looped_warned = True
            logging.warning(
              "Training data: %s so far (data/looped_clips); the clip is num_frames x stride "
              "= %d x %d frames: lower them, or use longer videos.",
              evaluation.stats_text(totals),
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
  summary = run_summary.summarise(
    config, exp, workdir, ckpt.directory, step, step - start_step, wall, train_seconds, eval_result
  )
  if not preempted and jax.process_index() == 0:
    run_summary.write(summary, workdir)
    (epath.Path(workdir) / "COMPLETED").write_text(f"{config.total_steps}\n")
  logging.info("Finished at step %d in %s.", step, run_summary.fmt_seconds(wall))
  if not preempted:
    run_summary.log(summary, workdir)
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


def _shapes(spec: dict[str, jax.ShapeDtypeStruct]) -> tuple:
  return tuple(sorted((k, s.shape, str(s.dtype)) for k, s in spec.items()))


def flatten_config(config) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(config.to_dict()).items()}
