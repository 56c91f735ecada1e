"""The mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters sharded over it),
time (frames split across devices: sequence parallelism), tensor (attention heads, MLP hidden
units and LRU width split across devices). The batch is sharded over (data, fsdp), the frames of
a video over time (logical act_time).

Time parallelism (mesh.time > 1, families with `time_parallel`): per-frame work (tokenizer,
attention, MLPs) is local to a shard; what runs along time exchanges only small per-shard
summaries, never a [.., T, ..] activation:
  - the gated LRU (`gated_lru`): kernels.gated_lru_sharded combines the shards' carries;
  - the causal conv1d before it (`causal_conv`): each shard receives the W-1 frames before it;
  - per-frame blocks (`frame_rows`): [b, t, n, c] -> rows [(b t), n, c] with every device's
    rows contiguous, and act_batch spanning (data, fsdp, time) inside `frames_as_rows()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
from kernels.sharded import gated_lru_specs

MESH_AXES = ("data", "fsdp", "time", "tensor")
BATCH_AXES = ("data", "fsdp")
TIME_AXIS = "time"

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
  ("act_time", TIME_AXIS),
  ("act_embed", None),
  ("act_mlp", "tensor"),
  ("act_lru", "tensor"),
)


def mesh_shape(
  data: int, fsdp: int, tensor: int, num_devices: int, time: int = 1
) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 entry resolved to fill the devices (time x the others)."""
  sizes = [data, fsdp, tensor]
  if time < 1:
    raise ValueError(f"mesh.time must be a positive number of time shards, got {time}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {tuple(sizes)}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got {tuple(sizes)}.")
  known = int(np.prod([s for s in sizes if s != -1])) * time
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh {tuple(sizes)} x time={time}: {num_devices} devices are not divisible by {known}; "
        "change mesh.data/fsdp/tensor/time."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) * time != num_devices:
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x time={time} x tensor={sizes[2]} = "
      f"{int(np.prod(sizes)) * time} devices, but {num_devices} are available; set one of "
      "mesh.data/fsdp/tensor to -1."
    )
  return tuple(sizes)


def make_mesh(data: int, fsdp: int, tensor: int, devices=None, *, time: int = 1) -> Mesh:
  """A (data, fsdp, time, tensor) mesh over `devices` (default: all), tensor innermost (fastest
  links), time next (only [batch, width] carries and conv halos cross it)."""
  devices = jax.devices() if devices is None else devices
  data, fsdp, tensor = mesh_shape(data, fsdp, tensor, len(devices), time)
  shape = (data, fsdp, time, tensor)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 (non-physical shapes on CPU or AOT topologies)
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  """make_mesh from config.mesh (data, fsdp, tensor and the optional time, default 1)."""
  return make_mesh(
    mesh_config.data,
    mesh_config.fsdp,
    mesh_config.tensor,
    devices,
    time=int(mesh_config.get("time", 1)),
  )


