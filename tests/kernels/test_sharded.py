"""gated_lru_sharded on 8 simulated CPU devices: equals the unsharded kernel, gathers nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kernels import gated_lru_sharded
from kernels.gated_lru import gated_lru_scan
from kernels.sharded import gated_lru_specs

F32 = jnp.float32


def _mesh(shape, names=("data", "fsdp", "tensor")):
  return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _placed(mesh, args):
  """Puts (x, gx, ga, a_param, h0) on the mesh the way gated_lru_sharded expects them."""
  spec_BTW, spec_BW, spec_W = gated_lru_specs(mesh)
  specs = (spec_BTW, spec_BTW, spec_BTW, spec_W, spec_BW)
  return tuple(
    None if v is None else jax.device_put(v, NamedSharding(mesh, s))
    for v, s in zip(args, specs, strict=True)
  )


@pytest.mark.parametrize(
  "mesh_shape,names,impl,h0",
  [
    ((2, 2, 2), ("data", "fsdp", "tensor"), "pallas", True),
    ((8, 1, 1), ("data", "fsdp", "tensor"), "pallas", False),
    ((4, 2), ("data", "tensor"), "xla", True),  # no fsdp axis in the mesh
    ((2, 4), ("fsdp", "tensor"), "xla", False),  # no data axis; tensor over 4
  ],
)
def test_sharded_equals_unsharded(
  mesh_shape, names, impl, h0, make_inputs, values_and_grads, assert_close, tol
):
  mesh = _mesh(mesh_shape, names)
  # batch 16 = 8 shards of 2, width 256 = 4 shards of 64: odd per-shard shapes for the kernel.
  args = _placed(mesh, make_inputs(16, 9, 256, F32, h0=h0))

  def sharded(x, gx, ga, ap, h0=None):
    return gated_lru_sharded(x, gx, ga, ap, h0=h0, mesh=mesh, impl=impl, interpret=True)

  def unsharded(x, gx, ga, ap, h0=None):
    return gated_lru_scan(x, gx, ga, ap, h0=h0)

  want = values_and_grads(unsharded, args)
  got = values_and_grads(sharded, args)
  # a_param's gradient is summed over the batch shards by shard_map's transpose.
  assert_close(got, want, tol(F32), f"{mesh_shape} {names} {impl}")


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_sharded_fwd_bwd_has_no_all_gather(impl, make_inputs):
  """With inputs already sharded as the specs say, nothing is gathered (a_param's grad: psum)."""
  mesh = _mesh((2, 2, 2))
  args = _placed(mesh, make_inputs(16, 8, 256, F32, h0=True))

  def loss(x, gx, ga, ap, h0):
    h, h_last = gated_lru_sharded(x, gx, ga, ap, h0=h0, mesh=mesh, impl=impl, interpret=True)
    return jnp.sum(h) + jnp.sum(h_last)

  for fn in (
    lambda *a: gated_lru_sharded(*a[:4], h0=a[4], mesh=mesh, impl=impl, interpret=True),
    jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
  ):
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert "all-gather" not in text
    assert "all-to-all" not in text


def test_sharded_specs_drop_absent_axes():
  specs = gated_lru_specs(_mesh((8,), ("data",)))
  assert specs == (P("data", None, None), P("data", None), P(None))
  specs = gated_lru_specs(_mesh((2, 2, 2)), batch_axes="fsdp", width_axis=None)
  assert specs == (P("fsdp", None, None), P("fsdp", None), P(None))
  specs = gated_lru_specs(_mesh((2, 2, 2)))
  assert specs == (P(("data", "fsdp"), None, "tensor"), P(("data", "fsdp"), "tensor"), P("tensor"))
