"""The gated linear recurrence of the RG-LRU: the dispatcher over its implementations.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW (pre-sigmoid logits), a_param_W, h0_BW -> (h_BTW, h_last_BW).
Semantics: `kernels.reference` (the pure-JAX references live there and are re-exported here).

What runs is decided where the computation is lowered, not from the host's default backend, so a
CPU host that AOT-compiles for TPU or GPU gets the real kernel (`lax.platform_dependent`):

  impl="auto":   TPU, GPU -> the Pallas kernel;  CPU -> "xla" (`gated_lru_xla`: the scan
                 reference's numbers, in place, with a hand-written VJP).
  impl="pallas", interpret=None: TPU -> Mosaic, GPU -> Triton, CPU -> the Pallas interpreter.

gated_lru_fwd and gated_lru_vjp are the two halves (forward; VJP given the forward's h) for callers
that own the custom VJP, with a run-time `reset` flag: the time-parallel shards of kernels.sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.gated_lru_pallas import gated_lru_pallas, gated_lru_pallas_fwd, gated_lru_pallas_vjp
from kernels.reference import (
  SQRT_MAX_GRADIENT,
  _check_shapes,
  _gates,
  gated_lru_associative,
  gated_lru_scan,
  gated_lru_scan_vjp,
  sqrt_bound_derivative,
)

IMPLS = ("auto", "pallas", "xla", "associative")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gated_lru_xla(x, gate_x, gate_a, a_param, h0, c=8.0):
  """The "xla" impl: gated_lru_scan's numbers, with the recurrence written in place.

  The forward walks time in a fori_loop that overwrites b_t with h_t in b's own buffer, so no
  zero-initialised output buffer exists: lax.scan's stacked output is one such buffer per call,
  which XLA's scheduler creates up front (it has no operands), so a 12-layer forward held all 12
  at once (TRecViT-B, 32 frames, CPU: 1020 MiB temp against 576 MiB in place; docs/benchmarks.md).
  The backward is gated_lru_scan_vjp's, in place the same way (reads h, recomputes the gates).
  """
  return _inplace_forward(x, gate_x, gate_a, a_param, h0, c)


def _inplace_forward(x, gate_x, gate_a, a_param, h0, c):
  a, b = _gates(x, gate_x, gate_a, a_param, c, reset_first=h0 is None)
  h_init = jnp.zeros_like(b[:, 0]) if h0 is None else h0.astype(jnp.float32)
  a_TBW, b_TBW = jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)

  def step(t, carry):
    h, buf_TBW = carry
    h = a_TBW[t] * h + buf_TBW[t]
    return h, buf_TBW.at[t].set(h)

  h_last, h_TBW = jax.lax.fori_loop(0, a_TBW.shape[0], step, (h_init, b_TBW))
  return jnp.swapaxes(h_TBW, 0, 1).astype(x.dtype), h_last.astype(x.dtype)


def _xla_fwd(x, gate_x, gate_a, a_param, h0, c):
  h, h_last = _inplace_forward(x, gate_x, gate_a, a_param, h0, c)
  return (h, h_last), (x, gate_x, gate_a, a_param, h0, h)


def _inplace_vjp(x, gate_x, gate_a, a_param, h0, h, dh, dh_last, c):
  """gated_lru_scan_vjp's numbers; the reverse recurrence of g writes into dh's own buffer."""
  f32 = jnp.float32
  (a, _), gates_vjp = jax.vjp(
    lambda *v: _gates(*v, c, reset_first=h0 is None), x, gate_x, gate_a, a_param
  )
  dh = dh.astype(f32).at[:, -1].add(dh_last.astype(f32))
  a_TBW, buf_TBW = jnp.swapaxes(a, 0, 1), jnp.swapaxes(dh, 0, 1)
  num_steps = a_TBW.shape[0]

  def step(i, carry):  # g_t = dh_t + a_{t+1} g_{t+1}, t = T-1 .. 0
    g_next, buf = carry
    t = num_steps - 1 - i
    g = buf[t] + a_TBW[jnp.minimum(t + 1, num_steps - 1)] * g_next
    return g, buf.at[t].set(g)

  _, g_TBW = jax.lax.fori_loop(0, num_steps, step, (jnp.zeros_like(buf_TBW[0]), buf_TBW))
  g = jnp.swapaxes(g_TBW, 0, 1)
  start = jnp.zeros_like(g[:, :1]) if h0 is None else h0.astype(f32)[:, None]
  h_prev = jnp.concatenate([start, h[:, :-1].astype(f32)], axis=1)
  dx, dgx, dga, dap = gates_vjp((g * h_prev, g))
  return dx, dgx, dga, dap, None if h0 is None else a[:, 0] * g[:, 0]


def _xla_bwd(c, residuals, cotangents):
  x, gate_x, gate_a, a_param, h0, h = residuals
  dh, dh_last = cotangents
  dx, dgx, dga, dap, dh0 = _inplace_vjp(x, gate_x, gate_a, a_param, h0, h, dh, dh_last, c)
  cast = lambda d, like: d.astype(like.dtype)  # noqa: E731
  return (
    cast(dx, x),
    cast(dgx, gate_x),
    cast(dga, gate_a),
    cast(dap, a_param),
    None if h0 is None else cast(dh0, h0),
  )


gated_lru_xla.defvjp(_xla_fwd, _xla_bwd)


def gated_lru(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  *,
  h0: jax.Array | None = None,
  c: float = 8.0,
  impl: str = "auto",
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Gated linear recurrence over time; returns (h [b, t, w], h_last [b, w]) in x's dtype.

  impl: "pallas" (fused kernel), "xla" (lax.scan), "associative" (parallel scan), "auto" (pallas
  when lowered for TPU/GPU, xla when lowered for CPU). interpret (pallas only): None decides per
  lowering platform (interpreted only on CPU); True/False force it.
  """
  if impl not in IMPLS:
    raise ValueError(f"gated_lru: impl must be one of {IMPLS}, got {impl!r}.")
  _check_shapes(x, gate_x, gate_a, a_param, h0)

  def xla():
    return gated_lru_xla(x, gate_x, gate_a, a_param, h0, float(c))

  def pallas():
    return gated_lru_pallas(x, gate_x, gate_a, a_param, h0=h0, c=c, interpret=interpret)

  if impl == "xla":
    return xla()
  if impl == "associative":
    return gated_lru_associative(x, gate_x, gate_a, a_param, h0=h0, c=c)
  if impl == "pallas":
    return pallas()
  # "auto": both are traced, only the lowering platform's branch is lowered and compiled.
  return jax.lax.platform_dependent(cpu=xla, default=pallas)


