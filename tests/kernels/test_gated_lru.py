"""Parity of the gated-LRU implementations with the lax.scan reference (values and gradients).

The Pallas kernel runs in interpret mode on CPU, with the TPU blocking (chunked sublane scan,
time grid) and the GPU blocking (power-of-two blocks, one step at a time).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels.gated_lru import gated_lru_associative, gated_lru_fwd, gated_lru_scan, gated_lru_vjp
from kernels.gated_lru_pallas import (
  _gpu_plan,
  _tpu_plan,
  gated_lru_pallas,
  gated_lru_pallas_fwd,
  gated_lru_pallas_vjp,
)
from kernels.reference import gated_lru_scan_vjp

BF16, F32 = jnp.bfloat16, jnp.float32


def _pallas(backend):
  return functools.partial(gated_lru_pallas, interpret=True, backend=backend)


def _with_h0(fn):
  """fn(x, gx, ga, a_param, h0) positional, as jax.vjp needs."""
  return lambda x, gx, ga, ap, h0=None: fn(x, gx, ga, ap, h0=h0)


def _check_against_scan(fn, args, tol, values_and_grads, assert_close):
  want = values_and_grads(_with_h0(gated_lru_scan), args)
  got = values_and_grads(_with_h0(fn), args)
  assert_close(got[0], want[0], tol, "(h, h_last)")
  assert_close(got[1], want[1], tol, "grads (x, gate_x, gate_a, a_param[, h0])")


# Each case: (batch, time, width, dtype, with h0). Batches 3, 5, 9 are no multiple of any block
# (TPU 8, GPU 4); time 1 and 7 are shorter than a sublane tile, 33 pads the last one; width 40
# and 96 are narrower than a lane tile, 130 and 1536 span several width blocks / lane groups.
CASES = [
  (3, 1, 40, F32, False),
  (5, 7, 96, F32, True),
  (9, 33, 1536, F32, False),
  (9, 33, 130, BF16, True),
]
SLOW_CASES = [
  (3, 1, 40, BF16, True),
  (5, 7, 96, BF16, False),
]


def _case_id(case):
  b, t, w, dtype, h0 = case
  return f"b{b}-t{t}-w{w}-{jnp.dtype(dtype).name}-{'h0' if h0 else 'reset'}"


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize(
  "case",
  CASES + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES],
  ids=_case_id,
)
def test_pallas_matches_scan(backend, case, make_inputs, values_and_grads, assert_close, tol):
  batch, time, width, dtype, h0 = case
  args = make_inputs(batch, time, width, dtype, h0=h0)
  _check_against_scan(_pallas(backend), args, tol(dtype), values_and_grads, assert_close)


@pytest.mark.slow
@pytest.mark.parametrize("h0", [False, True])
def test_pallas_several_time_blocks(h0, make_inputs, values_and_grads, assert_close, tol):
  """T = 300 > 128: three TPU time blocks, carry in scratch, h_{t-1} across block edges."""
  plan = _tpu_plan(3, 300, 40, 4)
  assert plan.num_t_blocks == 3 and plan.padded_time
  args = make_inputs(3, 300, 40, F32, h0=h0)
  _check_against_scan(_pallas("tpu"), args, tol(F32), values_and_grads, assert_close)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_sqrt_derivative_is_bounded(
  backend, make_inputs, values_and_grads, assert_close, tol
):
  """gate_a -> -inf makes a -> 1 and 1 - a^2 -> 0: the bounded sqrt derivative must match."""
  x, gx, ga, ap, h0 = make_inputs(4, 9, 40, F32, h0=True)
  ga = ga.at[:, :, ::2].set(-30.0)  # log_a ~ -1e-12: u == 0 in float32
  ga = ga.at[:, :, 1::4].set(-16.0)  # log_a ~ -1e-6: u ~ 1e-6, near the bound 2.5e-7
  args = (x, gx, ga, ap, h0)
  _check_against_scan(_pallas(backend), args, tol(F32), values_and_grads, assert_close)


@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("shape", [(3, 1, 40), (5, 33, 96)])
def test_associative_matches_scan(shape, h0, make_inputs, values_and_grads, assert_close, tol):
  args = make_inputs(*shape, F32, h0=h0)
  _check_against_scan(gated_lru_associative, args, tol(F32), values_and_grads, assert_close)


@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("shape", [(3, 1, 40), (5, 33, 96)])
def test_xla_impl_matches_scan(shape, h0, make_inputs, values_and_grads, assert_close, tol):
  """The in-place forward and backward of impl="xla" compute the scan's values and gradients."""
  args = make_inputs(*shape, F32, h0=h0)
  fn = functools.partial(kernels.gated_lru, impl="xla")
  _check_against_scan(fn, args, tol(F32), values_and_grads, assert_close)


