"""The Pallas kernel lowers for real hardware from this CPU host.

TPU: AOT-compiles (Mosaic + XLA:TPU via libtpu) for a v5p:4x4x4 topology, forward and
forward+backward, fp32 and bf16, plain and through the sharded entry point on a 64-chip mesh
(also time-sharded). The public entry points with DEFAULT arguments must pick the real kernel
there: the interpreter and the xla scan are chosen only when lowering for CPU.
GPU: lowers to the Triton custom call (compiling it needs CUDA, so that stops at lowering).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
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


def _public(impl):
  """kernels.gated_lru with default arguments apart from impl: forward, and forward+backward."""

  def fwd(x, gx, ga, ap):
    return kernels.gated_lru(x, gx, ga, ap, impl=impl)

  def fwd_bwd(x, gx, ga, ap):
    def loss(*args):
      h, h_last = fwd(*args)
      return jnp.sum(h) + jnp.sum(h_last)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, gx, ga, ap)

  return fwd, fwd_bwd


@pytest.mark.tpu_aot
@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_tpu_aot_default_args_compile_mosaic(impl):
  """From this CPU host, default arguments still give the Mosaic kernel for TPU (no interpreter,
  no xla scan): the choice is made where the computation is lowered."""
  mesh = Mesh(np.asarray(_tpu_devices()[:1]), ("x",))
  replicated = NamedSharding(mesh, P())
  args = _structs((64, 16, 256), jnp.float32, replicated, replicated, replicated)[:4]
  fwd, fwd_bwd = _public(impl)
  for fn, calls in ((fwd, 1), (fwd_bwd, 2)):
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text.count(MOSAIC_CALL) == calls, (impl, fn.__name__)
    assert " while(" not in text  # neither the interpreter's grid loop nor the scan


@pytest.mark.tpu_aot
def test_tpu_aot_sharded_entry_on_pod_mesh():
  """The trainer's use with default arguments: (b*n) tokens over data x fsdp, width over tensor,
  64 chips."""
  devices = _tpu_devices()
  mesh = Mesh(np.asarray(devices).reshape(8, 4, 2), ("data", "fsdp", "tensor"))
  spec_BTW, spec_BW, spec_W = (NamedSharding(mesh, s) for s in gated_lru_specs(mesh))
  args = _structs((8 * 197 * 4, 16, 768), jnp.bfloat16, spec_BTW, spec_BW, spec_W)

  def loss(x, gx, ga, ap, h0):
    h, h_last = gated_lru_sharded(x, gx, ga, ap, h0=h0, mesh=mesh)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  text = compiled.as_text()
  assert text.count(MOSAIC_CALL) == 2
  assert "all-gather" not in text


@pytest.mark.tpu_aot
def test_tpu_aot_time_sharded_fwd_bwd():
  """Time over 4 chips (x data 4 x tensor 2), start of video: Mosaic kernels (pass 1, pass 2,
  backward), and only [2, B, W] carries are gathered over time."""
  mesh = Mesh(np.asarray(_tpu_devices()[:32]).reshape(4, 4, 2), ("data", "time", "tensor"))
  specs = gated_lru_specs(mesh, time_axis="time")
  spec_BTW, spec_BW, spec_W = (NamedSharding(mesh, s) for s in specs)
  batch, time, width = 4 * 64, 64, 512
  args = _structs((batch, time, width), jnp.float32, spec_BTW, spec_BW, spec_W)[:4]

  def loss(x, gx, ga, ap):
    h, h_last = gated_lru_sharded(x, gx, ga, ap, mesh=mesh, time_axis="time")
    return jnp.sum(h) + jnp.sum(h_last)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()
  assert text.count(MOSAIC_CALL) == 3
  gathered = [
    int(np.prod([int(d) for d in shape.split(",")]))
    for shape in re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", text)
  ]
  local_BW = batch // 4 * width // 2
  assert gathered and all(n <= 2 * 4 * local_BW for n in gathered), gathered


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


@pytest.mark.parametrize("impl", ["pallas", "auto"])
def test_gpu_default_args_lower_to_triton(impl):
  args = _structs((64, 33, 256), jnp.float32, None, None, None)[:4]
  fwd, fwd_bwd = _public(impl)
  for fn, calls in ((fwd, 1), (fwd_bwd, 2)):
    try:
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # jaxlib without the Triton dialect
      pytest.skip(f"Triton lowering unavailable: {e}")
    assert text.count(TRITON_CALL) == calls, (impl, fn.__name__)
    assert "tpu_custom_call" not in text and "stablehlo.while" not in text
