"""Training and evaluation of TRecViT: one function, top to bottom.

Sections: config -> mesh -> data -> model and optimizer -> shardings -> checkpoint restore ->
loop. The step is a pure function `train_step(state, batch) -> (state, metrics)`, jitted once with
explicit shardings and the state donated. The per-step RNG is fold_in(seed key, step), so a resumed
run draws exactly the numbers an uninterrupted one would (dropout, and the MAE tube masks).

config.task picks the model, loss and evaluation: "classification" (TRecViT, cross-entropy,
top-1/top-5), "mae" (TRecViTMAE, masked-patch MSE, PSNR and reconstruction images; labels unread)
or "readout" (a frozen encoder + attention readout, classification metrics). Everything else --
mesh, data, checkpoints, preemption, init_from -- is shared.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import pipeline, synthetic
from trecvit_dist import checkpointing, mae_task, metrics, official, sharding
from trecvit_dist.models import TRecViTConfig, make_config
from trecvit_dist.models.readout import frozen_encoder_tx, load_encoder_params

State = dict[str, Any]  # {"step": int32 [], "params": ..., "opt_state": ..., "rng": uint32 [2]}


class NonFiniteLossError(FloatingPointError):
  pass


# ----------------------------------------------------------------------------- config helpers


TASKS = ("classification", "mae", "readout")


def task_of(config: ml_collections.ConfigDict) -> str:
  """config.task: "classification" (default), "mae" pre-training or "readout" on frozen features."""
  return config.get("task", "classification")


def model_config(config: ml_collections.ConfigDict, num_classes: int) -> TRecViTConfig:
  """TRecViTConfig from config.model (variant + explicit overrides) and the data's class count."""
  m = config.model
  overrides = {
    k: m[k] for k in ("width", "depth", "mlp_dim", "num_heads", "rep_size") if m.get(k) is not None
  }
  cfg = make_config(
    m.variant or None,
    **overrides,
    patch_size=tuple(m.patch_size),
    num_classes=num_classes,
    frames_per_clip=config.data.num_frames,
    conv1d_temporal_width=m.conv1d_temporal_width,
    state_multiplier=m.state_multiplier,
    min_rad=m.min_rad,
    posemb=m.posemb,
    pooling=m.pooling,
    classifier_dropout=m.classifier_dropout,
    dtype=m.dtype,
    remat=m.remat,
    lru_impl=m.lru_impl,
    temporal_blocks=m.temporal_blocks,
  )
  if m.get("rep_size") is None:
    cfg = cfg.replace(rep_size=4 * cfg.width)
  return cfg


def validate(config: ml_collections.ConfigDict, mesh, cfg: TRecViTConfig) -> None:
  """Config errors that would otherwise surface deep inside a compile."""
  errors = []
  divisor = sharding.batch_divisor(mesh)
  for name, value in (("batch_size", config.batch_size), ("eval batch", eval_batch_size(config))):
    if value % divisor:
      errors.append(f"{name} {value} is not divisible by the data-parallel size {divisor}")
    if value % jax.process_count():
      errors.append(f"{name} {value} is not divisible by the {jax.process_count()} processes")
  if config.batch_size % (config.grad_accum_steps * divisor):
    errors.append(
      f"batch_size {config.batch_size} must be divisible by grad_accum_steps x data-parallel size "
      f"= {config.grad_accum_steps} x {divisor}"
    )
  tensor = mesh.shape["tensor"]
  for what, size in (
    ("num_heads", cfg.num_heads),
    ("mlp_dim", cfg.mlp_dim),
    ("lru width", cfg.lru_width),
    ("gate heads", cfg.gate_heads),
  ):
    if size % tensor:
      errors.append(f"{what} {size} is not divisible by mesh.tensor={tensor}")
  if cfg.width % mesh.shape["fsdp"]:
    errors.append(f"width {cfg.width} is not divisible by mesh.fsdp={mesh.shape['fsdp']}")
  if config.data.image_size % cfg.patch_size[1] or config.data.num_frames % cfg.patch_size[0]:
    errors.append(
      f"data.image_size {config.data.image_size} / data.num_frames {config.data.num_frames} do not "
      f"divide by the patch size {cfg.patch_size}"
    )
  if config.total_steps < 1:
    errors.append(f"total_steps must be >= 1, got {config.total_steps}")
  if task_of(config) not in TASKS:
    errors.append(f"task {task_of(config)!r} is not one of {TASKS}")
  else:
    errors += mae_task.config_errors(config, cfg, dict(mesh.shape))
  if errors:
    raise ValueError("Invalid config: " + "; ".join(errors) + ".")