def test_xla_impl_has_no_stacked_output_buffer(make_inputs):
  """Six layers in a row: lax.scan's zero-initialised output buffers are all created up front
  (measured: 9.1 arrays of temp), the in-place forward keeps temp flat (3.1)."""
  args = make_inputs(8, 64, 256, F32)[:4]

  def temp_in_arrays(fn):
    def layers(x, gx, ga, ap):
      for _ in range(6):
        x = jnp.tanh(fn(x, gx, ga, ap)[0])
      return x

    compiled = jax.jit(layers).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (8 * 64 * 256 * 4)

  in_place = temp_in_arrays(functools.partial(kernels.gated_lru, impl="xla"))
  assert in_place < 4.0 and temp_in_arrays(gated_lru_scan) > in_place + 4.0


def test_dispatcher_default_args_on_cpu(make_inputs, values_and_grads, assert_close, tol):
  """Lowered for CPU, default arguments run: "auto" is the scan, "pallas" the interpreter."""
  args = make_inputs(3, 5, 40, F32)[:4]
  assert jax.default_backend() == "cpu"
  want = values_and_grads(gated_lru_scan, args)
  for impl, kernel_names in (("auto", 0), ("pallas", 2)):
    fn = functools.partial(kernels.gated_lru, impl=impl)
    assert_close(values_and_grads(fn, args), want, tol(F32), impl)
    loss = lambda *a, fn=fn: jnp.sum(fn(*a)[0])
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()
    # The kernels' names reach the compiled HLO's metadata only through the interpreter.
    assert len(set(re.findall(r"gated_lru_(?:fwd|bwd)_tpu", text))) == kernel_names, impl
  with pytest.raises(ValueError, match="impl"):
    kernels.gated_lru(*args, impl="cuda")


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu"])
def test_fwd_and_vjp_with_a_run_time_reset(impl, make_inputs, assert_close, tol):
  """The forward / backward calls of the time-parallel shards, with a traced reset flag: True is
  the h0=None recurrence, False the h0 one; the VJP reads h_{t-1} from the given h."""
  x, gx, ga, ap, h0 = make_inputs(5, 9, 130, F32, h0=True)
  k = jax.random.split(jax.random.key(7), 2)
  cts = (jax.random.normal(k[0], x.shape), jax.random.normal(k[1], h0.shape))
  if impl == "xla":
    fwd_fn, vjp_fn = functools.partial(gated_lru_fwd, impl="xla"), gated_lru_vjp
  else:  # the kernel in both blockings, interpreted
    opts = dict(backend=impl, interpret=True)
    fwd_fn = functools.partial(gated_lru_pallas_fwd, **opts)
    vjp_fn = functools.partial(gated_lru_pallas_vjp, **opts)
  fwd = jax.jit(lambda *a: fwd_fn(*a[:5], reset=a[5]))
  vjp = jax.jit(lambda *a: vjp_fn(*a[:8], reset=a[8]))
  reset_scan = jax.jit(lambda *a: jax.vjp(gated_lru_scan, *a[:4])[1](cts))
  h0_scan = jax.jit(lambda *a: jax.vjp(lambda *b: gated_lru_scan(*b[:4], h0=b[4]), *a)[1](cts))
  for reset in (False, True):
    out = gated_lru_scan(x, gx, ga, ap, h0=None if reset else h0)
    if reset:
      want_grads = (*reset_scan(x, gx, ga, ap), jnp.zeros_like(h0))
    else:
      want_grads = h0_scan(x, gx, ga, ap, h0)
    assert_close(fwd(x, gx, ga, ap, h0, reset), out, tol(F32), f"fwd reset={reset}")
    grads = vjp(x, gx, ga, ap, h0, out[0], *cts, reset)
    assert_close(grads, want_grads, tol(F32), f"vjp reset={reset}")