def logical_shardings(mesh: Mesh, logical_specs):
  """A tree of logical PartitionSpecs -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def video_sharding(mesh: Mesh, ndim: int = 5) -> NamedSharding:
  """A video [b, (views,) t, h, w, 3]: batch over (data, fsdp), frames over time."""
  spec = [None] * ndim
  spec[0] = BATCH_AXES
  if time_ways(mesh) > 1:
    spec[ndim - 4] = TIME_AXIS
  return NamedSharding(mesh, P(*spec))


def time_ways(mesh) -> int:
  """How many shards the frames are split into on `mesh` (1 without a time axis)."""
  return 1 if mesh is None or mesh.empty else int(dict(mesh.shape).get(TIME_AXIS, 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _lru_axes(mesh, x_BTW) -> tuple[tuple[str, ...] | None, str | None, str | None]:
  """(batch axes, width axis, time axis) that x_BTW divides over on `mesh`; None: not sharded."""
  rules = dict(LOGICAL_RULES)
  batch_axes, width_axis, time_axis = rules["act_batch"], rules["act_lru"], rules["act_time"]
  shape = dict(mesh.shape)
  batch_ways = int(np.prod([shape.get(a, 1) for a in batch_axes]))
  return (
    batch_axes if x_BTW.shape[0] % batch_ways == 0 else None,
    width_axis if x_BTW.shape[-1] % shape.get(width_axis, 1) == 0 else None,
    time_axis if time_ways(mesh) > 1 and x_BTW.shape[1] % time_ways(mesh) == 0 else None,
  )


def _active_mesh():
  """The mesh the step is traced under, or None (no mesh, or a single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty or mesh.size == 1 else mesh


def gated_lru(x_BTW, gate_x_BTW, gate_a_BTW, a_param_W, h0_BW, *, c: float, impl: str):
  """kernels.gated_lru, per shard under shard_map when a mesh is active (the trainer's).

  The batch rows shard like act_batch, time like act_time (the shards' carries are combined, see
  kernels/sharded.py) and the width like act_lru (LOGICAL_RULES); a size that does not divide
  over the mesh (e.g. a batch-1 init, a one-frame step) runs unsharded along that axis.
  """
  mesh = _active_mesh()
  args = (x_BTW, gate_x_BTW, gate_a_BTW, a_param_W)
  if mesh is not None:
    batch_axes, width_axis, time_axis = _lru_axes(mesh, x_BTW)
    if batch_axes is not None and width_axis is not None:
      return kernels.gated_lru_sharded(
        *args,
        h0=h0_BW,
        c=c,
        impl=impl,
        mesh=mesh,
        batch_axes=batch_axes,
        width_axis=width_axis,
        time_axis=time_axis,
      )
  # The kernel picks Mosaic / Triton / interpret where it is lowered (also AOT for TPU from CPU).
  return kernels.gated_lru(*args, h0=h0_BW, c=c, impl=impl)


def causal_conv(conv: Callable, x_BTD, window_BWD, w_KD, b_D):
  """conv(x_BTD, window_BWD | None, w_KD, b_D) -> (y_BTD, new window_BWD) with frames over time.

  conv is a causal conv of K = w_KD.shape[0] taps that reads the K-1 frames before each output
  (window_BWD before the first; None = zeros). With time sharded (n shards of L frames), every
  shard receives the K-1 frames before it from the ceil((K-1) / L) shards before it (collective
  permutes of [B, min(K-1, L), D]; the first shards take them from the window) and runs conv
  locally; the new window, the clip's last K-1 frames, is broadcast from the last shard (a psum
  of [B, K-1, D]). No [B, T, D] activation crosses the time axis. Without time sharding: conv.
  """
  mesh = _active_mesh()
  pad = w_KD.shape[0] - 1
  if mesh is None or pad == 0:
    return conv(x_BTD, window_BWD, w_KD, b_D)
  batch_axes, width_axis, time_axis = _lru_axes(mesh, x_BTD)
  if time_axis is None:
    return conv(x_BTD, window_BWD, w_KD, b_D)
  n = time_ways(mesh)
  spec_BTD, spec_BD, spec_D = gated_lru_specs(mesh, batch_axes, width_axis, time_axis)
  spec_BWD = P(spec_BD[0], None, spec_BD[1])
  has_window = window_BWD is not None

  def per_shard(x, w, b, *window):
    length = x.shape[1]
    hops, sent = -(-pad // length), min(pad, length)
    # The last `sent` frames of each of the `hops` shards before this one, farthest first (zeros
    # where the source would be before shard 0): they end with the K-1 frames before this shard.
    edge = x[:, length - sent :]
    received = [
      jax.lax.ppermute(edge, time_axis, [(i, i + j) for i in range(n - j)])
      for j in range(hops, 0, -1)
    ]
    before = jnp.concatenate(received, axis=1)[:, hops * sent - pad :]
    # Frames before the clip come from the window: global index g < 0 is window[K-1 + g].
    frame = jax.lax.axis_index(time_axis) * length - pad + jnp.arange(pad)
    if has_window:
      past = jnp.take(window[0].astype(x.dtype), jnp.clip(frame + pad, 0, pad - 1), axis=1)
    else:
      past = jnp.zeros_like(before)
    before = jnp.where((frame < 0)[None, :, None], past, before)
    y, last = conv(x, before, w, b)
    is_last = jax.lax.axis_index(time_axis) == n - 1
    return y, jax.lax.psum(jnp.where(is_last, last, jnp.zeros_like(last)), time_axis)

  fn = jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=(spec_BTD, P(None, spec_D[0]), spec_D) + ((spec_BWD,) if has_window else ()),
    out_specs=(spec_BTD, spec_BWD),
    check_vma=False,
  )
  return fn(x_BTD, w_KD, b_D, *((window_BWD,) if has_window else ()))


# ----------------------------------------------------------------------------- per-frame rows


def _ways(mesh, axes, size: int) -> int:
  """Shards of a dim of `size` over mesh axes `axes` (1 when absent or not dividing)."""
  if mesh is None or axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  ways = int(np.prod([dict(mesh.shape).get(a, 1) for a in axes]))
  return ways if size % ways == 0 else 1


def _row_blocks(b: int, t: int) -> tuple[int, int]:
  """(batch shards, time shards) of a [b, t, ...] activation under the active rules and mesh."""
  mesh = _active_mesh()
  rules = dict(nn.get_logical_axis_rules())
  if mesh is None or not rules.get("act_time") or time_ways(mesh) == 1:
    return 1, 1
  # The batch axes of LOGICAL_RULES, not the active act_batch (frames_as_rows widens it).
  return _ways(mesh, dict(LOGICAL_RULES)["act_batch"], b), _ways(mesh, rules["act_time"], t)


def frame_rows(x_BTNC):
  """[b, t, n, c] -> [(b t), n, c], one row per (video, frame), each device's rows contiguous.

  With time sharded over s shards and the batch over d, the rows are ordered (d s b/d t/s) rather
  than (b t): a device's block [b/d, t/s] is then one contiguous run of rows, so the reshape
  moves no data (sharded over act_batch inside `frames_as_rows`). `frame_rows_inverse` undoes it.
  """
  b, t, n, c = x_BTNC.shape
  d, s = _row_blocks(b, t)
  x = x_BTNC.reshape(d, b // d, s, t // s, n, c).transpose(0, 2, 1, 3, 4, 5)
  return x.reshape(b * t, n, c)


def frame_rows_inverse(x_RNC, b: int, t: int):
  """[(b t), n, c] from `frame_rows` -> [b, t, n, c]."""
  _, n, c = x_RNC.shape
  d, s = _row_blocks(b, t)
  x = x_RNC.reshape(d, s, b // d, t // s, n, c).transpose(0, 2, 1, 3, 4, 5)
  return x.reshape(b, t, n, c)


@contextlib.contextmanager
def frames_as_rows():
  """Within: act_batch spans the batch and time axes, for rows that are (video, frame) pairs."""
  rules = tuple(nn.get_logical_axis_rules())
  table = dict(rules)
  if table.get("act_batch") and table.get("act_time"):
    as_tuple = lambda a: (a,) if isinstance(a, str) else tuple(a)  # noqa: E731
    rows = as_tuple(table["act_batch"]) + as_tuple(table["act_time"])
    rules = tuple((k, rows if k == "act_batch" else v) for k, v in rules)
  with nn.logical_axis_rules(rules):
    yield
