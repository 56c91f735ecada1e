"""The gated LRU on sharded activations: the kernel runs per shard under jax.shard_map.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW sharded P(batch_axes, None, width_axis); a_param_W sharded
P(width_axis); h0_BW P(batch_axes, width_axis) -> (h_BTW, h_last_BW) sharded like the inputs.

The recurrence is independent per (batch, width) element, so every shard runs the whole time loop
on its slice with no communication; time is never sharded. a_param is replicated over the batch
axes, so shard_map's transpose sums its gradient over them (one psum of a [width] vector).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels.gated_lru import gated_lru


def _present(mesh: Mesh, axes: Sequence[str] | str | None) -> tuple[str, ...]:
  """The given axes that the mesh has (absent ones mean 'not sharded over it')."""
  if axes is None:
    return ()
  if isinstance(axes, str):
    axes = (axes,)
  return tuple(a for a in axes if a in mesh.axis_names)


def gated_lru_specs(
  mesh: Mesh,
  batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
  width_axis: str | None = "tensor",
) -> tuple[P, P, P]:
  """PartitionSpecs (x_BTW, h_BW, a_param_W) that gated_lru_sharded expects and returns."""
  batch = _present(mesh, batch_axes) or None
  width = (_present(mesh, width_axis) or (None,))[0]
  return P(batch, None, width), P(batch, width), P(width)


def gated_lru_sharded(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  *,
  mesh: Mesh,
  batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
  width_axis: str | None = "tensor",
  h0: jax.Array | None = None,
  c: float = 8.0,
  impl: str = "auto",
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """kernels.gated_lru per shard of (batch over batch_axes, width over width_axis)."""
  spec_BTW, spec_BW, spec_W = gated_lru_specs(mesh, batch_axes, width_axis)
  args = (x, gate_x, gate_a, a_param) + (() if h0 is None else (h0,))
  in_specs = (spec_BTW, spec_BTW, spec_BTW, spec_W) + (() if h0 is None else (spec_BW,))

  def per_shard(x, gate_x, gate_a, a_param, *h0_):
    h0 = h0_[0] if h0_ else None
    return gated_lru(x, gate_x, gate_a, a_param, h0=h0, c=c, impl=impl, interpret=interpret)

  fn = jax.shard_map(
    per_shard, mesh=mesh, in_specs=in_specs, out_specs=(spec_BTW, spec_BW), check_vma=False
  )
  return fn(*args)


__all__ = ["gated_lru_sharded", "gated_lru_specs"]