def eval_batch_size(config) -> int:
  return config.eval_batch_size or config.batch_size


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
    synthetic.ensure(
      path,
      num_train=syn.num_train,
      num_validation=syn.num_validation,
      frames=syn.frames,
      size=syn.size,
      seed=syn.seed,
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data generated")
  return path


# ----------------------------------------------------------------------------- optimizer


def decay_mask(params) -> Any:
  """Weight decay on matmul/conv weights only: not norms, biases, position embeddings, a_param."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _leaf_name(path) in ("kernel", "w"), params
  )


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = config.optimizer
  warmup = min(o.warmup_steps, max(config.total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=o.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(config.total_steps, warmup + 1),
    end_value=o.end_learning_rate,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm else optax.identity(),
    optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask),
  )
  return tx, schedule


# ----------------------------------------------------------------------------- state


def make_init_state(model: nn.Module, tx, sample: jax.ShapeDtypeStruct, seed: int):
  """init_state(rng) -> State with logically-annotated (boxed) params and optimizer state."""

  def init_state(rng) -> State:
    params = model.init(rng, jnp.zeros(sample.shape, sample.dtype))["params"]
    return dict(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
    )

  return init_state


def state_shardings_for(init_state, mesh, seed: int):
  """NamedShardings of the state, from the modules' logical axis names (shape-only init)."""
  abstract_boxed = jax.eval_shape(lambda: init_state(jax.random.key(seed)))
  return sharding.logical_shardings(mesh, nn.get_partition_spec(abstract_boxed))


# ----------------------------------------------------------------------------- steps


def classification_loss(logits, labels, num_classes: int, smoothing: float):
  targets = (
    optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    if smoothing
    else (jax.nn.one_hot(labels, num_classes))
  )
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def make_loss_fn(model, config):
  """loss_fn(params, video, label, rng) -> (loss, aux dict) of config.task.

  classification and readout: cross-entropy (aux empty); mae: mae_task.make_mae_loss_fn (aux:
  psnr and loss_pixels, labels not read).
  """
  if task_of(config) == "mae":
    return mae_task.make_mae_loss_fn(model, config)
  num_classes = model.cfg.num_classes

  def loss_fn(params, video, label, rng):
    logits = model.apply({"params": params}, video, train=True, rngs={"dropout": rng})
    return classification_loss(logits, label, num_classes, config.label_smoothing), {}

  return loss_fn


def make_train_step(model, tx, schedule, config):
  """train_step(state, batch) -> (state, metrics); batch: video [B, T, H, W, 3], label [B]."""
  accum = config.grad_accum_steps
  grad_fn = jax.value_and_grad(make_loss_fn(model, config), has_aux=True)
  metrics_cls = metrics.train_metrics_class(task_of(config))

  def train_step(state: State, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if accum == 1:
      (loss, aux), grads = grad_fn(state["params"], batch["video"], batch["label"], rng)
    else:
      # Micro-batch i takes rows i::accum, so each device's rows stay on that device.
      def micro(x):
        return jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)

      def body(carry, xs):
        video, label, i = xs
        (loss, aux), grads = grad_fn(state["params"], video, label, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

      videos, labels = micro(batch["video"]), micro(batch["label"])
      shapes = jax.eval_shape(grad_fn, state["params"], videos[0], labels[0], rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (*shapes[0], shapes[1]))
      totals, _ = jax.lax.scan(body, zeros, (videos, labels, jnp.arange(accum)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, totals)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step_metrics = metrics_cls.single_from_model_output(
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      learning_rate=schedule(state["step"]),
      **aux,
    )
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, step_metrics

  return train_step


def make_eval_step(model):
  """eval_step(params, batch) -> sums; batch video [B, views, T, H, W, 3], label [B], mask [B].

  Multi-view prediction averages the logits over views (temporal clips x spatial crops).
  """

  def eval_step(params, batch):
    video = batch["video"]
    b, v = video.shape[:2]
    logits = model.apply({"params": params}, video.reshape((b * v,) + video.shape[2:]))
    logits = jnp.mean(logits.reshape(b, v, -1).astype(jnp.float32), axis=1)
    mask = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(label, 0))
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    correct1 = (top5[:, 0] == label).astype(jnp.float32)
    correct5 = jnp.any(top5 == label[:, None], axis=-1).astype(jnp.float32)
    return dict(
      loss=jnp.sum(loss * mask),
      top1=jnp.sum(correct1 * mask),
      top5=jnp.sum(correct5 * mask),
      count=jnp.sum(mask),
    )

  return eval_step


def eval_rng(seed: int, batch_index):
  """The MAE masks of eval batch i: the same at every evaluation, so curves compare alike."""
  return jax.random.fold_in(jax.random.key(seed + 1), batch_index)


def make_task_eval_step(model, config):
  """eval_step(params, batch, batch_index) -> sums of config.task (with "count": divide by it)."""
  if task_of(config) == "mae":
    step = mae_task.make_mae_eval_step(model, float(config.mae.ratio), bool(config.mae.norm_pix))
    return lambda params, batch, i: step(params, batch, eval_rng(config.seed, i))
  step = make_eval_step(model)
  return lambda params, batch, i: step(params, batch)


# ----------------------------------------------------------------------------- init_from


# Heads that init_from may leave freshly initialised when the source lacks them (or, for the
# classifier, has another class count): the classifier, the MAE pixel decoder, the readout.
HEAD_PREFIXES = ("decoder/", "mae_decoder/", "readout/")


def init_from(params, source: str, cfg: TRecViTConfig, image_size: int):
  """Loads params from an official .npz or another workdir's newest checkpoint (params only).

  The tokenizer and encoder must load; a head (HEAD_PREFIXES) is kept freshly initialised when
  the source has none of that shape: a new class count, classification or readout from an MAE
  run or the released trecvit_B_mae.npz, MAE from a supervised run. Every re-initialised and every
  ignored source key is logged.
  """
  flat_target = flax.traverse_util.flatten_dict(params, sep="/")
  if source.endswith(".npz"):
    flat = official.load_npz(source)
    wants_classifier = any(k.startswith("decoder/cls_head") for k in flat_target)
    if wants_classifier and any(k.startswith("decoder/cls_head") for k in flat):
      head_mismatch = any(
        k.startswith("decoder/cls_head")
        and k in flat_target
        and flat[k].shape != flat_target[k].shape
        for k in flat
      )
      flat = {
        k: v for k, v in flat.items() if not (head_mismatch and k.startswith("decoder/cls_head"))
      }
      loaded = official.import_params(
        flat,
        cfg,
        (image_size, image_size),
        ignore_prefixes=("mae_decoder/",),
        allow_missing_prefixes=("decoder/cls_head",) if head_mismatch else (),
      )
    else:
      # Encoder only (an MAE release, or a classifier into an MAE / readout model): every
      # tokenizer/ and encoder/ key must match; the rest of the file is listed, not loaded.
      loaded, ignored = load_encoder_params(flat, cfg, (image_size, image_size))
      if ignored:
        logging.info("init_from: ignored %d keys of %s: %s", len(ignored), source, ignored)
    loaded = flax.traverse_util.flatten_dict(loaded, sep="/")
  else:
    # Another run's workdir: read-only, params only, restored onto this run's shardings (so a
    # different mesh or device count works); a differently shaped head is not read.
    source_ckpt = checkpointing.Checkpointer(source, every_steps=0, keep=1, read_only=True)
    try:
      step, loaded = source_ckpt.load_params(flat_target)
    except checkpointing.CheckpointError as e:
      raise ValueError(f"init_from={source}: {e}") from e
    finally:
      source_ckpt.close()
    logging.info("init_from: parameters of step %d of %s.", step, source)
  out, fresh, bad = {}, [], []
  for key, target in flat_target.items():
    value = loaded.get(key)
    if value is not None and tuple(value.shape) == tuple(target.shape):
      out[key] = jax.device_put(jnp.asarray(value, target.dtype), target.sharding)
    elif key.startswith(HEAD_PREFIXES):
      out[key] = target
      fresh.append(key)
    else:
      bad.append(key)
  if bad:
    raise ValueError(
      f"init_from={source}: {len(bad)} parameter(s) missing or mis-shaped, e.g. {bad[:5]}; check "
      "the model size, patch size and image size against the source's."
    )
  if fresh:
    logging.info("init_from: %d head parameter(s) freshly initialised: %s", len(fresh), fresh)
  return flax.traverse_util.unflatten_dict(out, sep="/")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
  step: int
  train_losses: dict[int, float]  # every step this process ran, in order
  eval_metrics: dict[str, float]  # of the last evaluation
  preempted: bool
  state: State  # final train state (sharded global arrays)


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> RunResult:
  """Trains (resuming from the workdir if it has checkpoints) and evaluates; see module doc.

  devices: the devices of the mesh (default: all of them).
  """
  # --- Config and workdir: fail before anything slow.
  if "://" not in workdir:  # Orbax needs absolute local paths; gs:// paths are absolute
    workdir = os.path.abspath(workdir)
  checkpointing.check_workdir_writable(workdir)
  data_path = resolve_data(config, workdir)
  task = task_of(config)
  cfg = model_config(config, num_classes_of(config, data_path))

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  validate(config, mesh, cfg)
  logging.info(
    "Mesh %s over %d devices in %d processes.", dict(mesh.shape), mesh.size, jax.process_count()
  )

  # --- Data: every process reads its rows of each global batch.
  d = config.data
  train_iter = pipeline.train_iterator(
    data_path,
    d.train_split,
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

  # --- Model and optimizer, initialised shape-first.
  model = mae_task.build_model(config, cfg)
  tx, schedule = make_optimizer(config)
  if task == "readout":  # the encoder is frozen: no updates, no optimizer state, no decay
    tx = frozen_encoder_tx(tx)
  sample = jax.ShapeDtypeStruct((1, d.num_frames, d.image_size, d.image_size, 3), jnp.float32)

  init_state = make_init_state(model, tx, sample, config.seed)

  # --- Shardings: one table of logical rules (sharding.LOGICAL_RULES).
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state_shardings = state_shardings_for(init_state, mesh, config.seed)
    state = jax.jit(lambda r: nn.meta.unbox(init_state(r)), out_shardings=state_shardings)(
      jax.random.key(config.seed)
    )
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  logging.info("TRecViT (%s) %s: %.2fM parameters.", task, cfg, num_params / 1e6)

  # --- Checkpoint restore. Resume order: existing checkpoint -> init_from -> scratch.
  ckpt = checkpointing.Checkpointer(
    workdir,
    every_steps=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
    keep_every_steps=config.keep_every_steps,
  )
  restored = ckpt.restore_latest(abstract_state)
  if restored is not None:
    start_step, state, data_state = restored
    train_iter.set_state(data_state)
    logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
  else:
    start_step = 0
    if config.init_from:
      state["params"] = init_from(state["params"], config.init_from, cfg, d.image_size)
      logging.info("Initialised parameters from %s.", config.init_from)

  # --- Compiled steps: jitted once, explicit shardings, state donated.
  batch_shardings = dict(
    video=sharding.batch_sharding(mesh, 5), label=sharding.batch_sharding(mesh)
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    train_step = jax.jit(
      make_train_step(model, tx, schedule, config),
      in_shardings=(state_shardings, batch_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    eval_step = jax.jit(
      make_task_eval_step(model, config),
      in_shardings=(state_shardings["params"], eval_batch_shardings(mesh), None),
      out_shardings=sharding.replicated(mesh),
    )
    images_step = None
    if task == "mae":  # input / masked / reconstruction of the first eval videos, replicated
      m = config.mae
      images = mae_task.make_mae_images(
        model, float(m.ratio), bool(m.norm_pix), m.image_videos, m.image_frames
      )

      def replicated_images(p, video, i):
        # A handful of videos, fewer than the devices: computed whole on each device (no
        # sharding rules) rather than split unevenly over the data axis.
        with nn.logical_axis_rules(()):
          return images(p, video, eval_rng(config.seed, i))

      images_step = jax.jit(
        replicated_images,
        in_shardings=(state_shardings["params"], sharding.batch_sharding(mesh, 6), None),
        out_shardings=sharding.replicated(mesh),
      )

  writer = metrics.create_writer(workdir)
  if start_step == 0 and jax.process_index() == 0:
    writer.write_hparams({k: str(v) for k, v in flatten_config(config).items()})
  flops_per_step = task_flops_per_clip(config, cfg) * config.batch_size
  peak = metrics.peak_flops_per_device(config.peak_flops_per_device)
  config_json = config.to_dict()
  # From here on a SIGTERM is a preemption: the run stops after a step, saves and exits 42
  # (before, no step has run since the last checkpoint, so a SIGTERM loses nothing).
  preemption = checkpointing.PreemptionWatcher()

  def run_eval(step):
    result, images = evaluate(eval_step, state["params"], config, data_path, mesh, images_step)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
    if images is not None:
      writer.write_images(step, {"eval/mae_input_masked_reconstruction": images})
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
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES), preemption:
    while step < config.total_steps:
      if profile_stop > profile_start and step == profile_start and jax.process_index() == 0:
        jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
      local = next(train_iter)
      if task != "mae" and np.any(local["label"] < 0):
        raise ValueError(
          f"Unlabelled videos (label -1) in {data_path} split {d.train_split!r} at step {step}; "
          f"task={task} needs labels: use task=mae for unlabelled data, or convert with labels."
        )
      batch = pipeline.global_batch(local, batch_shardings)
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


def eval_batch_shardings(mesh):
  return dict(
    video=sharding.batch_sharding(mesh, 6),
    label=sharding.batch_sharding(mesh),
    mask=sharding.batch_sharding(mesh),
  )


def evaluate(eval_step, params, config, data_path: str, mesh, images_step=None):
  """One pass over the eval split -> ({metric: mean over videos}, images or None).

  classification/readout: loss, top1, top5 (logits averaged over views); mae: loss, loss_pixels,
  psnr_masked (every view one sample). images_step, if given, runs on the first batch: uint8
  [N, 3H, F*W, 3] (the same masks as that batch's metrics), on every process.
  """
  d = config.data
  it = pipeline.eval_iterator(
    data_path,
    d.eval_split,
    global_batch_size=eval_batch_size(config),
    num_frames=d.num_frames,
    stride=d.stride,
    image_size=d.image_size,
    num_clips=d.eval_clips,
    num_crops=d.eval_crops,
    worker_count=0,
  )
  shardings = eval_batch_shardings(mesh)
  totals, images = None, None
  for i, local in enumerate(it):
    batch = pipeline.global_batch(local, shardings)
    sums = eval_step(params, batch, i)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if images_step is not None and images is None:
      # Replicated: this process's first shard is the whole array.
      images = np.asarray(images_step(params, batch["video"], i).addressable_data(0))
  totals = jax.device_get(totals)
  count = max(float(totals.pop("count")), 1.0)
  return {k: float(v) / count for k, v in totals.items()}, images


def num_classes_of(config, data_path: str) -> int:
  """model.num_classes, else the length of DATA/classes.txt (MAE: not read, no classifier)."""
  if config.model.num_classes:
    return config.model.num_classes
  if task_of(config) == "mae":  # unlabelled data may have no (or an empty) classes.txt
    return 1
  classes = pipeline.read_classes(data_path)
  if not classes:
    raise ValueError(
      f"{data_path}/classes.txt lists no classes: the data is unlabelled. Train it with "
      "task=mae (e.g. configs/trecvit_mae_k400.py), or convert it with labels."
    )
  return len(classes)


def task_flops_per_clip(config, cfg: TRecViTConfig) -> float:
  """Analytic train FLOPs per clip of config.task (behind perf/mfu)."""
  d, task = config.data, task_of(config)
  if task == "mae":
    n = (d.image_size // cfg.patch_size[1]) * (d.image_size // cfg.patch_size[2])
    return metrics.mae_train_flops_per_clip(
      cfg,
      mae_task.decoder_config(config).blocks_config(cfg),
      d.num_frames,
      d.image_size,
      visible=mae_task.mae_lib.num_visible(n, float(config.mae.ratio)),
    )
  if task == "readout":
    return metrics.readout_train_flops_per_clip(cfg, d.num_frames, d.image_size)
  return metrics.train_flops_per_clip(cfg, d.num_frames, d.image_size)


def flatten_config(config) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(config.to_dict()).items()}


def _fmt_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
