"""The gated linear recurrence of the RG-LRU: dispatcher and pure-JAX implementations.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW (pre-sigmoid logits), a_param_W, h0_BW -> (h_BTW, h_last_BW).

    a_t = exp(-c * sigmoid(gate_a_t) * softplus(a_param))
    h_t = a_t * h_{t-1} + m_t * sigmoid(gate_x_t) * x_t,   m_t = sqrt(1 - a_t^2)

With h0=None the first step is the start of a video: m_0 = 1 and h_{-1} = 0.
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
  """Returns (a_BTW, b_BTW) in float32 with h_t = a_t * h_{t-1} + b_t."""
  f32 = jnp.float32
  x, gate_x, gate_a, a_param = (v.astype(f32) for v in (x, gate_x, gate_a, a_param))
  log_a = -c * jax.nn.sigmoid(gate_a) * jax.nn.softplus(a_param)[None, None]
  a = jnp.exp(log_a)
  multiplier = sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a))
  if reset_first:
    multiplier = multiplier.at[:, 0].set(1.0)
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


def gated_lru_scan(x, gate_x, gate_a, a_param, *, h0=None, c=8.0):
  """Reference: a sequential lax.scan over time with a float32 carry."""
  a, b = _gates(x, gate_x, gate_a, a_param, c, reset_first=h0 is None)
  # zeros_like(b[:, 0]), not jnp.zeros: under shard_map the carry must vary over the same mesh
  # axes as the inputs (check_vma), which a fresh constant does not.
  h_init = jnp.zeros_like(b[:, 0]) if h0 is None else h0.astype(jnp.float32)

  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  h_last, h_TBW = jax.lax.scan(step, h_init, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
  return jnp.swapaxes(h_TBW, 0, 1).astype(x.dtype), h_last.astype(x.dtype)


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


def _default_impl() -> str:
  return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"


def gated_lru(x, gate_x, gate_a, a_param, *, h0=None, c=8.0, impl="auto", interpret=None):
  """Gated linear recurrence over time; returns (h [b, t, w], h_last [b, w]).

  impl: "pallas" (fused kernel), "xla" (lax.scan), "associative" (parallel scan),
  "auto" (pallas on TPU/GPU, xla on CPU).
  """
  _check_shapes(x, gate_x, gate_a, a_param, h0)
  if impl == "auto":
    impl = _default_impl()
  if impl == "xla":
    return gated_lru_scan(x, gate_x, gate_a, a_param, h0=h0, c=c)
  if impl == "associative":
    return gated_lru_associative(x, gate_x, gate_a, a_param, h0=h0, c=c)
  if impl == "pallas":
    from kernels import gated_lru_pallas  # noqa: PLC0415 (keeps pallas out of CPU-only imports)

    return gated_lru_pallas.gated_lru_pallas(
      x, gate_x, gate_a, a_param, h0=h0, c=c, interpret=interpret
    )
  raise ValueError(
    f"gated_lru: impl must be 'pallas', 'xla', 'associative' or 'auto', got {impl!r}."
  )


__all__ = ["gated_lru", "gated_lru_scan", "gated_lru_associative", "sqrt_bound_derivative"]