@pytest.mark.parametrize("h0", [False, True])
def test_scan_vjp_from_h_matches_autodiff(h0, make_inputs, assert_close, tol):
  x, gx, ga, ap, h0_BW = make_inputs(3, 7, 40, F32, h0=h0)
  args = (x, gx, ga, ap) + (() if h0_BW is None else (h0_BW,))

  def scan(x, gx, ga, ap, *h0_):
    return gated_lru_scan(x, gx, ga, ap, h0=h0_[0] if h0_ else None)

  @jax.jit
  def both(*args):
    (h, h_last), pullback = jax.vjp(scan, *args)
    cts = (jnp.cos(h), jnp.sin(h_last))
    got = gated_lru_scan_vjp(x, gx, ga, ap, h0_BW, h, *cts)
    return [g for g in got if g is not None], pullback(cts)

  assert_close(*both(*args), tol(F32), f"h0={h0}")


def test_reset_only_touches_the_first_step(make_inputs):
  """h0=None equals h0=0 except at t=0, where m = 1 (the start of a video)."""
  x, gx, ga, ap, _ = make_inputs(2, 6, 40, F32)
  h_reset, _ = _pallas("tpu")(x, gx, ga, ap)
  # With m_0 = 1 the first state is the gated input itself.
  assert jnp.allclose(h_reset[:, 0], jax.nn.sigmoid(gx[:, 0]) * x[:, 0], atol=1e-6)
  h_zero, _ = _pallas("tpu")(x, gx, ga, ap, h0=jnp.zeros((2, 40)))
  assert not jnp.allclose(h_reset[:, 0], h_zero[:, 0])


def test_causal_gradients(make_inputs):
  """h_t does not depend on inputs after t (checked through the kernel's backward)."""
  x, gx, ga, ap, h0 = make_inputs(2, 12, 40, F32, h0=True)
  t = 4
  grads = jax.grad(
    lambda x, gx, ga: jnp.sum(_pallas("tpu")(x, gx, ga, ap, h0=h0)[0][:, t]), argnums=(0, 1, 2)
  )(x, gx, ga)
  for g in grads:
    assert jnp.all(g[:, t + 1 :] == 0) and jnp.any(g[:, : t + 1] != 0)


def test_plans_respect_hardware_tiles():
  """TPU blocks are whole (8, 128) tiles or whole dims; GPU blocks are powers of two."""
  pow2 = lambda n: n & (n - 1) == 0
  for b, t, w, itemsize in [(1576, 64, 1536, 4), (1576, 8, 768, 2), (9, 33, 130, 4), (3, 1, 40, 2)]:
    p = _tpu_plan(b, t, w, itemsize)
    assert p.block_b == b or p.block_b % 8 == 0
    assert p.block_t == t or p.block_t % 8 == 0
    assert p.block_w == w or p.block_w % 128 == 0
    assert p.block_w % p.lanes == 0 and p.block_t % p.sub == 0
    assert p.block_b * p.block_t * p.block_w * itemsize <= 512 * 1024 or p.block_w <= 128
    g = _gpu_plan(b, t, w)
    assert all(pow2(n) for n in (g.block_b, g.block_t, g.block_w)) and g.num_t_blocks == 1
