"""The gated linear recurrence of the RG-LRU: the dispatcher over its implementations.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW (pre-sigmoid logits), a_param_W, h0_BW -> (h_BTW, h_last_BW).
Semantics: `kernels.reference` (the pure-JAX references live there and are re-exported here).

What runs is decided where the computation is lowered, not from the host's default backend, so a
CPU host that AOT-compiles for TPU or GPU gets the real kernel (`lax.platform_dependent`):

  impl="auto":   TPU, GPU -> the Pallas kernel;  CPU -> the lax.scan reference.
  impl="pallas", interpret=None: TPU -> Mosaic, GPU -> Triton, CPU -> the Pallas interpreter.

gated_lru_fwd and gated_lru_vjp are the two halves (forward; VJP given the forward's h) for callers
that own the custom VJP, with a run-time `reset` flag: the time-parallel shards of kernels.sharded.
"""

from __future__ import annotations

import jax

from kernels.gated_lru_pallas import gated_lru_pallas, gated_lru_pallas_fwd, gated_lru_pallas_vjp
from kernels.reference import (
  SQRT_MAX_GRADIENT,
  _check_shapes,
  gated_lru_associative,
  gated_lru_scan,
  gated_lru_scan_vjp,
  sqrt_bound_derivative,
)

IMPLS = ("auto", "pallas", "xla", "associative")


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
    return gated_lru_scan(x, gate_x, gate_a, a_param, h0=h0, c=c)

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
  "SQRT_MAX_GRADIENT",
  "gated_lru",
  "gated_lru_associative",
  "gated_lru_fwd",
  "gated_lru_scan",
  "gated_lru_vjp",
  "sqrt_bound_derivative",
]
