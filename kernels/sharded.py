"""The gated LRU on sharded activations: the kernel runs per shard under jax.shard_map.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW sharded P(batch_axes, time_axis, width_axis); a_param_W
sharded P(width_axis); h0_BW P(batch_axes, width_axis) -> (h_BTW, h_last_BW) sharded like the
inputs (h_last replicated over the time axis).

Batch and width. The recurrence is independent per (batch, width) element, so every shard runs
the kernel on its slice with no communication. a_param is replicated over the batch (and time)
axes, so shard_map's transpose sums its gradient over them (one psum of a [width] vector).

Time (time_axis: n shards of L = T / n steps). h_t = a_t h_{t-1} + b_t is linear, so a shard's
last state is A_s h_in(s) + last_s, with h_in(s) the state entering it, A_s = prod_t a_t and
last_s its last state from a zero start. Forward, per shard:
  1. pass 1: the kernel from a zero state -> last_s (its h is dropped); A_s = exp(sum_t log a_t),
     a reduce over gate_a in XLA;
  2. all-gather the [2, B, W] pairs (A, last) over time and scan them, n steps of [B, W] on every
     shard: h_in(0) = h0 (0 at the start of a video), h_in(s+1) = A_s h_in(s) + last_s; the
     global h_last = h_in(n), the same on every shard;
  3. pass 2: the kernel from h_in(s) -> the shard's h, exact.
The first shard keeps the start-of-video reset (m_0 = 1) when h0 is None: the kernels take that
as a run-time flag (shard == 0), so every shard runs the same program (no lax.cond, whose outputs
XLA copies). The brief's alternatives for step 3 add prod_{u<=t} a_u h_in to pass 1's h: as
exp(cumsum(log a)) in XLA it measured 270 MiB of forward temporaries against 54 MiB for pass 2
(v5p AOT, [1024, 16, 1536] float32 per chip: the reduce-window cumsum and pass 1's h are
materialized as [B, L, W] float32), and as a kernel call with x = 0 it costs what pass 2 costs
plus a materialized zero input and an add; pass 2 also leaves only its output as the residual.
Backward (a custom VJP: nothing is differentiated through the gather): shard s's inputs act only
through its own outputs and its carry out h_in(s+1), so the kernel's backward from h_in(s) with
the saved h and cotangents (dh, lam_s) is its exact gradient, where lam_s, the cotangent of the
carry out, is a reverse scan of gathered [B, W] values: D_s = sum_t dh_t prod_{u<=t} a_u (an XLA
reduce; what h_in(s) receives from the shard's outputs), lam_{n-1} = dh_last,
lam_s = D_{s+1} + A_{s+1} lam_{s+1}. h0's gradient is the first shard's dh0.

Cost of time sharding, per shard: one extra forward kernel pass (pass 1: reads x, gate_x, gate_a
and writes an h that XLA reuses), reduces over gate_a (A, forward and backward) and one XLA pass
over gate_a and dh for D (its cumsum is a [B, L, W] float32 temporary of the backward); the
residuals are those of the unsharded kernel plus h_in [B, W]. Communication, independent of T:
forward an all-gather of 2 B W float32 per shard, backward another plus a psum of B W (h_last's
cotangent), so each device receives about 4 n B W floats per step and holds the n-fold gathered
buffer, 2 n / L times one float32 activation of the shard: cheap while n << L. No [B, T, W]
activation crosses the time axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels.gated_lru import gated_lru, gated_lru_fwd, gated_lru_vjp

_F32 = jnp.float32


def _present(mesh: Mesh, axes: Sequence[str] | str | None) -> tuple[str, ...]:
  """The given axes that the mesh has (absent ones mean 'not sharded over it')."""
  if axes is None:
    return ()
  if isinstance(axes, str):
    axes = (axes,)
  return tuple(a for a in axes if a in mesh.axis_names)


def _time(mesh: Mesh, time_axis: str | None) -> str | None:
  """The time axis if the mesh shards over it (present with size > 1), else None."""
  axes = _present(mesh, time_axis)
  return axes[0] if axes and mesh.shape[axes[0]] > 1 else None


def gated_lru_specs(
  mesh: Mesh,
  batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
  width_axis: str | None = "tensor",
  time_axis: str | None = None,
) -> tuple[P, P, P]:
  """PartitionSpecs (x_BTW, h_BW, a_param_W) that gated_lru_sharded expects and returns."""
  batch = _present(mesh, batch_axes) or None
  width = (_present(mesh, width_axis) or (None,))[0]
  return P(batch, _time(mesh, time_axis), width), P(batch, width), P(width)


def gated_lru_sharded(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  *,
  mesh: Mesh,
  batch_axes: Sequence[str] | str | None = ("data", "fsdp"),
  width_axis: str | None = "tensor",
  time_axis: str | None = None,
  h0: jax.Array | None = None,
  c: float = 8.0,
  impl: str = "auto",
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """kernels.gated_lru per shard of (batch over batch_axes, time over time_axis, width)."""
  spec_BTW, spec_BW, spec_W = gated_lru_specs(mesh, batch_axes, width_axis, time_axis)
  time = _time(mesh, time_axis)
  if time is not None and x.ndim == 3 and x.shape[1] % mesh.shape[time] != 0:
    raise ValueError(
      f"gated_lru_sharded: time ({x.shape[1]}) must divide over the {mesh.shape[time]} shards of "
      f"mesh axis {time!r}; pad the clip or use a time_axis size that divides it."
    )
  args = (x, gate_x, gate_a, a_param) + (() if h0 is None else (h0,))
  in_specs = (spec_BTW, spec_BTW, spec_BTW, spec_W) + (() if h0 is None else (spec_BW,))
  options = dict(c=float(c), impl=impl, interpret=interpret)
  static_options = tuple(sorted(options.items()))  # hashable, for the custom_vjp

  def per_shard(x, gate_x, gate_a, a_param, *h0_):
    h0 = h0_[0] if h0_ else None
    if time is None:
      return gated_lru(x, gate_x, gate_a, a_param, h0=h0, **options)
    return _time_parallel(x, gate_x, gate_a, a_param, h0, time, mesh.shape[time], static_options)

  fn = jax.shard_map(
    per_shard, mesh=mesh, in_specs=in_specs, out_specs=(spec_BTW, spec_BW), check_vma=False
  )
  return fn(*args)


# --------------------------------------------------------------------------- time-parallel shards


def _log_a(gate_a, a_param, c):
  """log a_BLW in float32, as the reference computes it."""
  softplus = jax.nn.softplus(a_param.astype(_F32))[None, None]
  return -c * jax.nn.sigmoid(gate_a.astype(_F32)) * softplus


def _shard_start(h0, x, axis):
  """(h_start, reset): the state before the first shard and the kernels' reset flag."""
  shard = jax.lax.axis_index(axis)
  if h0 is None:  # the video starts on the first shard; the others continue from a carry
    return jnp.zeros(x[:, 0].shape, _F32), shard == 0
  return h0.astype(_F32), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _time_parallel(x, gate_x, gate_a, a_param, h0, axis, n, options):
  """This time shard's (h_BLW, h_last_BW) of the whole sequence's recurrence (see the docstring)."""
  return _time_parallel_fwd(x, gate_x, gate_a, a_param, h0, axis, n, options)[0]


