"""The mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters sharded over it),
tensor (attention heads, MLP hidden units and LRU width split across devices). The batch is
sharded over (data, fsdp); time is never sharded (the recurrence runs along it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kernels

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes). Parameters use the plain names, activations the act_ ones.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("lru", "tensor"),
  ("lru_heads", "tensor"),
  ("classes", None),
  ("act_batch", BATCH_AXES),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_lru", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to fill the devices; checks the product."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {tuple(sizes)}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {tuple(sizes)}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {tuple(sizes)}: {num_devices} devices are not divisible by {known}; "
        "change mesh.data/fsdp/tensor."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
      f"devices, but {num_devices} are available; set one of mesh.data/fsdp/tensor to -1."
    )
  return tuple(sizes)


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), tensor innermost (fastest links)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 (non-physical shapes on CPU or AOT topologies)
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_shardings(mesh: Mesh, logical_specs):
  """A tree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def gated_lru(x_BTW, gate_x_BTW, gate_a_BTW, a_param_W, h0_BW, *, c: float, impl: str):
  """kernels.gated_lru, per shard under shard_map when a mesh is active (the trainer's).

  The batch rows shard like act_batch and the width like act_lru (LOGICAL_RULES); shapes that do
  not divide over the mesh (e.g. a batch-1 init) run unsharded.
  """
  mesh = jax.sharding.get_abstract_mesh()
  args = (x_BTW, gate_x_BTW, gate_a_BTW, a_param_W)
  if mesh is not None and not mesh.empty and mesh.size > 1:
    rules = dict(LOGICAL_RULES)
    batch_axes, width_axis = rules["act_batch"], rules["act_lru"]
    batch_ways = int(np.prod([mesh.shape.get(a, 1) for a in batch_axes]))
    if x_BTW.shape[0] % batch_ways == 0 and x_BTW.shape[-1] % mesh.shape.get(width_axis, 1) == 0:
      return kernels.gated_lru_sharded(
        *args,
        h0=h0_BW,
        c=c,
        impl=impl,
        mesh=mesh,
        batch_axes=batch_axes,
        width_axis=width_axis,
      )
  # The kernel picks Mosaic / Triton / interpret where it is lowered (also AOT for TPU from CPU).
  return kernels.gated_lru(*args, h0=h0_BW, c=c, impl=impl)
