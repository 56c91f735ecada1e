"""Training and evaluation: one function, top to bottom.

Sections: workdir and data -> mesh -> experiment (model family, task, optimizer, shardings: see
experiment.py) -> data iterator -> checkpoint restore -> compiled steps -> loop. The step is a
pure function `train_step(state, batch) -> (state, metrics)`, jitted once with explicit shardings
and the state donated. config.model.name picks the model family (models/) and config.task the
task (tasks/); nothing here knows either's internals.
"""

from __future__ import annotations

import dataclasses
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
from trecvit_dist import checkpointing, experiment, init_from, metrics, sharding
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


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> RunResult:
  """Trains (resuming from the workdir if it has checkpoints) and evaluates; see module doc.

  devices: the devices of the mesh (default: all of them).
  """
  # --- Workdir and data: fail before anything slow.
  if "://" not in workdir:  # Orbax needs absolute local paths; gs:// paths are absolute
    workdir = os.path.abspath(workdir)
  checkpointing.check_workdir_writable(workdir)
  data_path = resolve_data(config, workdir)
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
  )
  train_iter = pipeline.train_iterator(
    data_path, d.train_split, **{**options, **task.data_options(train=True)}
  )
  batch_keys = list(exp.batch_spec(config.batch_size, train=True))

  # --- Checkpoint restore. Resume order: existing checkpoint -> init_from -> scratch.
  ckpt = checkpointing.Checkpointer(
    workdir,
    every_steps=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
    keep_every_steps=config.keep_every_steps,
  )
  restored = ckpt.restore_latest(exp.abstract_state)
  if restored is not None:
    start_step, state, data_state = restored
    train_iter.set_state(data_state)
    logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
  else:
    start_step = 0
    state = exp.init_state()
    if config.init_from:
      state["params"] = init_from.load(
        state["params"],
        config.init_from,
        family=exp.family,
        model_cfg=exp.model_cfg,
        image_size=d.image_size,
        fresh_prefixes=task.fresh_prefixes,
      )
      logging.info("Initialised parameters from %s.", config.init_from)

  # --- Compiled steps: jitted once, explicit shardings, state donated.
  train_step, eval_step, images_step = exp.train_step(), exp.eval_step(), exp.images_step()
  batch_shardings = exp.batch_shardings(config.batch_size, train=True)

  writer = metrics.create_writer(workdir)
  if start_step == 0 and jax.process_index() == 0:
    writer.write_hparams({k: str(v) for k, v in flatten_config(config).items()})
  flops_per_step = exp.train_flops_per_clip() * config.batch_size
  peak = metrics.peak_flops_per_device(config.peak_flops_per_device)
  config_json = config.to_dict()
  # From here on a SIGTERM is a preemption: the run stops after a step, saves and exits 42
  # (before, no step has run since the last checkpoint, so a SIGTERM loses nothing).
  preemption = checkpointing.PreemptionWatcher()

  def run_eval(step):
    result, images = evaluate(exp, eval_step, images_step, state["params"], data_path)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    if images is not None:
      writer.write_images(step, {task.image_tag: images})
    logging.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in result.items()})
    return result

  # --- Loop. Metrics are fetched one step late so the host never waits on the device.
  train_losses: dict[int, float] = {}
  eval_result: dict[str, float] = {}
  pending = None  # (step, metrics of that step, still on device)
  accumulated = None
  t_last, steps_since = time.perf_counter(), 0
  t_start = time.perf_counter()
  preempted = False
  step = start_step
  profile_start, profile_stop = config.profile_steps
  with exp.scope(), preemption:
    while step < config.total_steps:
      if profile_stop > profile_start and step == profile_start and jax.process_index() == 0:
        jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
      local = next(train_iter)
      if task.needs_labels and np.any(local["label"] < 0):
        raise ValueError(
          f"Unlabelled videos (label -1) in {data_path} split {d.train_split!r} at step {step}; "
          f"task={task.name} needs labels: use task=mae for unlabelled data, or convert with "
          "labels."
        )
      batch = pipeline.global_batch({k: local[k] for k in batch_keys}, batch_shardings)
      state, step_metrics = train_step(state, batch)
      step += 1
      steps_since += 1
      data_state = train_iter.get_state()  # the iterator after exactly `step` batches

      if pending is not None:
        accumulated, train_losses = _fetch(pending, accumulated, train_losses)
      pending = (step, step_metrics)

      if profile_stop > profile_start and step == profile_stop and jax.process_index() == 0:
        jax.profiler.stop_trace()

      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        accumulated, train_losses = _fetch(pending, accumulated, train_losses)
        pending = None
        elapsed = time.perf_counter() - t_last
        steps_per_sec = steps_since / elapsed
        scalars = {f"train/{k}": float(v) for k, v in accumulated.compute().items()}
        scalars["perf/steps_per_sec"] = steps_per_sec
        scalars["perf/clips_per_sec"] = steps_per_sec * config.batch_size
        if peak:
          scalars["perf/mfu"] = flops_per_step * steps_per_sec / (peak * jax.device_count())
        if (blocking_ms := ckpt.take_blocking_ms()) is not None:
          scalars["perf/checkpoint_blocking_ms"] = blocking_ms
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
        accumulated, t_last, steps_since = None, time.perf_counter(), 0

      stop = preemption.should_stop(step) and not is_last
      if stop or is_last:
        ckpt.save(step, state, data_state, config_json, force=True)
      else:
        ckpt.save(step, state, data_state, config_json)
      if stop:
        preempted = True
        logging.warning(
          "Preempted: saved step %d; exiting with code %d to be resumed.",
          step,
          checkpointing.EXIT_PREEMPTED,
        )
        break
      if step % config.eval_every_steps == 0 or is_last:
        eval_result = run_eval(step)
    if start_step >= config.total_steps:  # rerunning a finished run: just evaluate it again
      eval_result = run_eval(step)
  if pending is not None:
    _, train_losses = _fetch(pending, accumulated, train_losses)
  ckpt.close()  # waits for the last save: a preempted run exits only once it is complete
  preemption.close()
  writer.flush()
  if not preempted and jax.process_index() == 0:
    (epath.Path(workdir) / "COMPLETED").write_text(f"{config.total_steps}\n")
  logging.info("Finished at step %d in %s.", step, _fmt_seconds(time.perf_counter() - t_start))
  return RunResult(
    step=step,
    train_losses=train_losses,
    eval_metrics=eval_result,
    preempted=preempted,
    state=state,
  )


