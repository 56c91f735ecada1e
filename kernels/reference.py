"""Pure-JAX references of the gated linear recurrence (RG-LRU) and the helpers they share.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW (pre-sigmoid logits), a_param_W, h0_BW -> (h_BTW, h_last_BW).

    a_t = exp(-c * sigmoid(gate_a_t) * softplus(a_param))
    h_t = a_t * h_{t-1} + m_t * sigmoid(gate_x_t) * x_t,   m_t = sqrt(1 - a_t^2)

With h0=None the first step is the start of a video: m_0 = 1 and h_{-1} = 0.

This module imports no kernel: the dispatcher (`kernels.gated_lru`), the Pallas kernel and the
sharded entry point all build on it, never the other way round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The official model bounds d sqrt(x)/dx by this value (it clips x from below at 1/(4 g^2)).
SQRT_MAX_GRADIENT = 1000.0


@jax.custom_jvp
def sqrt_bound_derivative(x: jax.Array) -> jax.Array:
  """sqrt(x) whose derivative is bounded by SQRT_MAX_GRADIENT (avoids NaN/inf in bf16)."""
  return jnp.sqrt(x)


@sqrt_bound_derivative.defjvp
def _sqrt_bound_derivative_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  safe_x = jnp.maximum(x, 1.0 / (4.0 * SQRT_MAX_GRADIENT**2))
  return jnp.sqrt(x), 0.5 * x_dot / jnp.sqrt(safe_x)


def _gates(x, gate_x, gate_a, a_param, c, reset_first):
  """Returns (a_BTW, b_BTW) in float32 with h_t = a_t * h_{t-1} + b_t.

  reset_first: a bool, or a traced boolean scalar (the time-parallel shards' `reset`).
  """
  f32 = jnp.float32
  x, gate_x, gate_a, a_param = (v.astype(f32) for v in (x, gate_x, gate_a, a_param))
  log_a = -c * jax.nn.sigmoid(gate_a) * jax.nn.softplus(a_param)[None, None]
  a = jnp.exp(log_a)
  multiplier = sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a))
  if reset_first is True:
    multiplier = multiplier.at[:, 0].set(1.0)
  elif reset_first is not False:
    multiplier = multiplier.at[:, 0].set(jnp.where(reset_first, 1.0, multiplier[:, 0]))
  return a, multiplier * jax.nn.sigmoid(gate_x) * x


def _check_shapes(x, gate_x, gate_a, a_param, h0):
  if x.ndim != 3:
    raise ValueError(f"gated_lru: x must be [batch, time, width], got shape {x.shape}.")
  for name, v in (("gate_x", gate_x), ("gate_a", gate_a)):
    if v.shape != x.shape:
      raise ValueError(f"gated_lru: {name} must have the shape of x {x.shape}, got {v.shape}.")
  if a_param.shape != (x.shape[2],):
    raise ValueError(f"gated_lru: a_param must be [width]=({x.shape[2]},), got {a_param.shape}.")
  if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
    raise ValueError(
      f"gated_lru: h0 must be [batch, width]=({x.shape[0]}, {x.shape[2]}), got {h0.shape}."
    )


def _reset(h0, reset):
  """reset_first for _gates: True with h0=None, else the traced `reset` (or False)."""
  if reset is not None and h0 is None:
    raise ValueError("gated_lru: reset goes with h0 (with h0=None the first step always resets).")
  return h0 is None or (False if reset is None else reset)


def _start(h0, reset, like_BW):
  """h_{-1} in float32: zeros with h0=None or where reset is true, else h0."""
  # zeros_like, not jnp.zeros: under shard_map the carry must vary over the same mesh axes as the
  # inputs (check_vma), which a fresh constant does not.
  if h0 is None:
    return jnp.zeros_like(like_BW)
  h0 = h0.astype(jnp.float32)
  return h0 if reset is None else jnp.where(reset, 0.0, h0)


def gated_lru_scan(x, gate_x, gate_a, a_param, *, h0=None, c=8.0, reset=None):
  """Reference: a sequential lax.scan over time with a float32 carry.

  reset (with h0): a traced boolean scalar; where true the first step resets as with h0=None.
  """
  a, b = _gates(x, gate_x, gate_a, a_param, c, reset_first=_reset(h0, reset))
  h_init = _start(h0, reset, b[:, 0])

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  h_last, h_TBW = jax.lax.scan(step, h_init, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
  return jnp.swapaxes(h_TBW, 0, 1).astype(x.dtype), h_last.astype(x.dtype)


def gated_lru_scan_vjp(x, gate_x, gate_a, a_param, h0, h, dh, dh_last, *, c=8.0, reset=None):
  """gated_lru_scan's VJP given its output h: (dx, dgate_x, dgate_a, da_param, dh0 or None).

  With h_t = a_t h_{t-1} + b_t and g_t = dh_t + a_{t+1} g_{t+1} (g_{T-1} = dh_{T-1} + dh_last):
  d a_t = g_t h_{t-1}, d b_t = g_t, d h0 = a_0 g_0; the gates' own VJP does the rest. It reads
  h_{t-1} from h, as the kernel's backward does, so a caller may hand in any h the recurrence
  continues from (the time-parallel shards do).
  """
  f32 = jnp.float32
  reset_first = _reset(h0, reset)
  (a, _), gates_vjp = jax.vjp(
    lambda *v: _gates(*v, c, reset_first=reset_first), x, gate_x, gate_a, a_param
  )
  dh = dh.astype(f32).at[:, -1].add(dh_last.astype(f32))
  a_next = jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)

  def step(g_next, a_dh):
    a_n, dh_t = a_dh
    g = dh_t + a_n * g_next
    return g, g

  g_init = jnp.zeros_like(dh[:, 0])
  _, g_TBW = jax.lax.scan(
    step, g_init, (jnp.swapaxes(a_next, 0, 1), jnp.swapaxes(dh, 0, 1)), reverse=True
  )
  g = jnp.swapaxes(g_TBW, 0, 1)
  h_prev = jnp.concatenate([_start(h0, reset, g[:, 0])[:, None], h[:, :-1].astype(f32)], axis=1)
  dx, dgx, dga, dap = gates_vjp((g * h_prev, g))
  if h0 is None:
    return dx, dgx, dga, dap, None
  dh0 = a[:, 0] * g[:, 0]
  if reset is not None:
    dh0 = jnp.where(reset, 0.0, dh0)
  return dx, dgx, dga, dap, dh0.astype(h0.dtype)


def gated_lru_associative(x, gate_x, gate_a, a_param, *, h0=None, c=8.0):
  """Baseline: a parallel associative scan over time (O(T log T) work, log-depth)."""
  a, b = _gates(x, gate_x, gate_a, a_param, c, reset_first=h0 is None)
  if h0 is not None:
    b = b.at[:, 0].add(a[:, 0] * h0.astype(jnp.float32))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
  return h.astype(x.dtype), h[:, -1].astype(x.dtype)


__all__ = [
  "SQRT_MAX_GRADIENT",
  "gated_lru_associative",
  "gated_lru_scan",
  "gated_lru_scan_vjp",
  "sqrt_bound_derivative",
]
