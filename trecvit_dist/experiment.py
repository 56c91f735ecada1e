"""One builder for a run: model family, task, model, optimizer, initial state and shardings.

`build(config, mesh, num_classes)` checks the whole config first (everything that would otherwise
fail inside a compile, in one error listing every problem), then returns an `Experiment` whose
jitted steps the trainer runs, `compile_check` AOT-compiles and the checkpoint benchmark saves.
The steps are pure functions of the task:

  train_step(state, batch) -> (state, metrics)    batch: the task's batch_spec(train=True) keys
  eval_step(params, batch, batch_index) -> sums   sums include "count": divide by it

The per-step RNG is fold_in(seed key, step), so a resumed run draws exactly the numbers an
uninterrupted one would (dropout, the MAE tube masks); eval RNGs depend only on the batch index.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from trecvit_dist import models, sharding, tasks
from trecvit_dist.models.family import ModelFamily
from trecvit_dist.tasks.task import Task

State = dict[str, Any]  # {"step": int32 [], "params": ..., "opt_state": ..., "rng": uint32 [2]}


# ----------------------------------------------------------------------------- config


def family_of(config: ml_collections.ConfigDict) -> ModelFamily:
  return models.get(config.model.get("name", "trecvit"))


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
  return tasks.get(config.get("task", "classification"))


def model_config(config: ml_collections.ConfigDict, num_classes: int):
  """The family's hyper-parameter dataclass from config.model and the data's shape."""
  d = config.data
  return family_of(config).make_config(
    config.model.to_dict(),
    num_classes=num_classes,
    num_frames=d.num_frames,
    image_size=d.image_size,
  )


def make_task(config: ml_collections.ConfigDict, num_classes: int) -> Task:
  """config.task's Task around config.model's family (task.model_cfg, task.build_model())."""
  return task_class(config)(config, family_of(config), model_config(config, num_classes))


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return config.eval_batch_size or config.batch_size


def config_errors(config, mesh_shape: dict[str, int], family, model_cfg, task: Task) -> list[str]:
  """Every config error the trainer can name before compiling (batch, mesh, model, task)."""
  errors = []
  divisor = int(np.prod([mesh_shape.get(a, 1) for a in sharding.BATCH_AXES]))
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
  if config.total_steps < 1:
    errors.append(f"total_steps must be >= 1, got {config.total_steps}")
  d = config.data
  time = mesh_shape.get(sharding.TIME_AXIS, 1)
  if time > 1 and not family.time_parallel:
    errors.append(
      f"model {family.name} cannot shard frames over mesh.time={time} (only families with "
      "time_parallel, e.g. trecvit, can); set mesh.time=1"
    )
  errors += family.config_errors(model_cfg, mesh_shape, d.num_frames, d.image_size)
  errors += task.config_errors(mesh_shape)
  return errors


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
  """AdamW with linear warmup and cosine decay, global-norm clipping, decay on weights only."""
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


# ----------------------------------------------------------------------------- steps


def make_init_state(model: nn.Module, tx, inputs: tuple, seed: int):
  """init_state(rng) -> State with logically-annotated (boxed) params and optimizer state."""

  def init_state(rng) -> State:
    params = model.init(rng, *inputs)["params"]
    return dict(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
    )

  return init_state


def state_shardings_for(init_state, mesh, seed: int):
  """(NamedShardings of the state from the modules' logical axis names, abstract state with them),
  from a shape-only init."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract_boxed = jax.eval_shape(lambda: init_state(jax.random.key(seed)))
    shardings = sharding.logical_shardings(mesh, nn.get_partition_spec(abstract_boxed))
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  plain = jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, abstract_boxed, is_leaf=is_box
  )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), plain, shardings
  )
  return shardings, abstract


