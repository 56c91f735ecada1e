"""gated_lru_sharded on 8 simulated CPU devices: equals the unsharded scan (batch, width and time
sharding), gathers nothing over batch/width and only [B, W] carries over time."""

from __future__ import annotations

import re

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


# ------------------------------------------------------------------------------- time-parallel


def _placed_time(mesh, args, time_axis="time"):
  """(x, gx, ga, a_param, h0) placed with time sharded over `time_axis`."""
  spec_BTW, spec_BW, spec_W = gated_lru_specs(mesh, time_axis=time_axis)
  specs = (spec_BTW, spec_BTW, spec_BTW, spec_W, spec_BW)
  return tuple(
    None if v is None else jax.device_put(v, NamedSharding(mesh, s))
    for v, s in zip(args, specs, strict=True)
  )


# (mesh shape, axis names): time over 1, 2, 4 and 8 shards, alone and with batch / width.
TIME_MESHES = {
  "time1-data8": ((8, 1), ("data", "time")),
  "time2": ((2,), ("time",)),
  "time4-data2": ((2, 4), ("data", "time")),
  "time8": ((8,), ("time",)),
  "time2-data2-tensor2": ((2, 2, 2), ("data", "time", "tensor")),
}
TIME_CASES = [
  ("time1-data8", "xla", True),
  ("time2", "pallas", False),
  ("time2", "xla", True),
  ("time4-data2", "pallas", True),
  ("time4-data2", "xla", False),
  ("time8", "pallas", False),
  ("time8", "xla", True),
  ("time2-data2-tensor2", "pallas", True),
  ("time2-data2-tensor2", "xla", False),
]
SLOW_TIME_CASES = [
  ("time1-data8", "pallas", False),
  ("time4-data2", "pallas", False),
  ("time8", "pallas", True),
]


@pytest.mark.parametrize(
  "mesh_name,impl,h0",
  TIME_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_TIME_CASES],
)
def test_time_sharded_equals_unsharded(
  mesh_name, impl, h0, make_inputs, values_and_grads, assert_close, tol
):
  """h, h_last and all gradients (x, gates, a_param, h0) equal the unsharded scan's."""
  mesh = _mesh(*TIME_MESHES[mesh_name])
  # batch 8 = 8 shards of 1; time 16 = 8 shards of 2 steps; width 256 = 2 shards of 128.
  args = _placed_time(mesh, make_inputs(8, 16, 256, F32, h0=h0))

  def sharded(x, gx, ga, ap, h0=None):
    return gated_lru_sharded(
      x, gx, ga, ap, h0=h0, mesh=mesh, time_axis="time", impl=impl, interpret=True
    )

  def unsharded(x, gx, ga, ap, h0=None):
    return gated_lru_scan(x, gx, ga, ap, h0=h0)

  want = values_and_grads(unsharded, args)
  got = values_and_grads(sharded, args)
  assert_close(got, want, tol(F32), f"{mesh_name} {impl} h0={h0}")


def test_time_shards_depend_on_the_carry(make_inputs):
  """The inputs above make the carry across shards matter (so dropping it would fail)."""
  x, gx, ga, ap, _ = make_inputs(8, 16, 256, F32)
  h, _ = gated_lru_scan(x, gx, ga, ap)
  h_second_alone, _ = gated_lru_scan(x[:, 8:], gx[:, 8:], ga[:, 8:], ap, h0=jnp.zeros((8, 256)))
  assert np.max(np.abs(np.asarray(h[:, 8:] - h_second_alone))) > 0.1


def _gathered_sizes(hlo_text):
  """Element counts of the results of every all-gather in compiled HLO text."""
  shapes = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo_text)
  return [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_time_sharded_gathers_only_carries(impl, make_inputs):
  """fwd+bwd gathers [2, B, W] carries over time, never a [B, T, W] activation."""
  mesh = _mesh((2, 4), ("data", "time"))
  batch, time, width = 8, 32, 256
  args = _placed_time(mesh, make_inputs(batch, time, width, F32))

  def loss(x, gx, ga, ap):
    h, h_last = gated_lru_sharded(x, gx, ga, ap, mesh=mesh, time_axis="time", impl=impl)
    return jnp.sum(h) + jnp.sum(h_last)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args[:4]).compile().as_text()
  sizes = _gathered_sizes(text)
  local_BW = batch // 2 * width
  assert sizes and all(s <= 2 * 4 * local_BW for s in sizes), sizes  # [2, n, B_local, W]
  assert "all-to-all" not in text


def test_time_sharded_rejects_indivisible_time(make_inputs):
  mesh = _mesh((4,), ("time",))
  x, gx, ga, ap, _ = make_inputs(2, 6, 128, F32)
  with pytest.raises(ValueError, match="time \\(6\\) must divide over the 4 shards"):
    gated_lru_sharded(x, gx, ga, ap, mesh=mesh, time_axis="time")


def test_time_specs():
  mesh = _mesh((2, 4), ("data", "time"))
  assert gated_lru_specs(mesh, time_axis="time") == (
    P("data", "time", None),
    P("data", None),
    P(None),
  )
  # A time axis of size 1 (or absent) leaves time unsharded.
  assert gated_lru_specs(_mesh((8, 1), ("data", "time")), time_axis="time")[0] == P(
    "data", None, None
  )