def _fetch(pending, accumulated, train_losses):
  """Moves one step's metrics to the host; stops the run on a non-finite loss."""
  step, step_metrics = pending
  host = jax.device_get(step_metrics)
  loss = float(host.loss.compute())
  if not np.isfinite(loss):
    raise NonFiniteLossError(
      f"Loss is {loss} at step {step}. Lower optimizer.learning_rate, check the data, or use "
      "model.dtype=float32; the last checkpoint is intact."
    )
  train_losses[step] = loss
  return (host if accumulated is None else accumulated.merge(host)), train_losses


def evaluate(exp: experiment.Experiment, eval_step, images_step, params, data_path: str):
  """One pass over the eval split -> ({metric: mean over samples}, images or None).

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
  )
  it = pipeline.eval_iterator(
    data_path, d.eval_split, **{**options, **exp.task.data_options(train=False)}
  )
  shardings = exp.batch_shardings(batch_size, train=False)
  totals, images = None, None
  for i, local in enumerate(it):
    batch = pipeline.global_batch({k: local[k] for k in shardings}, shardings)
    sums = eval_step(params, batch, i)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if images_step is not None and images is None:
      # Replicated: this process's first shard is the whole array.
      images = np.asarray(images_step(params, batch, i).addressable_data(0))
  totals = jax.device_get(totals)
  count = max(float(totals.pop("count")), 1.0)
  return {k: float(v) / count for k, v in totals.items()}, images


def flatten_config(config) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(config.to_dict()).items()}


def _fmt_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
