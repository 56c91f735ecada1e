"""The train step's options change how, not what, it computes; the FLOPs count behind perf/mfu."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trecvit_dist import experiment
from trecvit_dist.models import trecvit


def setup(load_config_fn, **model_overrides):
  config = load_config_fn("synthetic_tiny")
  config.batch_size = 8
  config.data.num_frames = 4
  config.model.width, config.model.mlp_dim, config.model.num_heads = 32, 64, 2
  for k, v in model_overrides.items():
    config.model[k] = v
  task = experiment.make_task(config, num_classes=4)
  model = task.build_model()
  tx, schedule = experiment.make_optimizer(config)
  sample = jnp.zeros((1, 4, 32, 32, 3), jnp.float32)
  state = nn.meta.unbox(experiment.make_init_state(model, tx, (sample,), 0)(jax.random.key(0)))
  batch = dict(
    video=jax.random.uniform(jax.random.key(1), (8, 4, 32, 32, 3)),
    label=jnp.arange(8, dtype=jnp.int32) % 4,
  )
  return config, task, model, tx, schedule, state, batch


def train_step(config, task, model, tx, schedule):
  return experiment.make_train_step(task, model, tx, schedule, config.grad_accum_steps)


def test_gradient_accumulation_matches_one_big_batch(load_config_fn):
  config, task, model, tx, schedule, state, batch = setup(load_config_fn)
  one = jax.jit(train_step(config, task, model, tx, schedule))(state, batch)
  config.grad_accum_steps = 4
  four = jax.jit(train_step(config, task, model, tx, schedule))(state, batch)
  np.testing.assert_allclose(four[1].loss.compute(), one[1].loss.compute(), rtol=1e-5)
  np.testing.assert_allclose(four[1].grad_norm.compute(), one[1].grad_norm.compute(), rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(four[0]["params"]), jax.tree.leaves(one[0]["params"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_memory_not_results(load_config_fn, remat):
  config, task, model, tx, schedule, state, batch = setup(load_config_fn)
  _, plain = jax.jit(train_step(config, task, model, tx, schedule))(state, batch)
  config, task, model, tx, schedule, state, batch = setup(load_config_fn, remat=remat)
  _, rematted = jax.jit(train_step(config, task, model, tx, schedule))(state, batch)
  np.testing.assert_allclose(rematted.loss.compute(), plain.loss.compute(), rtol=1e-5)
  np.testing.assert_allclose(rematted.grad_norm.compute(), plain.grad_norm.compute(), rtol=1e-5)


def test_analytic_flops_match_xla_cost_analysis(load_config_fn):
  config, task, model, _, _, state, batch = setup(load_config_fn, lru_impl="xla")
  cfg = model.cfg
  compiled = (
    jax.jit(lambda p, v: model.apply({"params": p}, v))
    .lower(state["params"], batch["video"])
    .compile()
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = trecvit.forward_flops(cfg, 4, 32) * 8
  # The analytic count leaves out element-wise work (norms, gates, softmax, the scan).
  assert 0.8 * cost["flops"] <= analytic <= 1.05 * cost["flops"], (analytic, cost["flops"])
  assert task.train_flops_per_clip() == 3 * trecvit.forward_flops(cfg, 4, 32)


def test_bf16_compute_keeps_float32_parameters(load_config_fn):
  config, task, model, tx, schedule, state, batch = setup(load_config_fn, dtype="bfloat16")
  new_state, m = jax.jit(train_step(config, task, model, tx, schedule))(state, batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new_state["params"]))
  assert np.isfinite(m.loss.compute())