def make_train_step(task: Task, model: nn.Module, tx, schedule, accum: int = 1):
  """train_step(state, batch) -> (state, metrics of task.train_metrics)."""

  def loss_fn(params, batch, rng):
    return task.loss(model, params, batch, rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: State, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    if accum == 1:
      (loss, aux), grads = grad_fn(state["params"], batch, rng)
    else:
      # Micro-batch i takes rows i::accum of every key, so each device's rows stay on it.
      def micro(x):
        return jnp.moveaxis(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 1, 0)

      def body(carry, xs):
        micro_batch, i = xs
        (loss, aux), grads = grad_fn(state["params"], micro_batch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

      micro_batches = jax.tree.map(micro, batch)
      first = jax.tree.map(lambda x: x[0], micro_batches)
      shapes = jax.eval_shape(grad_fn, state["params"], first, rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (*shapes[0], shapes[1]))
      totals, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, totals)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step_metrics = task.train_metrics.single_from_model_output(
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      learning_rate=schedule(state["step"]),
      **aux,
    )
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, step_metrics

  return train_step


def eval_rng(seed: int, batch_index):
  """The RNG of eval batch i: the same at every evaluation, so curves compare alike."""
  return jax.random.fold_in(jax.random.key(seed + 1), batch_index)


# ----------------------------------------------------------------------------- the builder


@dataclasses.dataclass
class Experiment:
  """A built run: what the trainer, compile_check and the checkpoint benchmark share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  family: ModelFamily
  model_cfg: Any
  task: Task
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with their shardings
  _init_state: Any

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.abstract_state["params"]))

  def init_state(self) -> State:
    """The initial state, created sharded (no full copy on one device)."""
    with self.scope():
      init = jax.jit(
        lambda r: nn.meta.unbox(self._init_state(r)), out_shardings=self.state_shardings
      )
      return init(jax.random.key(self.config.seed))

  def batch_spec(self, batch_size: int, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's batch keys with their global shapes and shardings: batch over (data, fsdp), a
    video's frames ([b, (views,) t, h, w, 3]) over time."""

    def placed(key, s):
      if key == "video" and s.ndim >= 5:
        return sharding.video_sharding(self.mesh, s.ndim)
      return sharding.batch_sharding(self.mesh, s.ndim)

    return {
      k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed(k, s))
      for k, s in self.task.batch_spec(batch_size, train).items()
    }

  def batch_shardings(self, batch_size: int, train: bool) -> dict[str, jax.sharding.Sharding]:
    return {k: s.sharding for k, s in self.batch_spec(batch_size, train).items()}

  def train_step(self):
    """The jitted train step (explicit shardings, state donated); call under `self.scope()`."""
    c = self.config
    return jax.jit(
      make_train_step(self.task, self.model, self.tx, self.schedule, c.grad_accum_steps),
      in_shardings=(self.state_shardings, self.batch_shardings(c.batch_size, train=True)),
      out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
      donate_argnums=0,
    )

  def eval_step(self):
    """Jitted eval_step(params, batch, batch_index) -> sums (replicated)."""
    task, model, seed = self.task, self.model, self.config.seed

    def eval_step(params, batch, i):
      return task.eval_sums(model, params, batch, eval_rng(seed, i))

    return jax.jit(
      eval_step,
      in_shardings=(
        self.state_shardings["params"],
        self.batch_shardings(eval_batch_size(self.config), train=False),
        None,
      ),
      out_shardings=sharding.replicated(self.mesh),
    )

  def images_step(self):
    """Jitted images(params, batch, batch_index) -> uint8 images, or None for the task."""
    if self.task.image_tag is None:
      return None
    task, model, seed = self.task, self.model, self.config.seed

    def images(params, batch, i):
      # A handful of videos, fewer than the devices: computed whole on each device (no sharding
      # rules) rather than split unevenly over the data axis.
      with nn.logical_axis_rules(()):
        return task.images(model, params, batch, eval_rng(seed, i))

    return jax.jit(
      images,
      in_shardings=(
        self.state_shardings["params"],
        self.batch_shardings(eval_batch_size(self.config), train=False),
        None,
      ),
      out_shardings=sharding.replicated(self.mesh),
    )

  @contextlib.contextmanager
  def scope(self):
    """The mesh and logical rules every step runs (and is traced) under."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield

  def train_flops_per_clip(self) -> float:
    return self.task.train_flops_per_clip()


def build(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_classes: int
) -> Experiment:
  """Checks the config against the mesh, then builds everything up to the abstract state."""
  task = make_task(config, num_classes)
  family, model_cfg = task.family, task.model_cfg
  errors = config_errors(config, dict(mesh.shape), family, model_cfg, task)
  if errors:
    raise ValueError("Invalid config: " + "; ".join(errors) + ".")
  model = task.build_model()
  tx, schedule = make_optimizer(config)
  tx = task.optimizer(tx)
  init_state = make_init_state(model, tx, task.init_inputs(), config.seed)
  state_shardings, abstract_state = state_shardings_for(init_state, mesh, config.seed)
  return Experiment(
    config=config,
    mesh=mesh,
    family=family,
    model_cfg=model_cfg,
    task=task,
    model=model,
    tx=tx,
    schedule=schedule,
    state_shardings=state_shardings,
    abstract_state=abstract_state,
    _init_state=init_state,
  )