def gated_lru_fwd(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  h0: jax.Array | None,
  *,
  reset: jax.Array | None = None,
  c: float = 8.0,
  impl: str = "auto",
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """gated_lru's forward for callers that own the backward (gated_lru_vjp); not differentiable.

  reset (with h0): a traced boolean scalar; where true the first step resets as with h0=None.
  impl "associative" runs the scan reference here.
  """
  if impl not in IMPLS:
    raise ValueError(f"gated_lru_fwd: impl must be one of {IMPLS}, got {impl!r}.")
  _check_shapes(x, gate_x, gate_a, a_param, h0)

  def reference():
    return gated_lru_scan(x, gate_x, gate_a, a_param, h0=h0, c=c, reset=reset)

  def pallas():
    return gated_lru_pallas_fwd(
      x, gate_x, gate_a, a_param, h0, reset=reset, c=c, interpret=interpret
    )

  if impl in ("xla", "associative"):
    return reference()
  if impl == "pallas":
    return pallas()
  return jax.lax.platform_dependent(cpu=reference, default=pallas)


def gated_lru_vjp(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  h0: jax.Array | None,
  h: jax.Array,
  dh: jax.Array,
  dh_last: jax.Array,
  *,
  reset: jax.Array | None = None,
  c: float = 8.0,
  impl: str = "auto",
  interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
  """gated_lru's VJP given its output h: (dx, dgate_x, dgate_a, da_param, dh0 or None).

  Both the kernel's backward and the reference one read h_{t-1} from h (nothing is recomputed),
  so h may be any state sequence the recurrence continues from. reset: as in gated_lru_fwd.
  """
  if impl not in IMPLS:
    raise ValueError(f"gated_lru_vjp: impl must be one of {IMPLS}, got {impl!r}.")
  _check_shapes(x, gate_x, gate_a, a_param, h0)

  def reference():
    return gated_lru_scan_vjp(x, gate_x, gate_a, a_param, h0, h, dh, dh_last, c=c, reset=reset)

  def pallas():
    return gated_lru_pallas_vjp(
      x, gate_x, gate_a, a_param, h0, h, dh, dh_last, reset=reset, c=c, interpret=interpret
    )

  if impl in ("xla", "associative"):
    return reference()
  if impl == "pallas":
    return pallas()
  return jax.lax.platform_dependent(cpu=reference, default=pallas)


__all__ = [
  "IMPLS",
  "gated_lru_xla",
  "SQRT_MAX_GRADIENT",
  "gated_lru",
  "gated_lru_associative",
  "gated_lru_fwd",
  "gated_lru_scan",
  "gated_lru_vjp",
  "sqrt_bound_derivative",
]
