"""Shared helpers for the kernel tests: random LRU inputs, values + all gradients, tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Decided once (STYLE.md #10): fp32 kernels match the float32 reference to 1e-5, bf16 to 2e-2,
# as |actual - expected| <= tol * (1 + |expected|) for values and for every gradient.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def _inputs(batch, time, width, dtype=jnp.float32, *, h0=False, seed=0, gate_scale=2.0):
  """(x, gate_x, gate_a, a_param, h0 or None) with gates spread enough to saturate sigmoids."""
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (batch, time, width)).astype(dtype)
  gate_x = (gate_scale * jax.random.normal(k[1], (batch, time, width))).astype(dtype)
  gate_a = (gate_scale * jax.random.normal(k[2], (batch, time, width))).astype(dtype)
  # softplus(a_param) in ~[0.05, 3]: a from ~0.67 (slow decay) to ~0 (fast), as after training.
  a_param = jax.random.uniform(k[3], (width,), minval=-3.0, maxval=3.0)
  h0_BW = jax.random.normal(k[4], (batch, width)).astype(dtype) if h0 else None
  return x, gate_x, gate_a, a_param, h0_BW


def _values_and_grads(fn, args):
  """((h, h_last), grads of <h, ct_h> + <h_last, ct_last> w.r.t. every non-None arg)."""
  x = args[0]
  k = jax.random.split(jax.random.key(42), 2)
  ct_h = jax.random.normal(k[0], x.shape).astype(x.dtype)
  ct_last = jax.random.normal(k[1], (x.shape[0], x.shape[2])).astype(x.dtype)

  @jax.jit
  def run(args, ct_h, ct_last):
    out, vjp = jax.vjp(lambda *a: fn(*a), *args)
    return out, vjp((ct_h, ct_last))

  out, grads = run(args, ct_h, ct_last)
  return out, tuple(g for g in grads if g is not None)


def _assert_close(actual, expected, tol, what=""):
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)):
    assert a.shape == e.shape and a.dtype == e.dtype, (what, i, a.shape, e.shape, a.dtype, e.dtype)
    a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
    assert np.all(np.isfinite(a)), f"{what}[{i}]: non-finite values"
    err = np.max(np.abs(a - e) / (1.0 + np.abs(e)), initial=0.0)
    assert err <= tol, f"{what}[{i}]: max |a - e| / (1 + |e|) = {err:.3g} > {tol}"


@pytest.fixture
def make_inputs():
  return _inputs


@pytest.fixture
def values_and_grads():
  return _values_and_grads


@pytest.fixture
def assert_close():
  return _assert_close


@pytest.fixture
def tol():
  """tol(dtype): the parity tolerance for that input dtype."""
  return lambda dtype: TOL[jnp.dtype(dtype)]
