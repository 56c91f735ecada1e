"""The Pallas kernel lowers for real hardware from this CPU host.

TPU: AOT-compiles (Mosaic + XLA:TPU via libtpu) for a v5p:4x4x4 topology, forward and
forward+backward, fp32 and bf16, plain and through the sharded entry point on a 64-chip mesh.
GPU: lowers to the Triton custom call (compiling it needs CUDA, so that stops at lowering).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import gated_lru_sharded
from kernels.gated_lru_pallas import gated_lru_pallas
from kernels.sharded import gated_lru_specs

MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'
TRITON_CALL = "__gpu$xla.gpu.triton"


@functools.cache
def _tpu_devices():
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.skip("libtpu is not installed (pip install '.[tpu]'): cannot AOT-compile for TPU")
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(
    platform="tpu",
    topology_name="v5p:4x4x4",
    chip_config_name="default",
    chips_per_host_bounds=(2, 2, 1),
    num_slices=1,
  )
  return topology.devices


def _fwd(x, gx, ga, ap, h0):
  return gated_lru_pallas(x, gx, ga, ap, h0=h0, interpret=False)


def _fwd_bwd(x, gx, ga, ap, h0):
  def loss(*args):
    h, h_last = _fwd(*args)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, gx, ga, ap, h0)


def _structs(shape, dtype, sharding_BTW, sharding_BW, sharding_W):
  b, _, w = shape
  btw = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_BTW)
  return (
    btw,
    btw,
    btw,
    jax.ShapeDtypeStruct((w,), jnp.float32, sharding=sharding_W),
    jax.ShapeDtypeStruct((b, w), dtype, sharding=sharding_BW),
  )


@pytest.mark.tpu_aot
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(1576, 32, 768), (9, 33, 130)], ids=["bench", "odd"])
def test_tpu_aot_compiles_mosaic_kernel(shape, dtype):
  mesh = Mesh(np.asarray(_tpu_devices()[:1]), ("x",))
  replicated = NamedSharding(mesh, P())
  args = _structs(shape, dtype, replicated, replicated, replicated)
  for fn, calls in ((_fwd, 1), (_fwd_bwd, 2)):
    compiled = jax.jit(fn).lower(*args).compile()
    assert compiled.as_text().count(MOSAIC_CALL) == calls, fn.__name__


@pytest.mark.tpu_aot
def test_tpu_aot_sharded_entry_on_pod_mesh():
  """The trainer's use: (b*n) tokens sharded over data x fsdp, width over tensor, 64 chips."""
  devices = _tpu_devices()
  mesh = Mesh(np.asarray(devices).reshape(8, 4, 2), ("data", "fsdp", "tensor"))
  spec_BTW, spec_BW, spec_W = (NamedSharding(mesh, s) for s in gated_lru_specs(mesh))
  args = _structs((8 * 197 * 4, 16, 768), jnp.bfloat16, spec_BTW, spec_BW, spec_W)

  def loss(x, gx, ga, ap, h0):
    h, h_last = gated_lru_sharded(x, gx, ga, ap, h0=h0, mesh=mesh, impl="pallas", interpret=False)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  text = compiled.as_text()
  assert text.count(MOSAIC_CALL) == 2
  assert "all-gather" not in text


@pytest.mark.tpu_aot
def test_tpu_aot_inside_users_shard_map_with_vma_checks():
  """A caller's own shard_map (check_vma=True) with a_param replicated over batch compiles."""
  mesh = Mesh(np.asarray(_tpu_devices()[:8]).reshape(4, 2), ("data", "tensor"))
  spec_BTW, spec_BW, spec_W = P("data", None, "tensor"), P("data", "tensor"), P("tensor")

  def per_shard(x, gx, ga, ap, h0):
    return gated_lru_pallas(x, gx, ga, ap, h0=h0, interpret=False)

  sharded = jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=(spec_BTW, spec_BTW, spec_BTW, spec_W, spec_BW),
    out_specs=(spec_BTW, spec_BW),
  )

  def loss(*args):
    h, h_last = sharded(*args)
    return jnp.sum(h) + jnp.sum(h_last)

  shardings = [NamedSharding(mesh, s) for s in (spec_BTW, spec_BW, spec_W)]
  args = _structs((64, 16, 256), jnp.float32, *shardings)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile().as_text()
  assert text.count(MOSAIC_CALL) == 2
  assert "all-reduce" in text  # a_param's gradient, summed over the batch shards


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_lowers_to_triton(dtype):
  args = _structs((1576, 33, 768), dtype, None, None, None)
  for fn, calls in ((_fwd, 1), (_fwd_bwd, 2)):
    try:
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # jaxlib without the Triton dialect
      pytest.skip(f"Triton lowering unavailable: {e}")
    assert text.count(TRITON_CALL) == calls, fn.__name__
    assert "tpu_custom_call" not in text  # lax.platform_dependent kept only the GPU branch