def _time_parallel_fwd(x, gate_x, gate_a, a_param, h0, axis, n, options):
  opts = dict(options)
  shard = jax.lax.axis_index(axis)
  h_start, reset = _shard_start(h0, x, axis)
  lru = functools.partial(gated_lru_fwd, x, gate_x, gate_a, a_param, reset=reset, **opts)
  # Pass 1: from a zero state; only the last state is kept (XLA frees this h at once).
  _, last_local = lru(jnp.zeros_like(x[:, 0]))
  decay_BW = jnp.exp(jnp.sum(_log_a(gate_a, a_param, opts["c"]), axis=1))
  # [2, n, B, W]: every shard's (A, last).
  decay_SBW, last_SBW = jax.lax.all_gather(
    jnp.stack([decay_BW, last_local.astype(_F32)]), axis, axis=1
  )
  h_ins = []
  carry = h_start
  for s in range(n):
    h_ins.append(carry)
    carry = decay_SBW[s] * carry + last_SBW[s]
  h_in = jax.lax.dynamic_index_in_dim(jnp.stack(h_ins), shard, keepdims=False)
  # Pass 2: the shard's recurrence from its true start state.
  h, _ = lru(h_in)
  return (h, carry.astype(x.dtype)), (x, gate_x, gate_a, a_param, h0, h_in, h)


def _time_parallel_bwd(axis, n, options, residuals, cotangents):
  opts = dict(options)
  x, gate_x, gate_a, a_param, h0, h_in, h = residuals
  dh, dh_last = cotangents
  shard = jax.lax.axis_index(axis)
  _, reset = _shard_start(h0, x, axis)
  log_a = _log_a(gate_a, a_param, opts["c"])
  decay_BW = jnp.exp(jnp.sum(log_a, axis=1))
  # The cotangent reaching the state before the shard from its outputs: sum_t dh_t prod_{u<=t} a_u.
  into_BW = jnp.sum(dh.astype(_F32) * jnp.exp(jnp.cumsum(log_a, axis=1)), axis=1)
  decay_SBW, into_SBW = jax.lax.all_gather(jnp.stack([decay_BW, into_BW]), axis, axis=1)
  # shard_map (check_vma=False) hands each time shard 1/n of h_last's cotangent: sum the parts.
  lam = jax.lax.psum(dh_last.astype(_F32), axis)
  lams = [lam] * n
  for s in range(n - 1, 0, -1):
    lam = into_SBW[s] + decay_SBW[s] * lam
    lams[s - 1] = lam
  lam_BW = jax.lax.dynamic_index_in_dim(jnp.stack(lams), shard, keepdims=False)
  dx, dgx, dga, dap, dh_in = gated_lru_vjp(
    x, gate_x, gate_a, a_param, h_in, h, dh, lam_BW, reset=reset, **opts
  )
  if h0 is None:
    return dx, dgx, dga, dap, None
  # h0 enters the first shard only; shard_map's transpose sums this over the time shards.
  return dx, dgx, dga, dap, jnp.where(shard == 0, dh_in, 0.0).astype(h0.dtype)


_time_parallel.defvjp(_time_parallel_fwd, _time_parallel_bwd)


__all__ = ["gated_lru_sharded", "gated_lru_specs"]
