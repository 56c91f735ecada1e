"""Fused Pallas kernels for the gated LRU: forward, and a reverse-time backward under custom_vjp.

Shapes: x_BTW, gate_x_BTW, gate_a_BTW (pre-sigmoid logits), a_param_W, h0_BW (optional)
  -> (h_BTW, h_last_BW), both in x's dtype. Semantics are those of `gated_lru_scan`.

Forward kernel: reads x, both gate logits and a_param, writes h and h_last. Gate sigmoids,
a = exp(-c * sigmoid(gate_a) * softplus(a_param)), m = sqrt(1 - a^2), the first-step reset and
the recurrence all happen in the kernel, with a float32 carry.

Backward kernel: runs in reverse time, reads x, the gate logits, a_param, the saved h (for
h_{t-1}) and the cotangents; it recomputes a, m and the gates instead of storing them. It writes
dx, dgate_x, dgate_a, a per-(batch, width) partial of the a_param gradient (summed over time; the
batch sum is one small XLA reduce) and dh0. d sqrt(u)/du uses max(u, 1/(4 * 1000^2)) like the
official model (`sqrt_bound_derivative`).

Layout. Arrays stay [batch, time, width] (no transposes, no padding copies). The grid is
(batch blocks, width blocks, time blocks); a block is (block_b, block_t, block_w) and the kernel
walks time inside it, `sub` time steps at a time:
  * TPU (Mosaic): the last two block dims are (time, width), tiled (8, 128) in VMEM. One step
    loads an (block_b, 8, 128k) chunk: 8 time steps are the 8 sublanes of a vreg, so every op runs
    on full vregs; the recurrence inside the chunk is a 3-level log-step scan over sublanes
    (`pltpu.roll`), then h = A * h_carry + B. Time blocks are a sequential ("arbitrary") grid axis
    with the carry in VMEM scratch; width is processed in 128-lane groups to bound live vregs.
  * GPU (Triton): blocks must be powers of two; a program owns (block_b, all of time, block_w)
    and steps one time step at a time ((block_b, 1, block_w) rows, coalesced along width).
Edge blocks (batch, width or time not a multiple of the block) read padding that the kernel
masks where it could leak into a carry or a reduction, and Pallas drops out-of-bounds writes.

The TPU or GPU variant, and whether to interpret, are chosen when lowering
(`lax.platform_dependent`): TPU -> Mosaic, GPU -> Triton, CPU -> the Pallas interpreter (with the
TPU blocking). So a CPU host AOT-compiling for TPU gets the Mosaic kernel with default arguments.
`backend="tpu"|"gpu"` forces a blocking and `interpret=True|False` forces the interpreter on or
off (tests run both blockings in interpret mode).

Reset. With h0=None the first step resets (m_0 = 1, h_{-1} = 0), fixed at trace time. The
time-parallel shards (kernels.sharded) need it decided at run time (only the first time shard
starts the video) with one program on every shard: `gated_lru_pallas_fwd` / `_vjp` take
`reset`, a traced boolean, which travels as row 1 of the [2, W] a_param block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels.reference import SQRT_MAX_GRADIENT, _check_shapes

_F32 = jnp.float32
# d sqrt(u)/du = 0.5 / sqrt(max(u, _SQRT_U_MIN)) <= SQRT_MAX_GRADIENT, as in the official model.
_SQRT_U_MIN = 1.0 / (4.0 * SQRT_MAX_GRADIENT**2)

# TPU: bytes of one array's block in VMEM. With double buffering the backward (8 blocked arrays)
# uses ~16x this, which stays under the 16 MiB default scoped VMEM of every TPU generation.
_TPU_BLOCK_BYTES = 512 * 1024
_TPU_MAX_BLOCK_T = 128  # longer sequences use several time blocks (carry in VMEM scratch)
_TPU_LANES = 128  # width processed per inner step: block_b x 8 x 128 = block_b vregs per value
# GPU: one program handles block_b x block_w elements per time step (8 per thread at 4 warps).
_GPU_BLOCK_B = 4
_GPU_BLOCK_W = 256
_GPU_NUM_WARPS = 4
_GPU_UNROLL = 8
# Chunk loops with at most this many iterations are unrolled in Python (static offsets).
_MAX_UNROLL = 8
# The kernels' `reset` when it is decided at run time: h0 is given and row 1 of the a_param block
# holds a per-lane flag (1.0: the first step resets, h0 is ignored). Time-parallel shards use it.
_FLAG = "flag"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static blocking of one call: grid (cdiv(B, block_b), cdiv(W, block_w), num_t_blocks)."""

  backend: str  # "tpu" | "gpu"
  seq_len: int  # the true T
  block_b: int
  block_t: int
  block_w: int
  lanes: int  # width of one inner step (a divisor of block_w)
  sub: int  # time steps per inner step (the chunk)
  num_t_blocks: int
  # Time-loop unroll: on GPU it lets the compiler issue the loads of several steps ahead of the
  # carried recurrence (memory-level parallelism); TPU chunks are already large.
  unroll: int = 1

  @property
  def num_chunks(self) -> int:
    """Chunks walked per time block: with one block, only those that hold real time steps."""
    if self.num_t_blocks == 1:
      return pl.cdiv(self.seq_len, self.sub)
    return self.block_t // self.sub

  @property
  def padded_time(self) -> bool:
    """Whether some walked rows lie past the end of time (they must not touch the carry)."""
    walked = (self.num_t_blocks - 1) * self.block_t + self.num_chunks * self.sub
    return walked != self.seq_len

  def grid(self, batch: int, width: int) -> tuple[int, int, int]:
    return (pl.cdiv(batch, self.block_b), pl.cdiv(width, self.block_w), self.num_t_blocks)


def _tpu_plan(batch: int, seq_len: int, width: int, itemsize: int) -> _Plan:
  """(block_b, block_t, block_w) with (time, width) blocks in whole (8, 128) tiles."""
  block_b = min(batch, 8)  # a multiple of 8, or all of batch: the [B, W] refs need that
  if seq_len < 8:
    # Shorter than one sublane tile: the block is all of time, stepped one row at a time.
    block_t, sub, num_t_blocks = seq_len, 1, 1
  else:
    num_t_blocks = pl.cdiv(seq_len, _TPU_MAX_BLOCK_T)
    block_t = pl.cdiv(pl.cdiv(seq_len, num_t_blocks), 8) * 8  # at most 7 padded rows per block
    sub = 8
  max_w = max(_TPU_LANES, _TPU_BLOCK_BYTES // (itemsize * block_b * block_t))
  if width <= max_w:
    block_w = width  # the whole width is always a legal block dim, also when not 128-aligned
  else:
    # The multiple of 128 that wastes the least padding in the last width block, then the widest.
    cands = range(_TPU_LANES, max_w // _TPU_LANES * _TPU_LANES + 1, _TPU_LANES)
    block_w = min(cands, key=lambda bw: (pl.cdiv(width, bw) * bw, -bw))
  lanes = _TPU_LANES if block_w % _TPU_LANES == 0 else block_w
  return _Plan("tpu", seq_len, block_b, block_t, block_w, lanes, sub, num_t_blocks)


def _gpu_plan(batch: int, seq_len: int, width: int) -> _Plan:
  """Power-of-two blocks; one program walks all of time (grid programs do not run in order)."""
  block_b = min(_GPU_BLOCK_B, pl.next_power_of_2(batch))
  block_w = min(_GPU_BLOCK_W, pl.next_power_of_2(width))
  block_t = pl.next_power_of_2(seq_len)
  return _Plan("gpu", seq_len, block_b, block_t, block_w, block_w, 1, 1, unroll=_GPU_UNROLL)


def _compiler_params(plan: _Plan):
  if plan.backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  return pltriton.CompilerParams(num_warps=_GPU_NUM_WARPS, num_stages=2)


# ----------------------------------------------------------------------------- in-kernel helpers


def _softplus(v):
  return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))


def _loop(n: int, body, carry, *, reverse: bool = False, unroll: int = 1):
  """body(i, carry) for i in range(n) (reversed if asked); static i when unrolled.

  Unrolling is done here, not with fori_loop(unroll=...), which the Triton lowering rejects.
  """
  if n <= _MAX_UNROLL:
    for i in range(n - 1, -1, -1) if reverse else range(n):
      carry = body(i, carry)
    return carry
  steps, rest = divmod(n, unroll)

  def unrolled(s, c):
    for k in range(unroll):
      c = body(n - 1 - (s * unroll + k) if reverse else s * unroll + k, c)
    return c

  carry = jax.lax.fori_loop(0, steps, unrolled, carry)
  for i in range(rest - 1, -1, -1) if reverse else range(n - rest, n):  # the leftover steps
    carry = body(i, carry)
  return carry


def _lane_loop(plan: _Plan, body) -> None:
  """body(g, 0) per lane group. Groups are independent, so a rolled loop loses no overlap that
  matters (each iteration is a full chunk pipeline) and keeps the kernel (and compile) small."""
  n = plan.block_w // plan.lanes
  if n == 1:
    body(0, 0)
  else:
    jax.lax.fori_loop(0, n, body, 0)


def _aligned(i, size: int):
  """i * size as a ref offset; tells Mosaic it is tile-aligned when i is traced."""
  return i * size if isinstance(i, int) else pl.multiple_of(i * size, size)


def _lane_slice(plan: _Plan, g):
  return pl.ds(_aligned(g, plan.lanes), plan.lanes)


def _row_iota(shape):
  return jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _scan_chunk(a, b, carry):
  """h_i = a_i h_{i-1} + b_i along axis 1 (the chunk's time steps), h_{-1} = carry (broadcast).

  A log-step (Hillis-Steele) scan over sublanes: log2(sub) rounds of roll + fma on full vregs.
  """
  n = a.shape[1]
  row = _row_iota(a.shape) if n > 1 else None
  d = 1
  while d < n:
    keep = row >= d  # rows i >= d combine with row i - d
    a_prev = pltpu.roll(a, d, 1)
    b_prev = pltpu.roll(b, d, 1)
    b = jnp.where(keep, a * b_prev + b, b)
    a = jnp.where(keep, a * a_prev, a)
    d *= 2
  return a * carry + b


def _reverse_scan_chunk(a_next, dh, carry):
  """g_i = dh_i + a_next_i g_{i+1} along axis 1, where the last row's a_next_{n-1} g_n is carry.

  The caller sets a_next_{n-1} = 1; the scan mirrors _scan_chunk towards lower rows.
  """
  n = dh.shape[1]
  row = _row_iota(dh.shape) if n > 1 else None
  d = 1
  while d < n:
    keep = row < n - d  # rows i < n - d combine with row i + d
    g_next = pltpu.roll(dh, n - d, 1)
    a_nn = pltpu.roll(a_next, n - d, 1)
    dh = jnp.where(keep, dh + a_next * g_next, dh)
    a_next = jnp.where(keep, a_next * a_nn, a_next)
    d *= 2
  return dh + a_next * carry


def _last_row(v):
  n = v.shape[1]
  return jnp.broadcast_to(v[:, n - 1 : n, :], v.shape)


def _first_row(v):
  return jnp.broadcast_to(v[:, 0:1, :], v.shape)


def _to_rows(v_BW, shape):
  """[block_b, lanes] -> broadcast over the chunk's time rows [block_b, sub, lanes]."""
  return jnp.broadcast_to(v_BW.reshape(shape[0], 1, shape[2]), shape)


def _from_rows(v):
  """[block_b, sub, lanes] whose rows are equal -> [block_b, lanes]."""
  return v[:, 0:1, :].reshape(v.shape[0], v.shape[2])


def _reset_flag(ap_ref, ls, reset, sub, lanes):
  """The reset of this lane group: True/False (static), or its [1, sub, lanes] float flag rows
  (1.0: the first step resets) from row 1 of the a_param block in the flagged mode."""
  if reset != _FLAG:
    return reset
  return _to_rows(ap_ref[1:2, ls].astype(_F32), (1, sub, lanes))


def _reset_rows(t_rows, flag):
  """Rows whose step resets (m = 1, h_{-1} unused), or None when no row does."""
  if flag is False:
    return None
  if flag is True:
    return t_rows == 0
  return jnp.where(t_rows == 0, flag, 0.0) > 0.5


def _gates(gx, ga, ncsp, reset_rows):
  """(a, a^2, s_a, s_x, u = 1 - a^2, m) of one chunk in float32; reset_rows: where m = 1.

  a^2 is exp(2 log_a), as in the reference and the official model, not a * a: where a -> 1 the
  two round differently and m = sqrt(1 - a^2) would differ by far more than an ulp.
  """
  s_a = jax.nn.sigmoid(ga)
  log_a = ncsp * s_a
  a = jnp.exp(log_a)
  a2 = jnp.exp(2.0 * log_a)
  u = 1.0 - a2
  m = jnp.sqrt(u)
  if reset_rows is not None:
    m = jnp.where(reset_rows, 1.0, m)
  return a, a2, s_a, jax.nn.sigmoid(gx), u, m


# ---------------------------------------------------------------------------------- forward kernel


def _fwd_kernel(*refs, plan: _Plan, c: float, reset: bool | str):
  x_ref, gx_ref, ga_ref, ap_ref, *refs = refs
  h0_ref = None if reset is True else refs.pop(0)
  h_ref, hl_ref, *scratch = refs
  kt = pl.program_id(2)
  bb, sub, lanes = plan.block_b, plan.sub, plan.lanes
  shape = (bb, sub, lanes)
  t_base = kt * plan.block_t

  def lane_group(g, _):
    ls = _lane_slice(plan, g)
    ncsp = _to_rows(-c * _softplus(ap_ref[0:1, ls].astype(_F32)), (1, sub, lanes))
    flag = _reset_flag(ap_ref, ls, reset, sub, lanes)
    if reset is True:
      h_init = jnp.zeros(shape, _F32)
    else:
      h_init = _to_rows(h0_ref[:, ls].astype(_F32), shape)
    if reset == _FLAG:
      h_init = jnp.where(flag > 0.5, 0.0, h_init)
    if plan.num_t_blocks > 1:
      h_init = jnp.where(kt == 0, h_init, scratch[0][:, :, ls])

    def chunk(j, h_carry):
      rows = pl.ds(_aligned(j, sub), sub)
      t_rows = t_base + _aligned(j, sub) + _row_iota(shape)
      x = x_ref[:, rows, ls].astype(_F32)
      gx = gx_ref[:, rows, ls].astype(_F32)
      ga = ga_ref[:, rows, ls].astype(_F32)
      a, _, _, s_x, _, m = _gates(gx, ga, ncsp, _reset_rows(t_rows, flag))
      b = m * s_x * x
      if plan.padded_time:  # rows past the end: identity steps, so the carry is h_{T-1}
        valid = t_rows < plan.seq_len
        a = jnp.where(valid, a, 1.0)
        b = jnp.where(valid, b, 0.0)
      h = _scan_chunk(a, b, h_carry)
      h_ref[:, rows, ls] = h.astype(h_ref.dtype)
      return _last_row(h)

    h_carry = _loop(plan.num_chunks, chunk, h_init, unroll=plan.unroll)
    if plan.num_t_blocks > 1:
      scratch[0][:, :, ls] = h_carry

    @pl.when(kt == plan.num_t_blocks - 1)
    def _():
      hl_ref[:, ls] = _from_rows(h_carry).astype(hl_ref.dtype)

    return 0

  _lane_loop(plan, lane_group)


# --------------------------------------------------------------------------------- backward kernel


def _bwd_kernel(*refs, plan: _Plan, c: float, reset: bool | str):
  x_ref, gx_ref, ga_ref, ap_ref, h_ref, dh_ref, dhl_ref, *refs = refs
  h0_ref = None if reset is True else refs.pop(0)
  hb_ref = refs.pop(0) if plan.num_t_blocks > 1 else None
  dx_ref, dgx_ref, dga_ref, dq_ref, *refs = refs
  dh0_ref = None if reset is True else refs.pop(0)
  g_scratch, dq_scratch = refs if plan.num_t_blocks > 1 else (None, None)

  k = pl.program_id(2)
  kt = plan.num_t_blocks - 1 - k  # time block: the grid walks time backwards
  bb, sub, lanes = plan.block_b, plan.sub, plan.lanes
  shape = (bb, sub, lanes)
  t_base = kt * plan.block_t
  first, last = k == 0, k == plan.num_t_blocks - 1

  def lane_group(g, _):
    ls = _lane_slice(plan, g)
    ncsp = _to_rows(-c * _softplus(ap_ref[0:1, ls].astype(_F32)), (1, sub, lanes))
    flag = _reset_flag(ap_ref, ls, reset, sub, lanes)
    # g_carry: the gradient flowing into the last row of the next chunk from the steps after it,
    # i.e. a_{t+1} * g_{t+1}; it starts as the cotangent of h_last.
    g_init = _to_rows(dhl_ref[:, ls].astype(_F32), shape)
    dq_init = jnp.zeros(shape, _F32)
    if plan.num_t_blocks > 1:
      g_init = jnp.where(first, g_init, g_scratch[:, :, ls])
      dq_init = jnp.where(first, dq_init, dq_scratch[:, :, ls])
    # h_{t-1} at the first row of this time block: h0, zeros (reset), or the previous block's h.
    if reset is True:
      h_start = jnp.zeros(shape, _F32)
    else:
      h_start = _to_rows(h0_ref[:, ls].astype(_F32), shape)
    if plan.num_t_blocks > 1:
      h_start = jnp.where(kt == 0, h_start, _last_row(hb_ref[:, :, ls].astype(_F32)))

    def h_rows(j):
      return h_ref[:, pl.ds(_aligned(j, sub), sub), ls].astype(_F32)

    def chunk(j, carry):
      g_carry, dq_acc, h_cur = carry
      rows = pl.ds(_aligned(j, sub), sub)
      row = _row_iota(shape)
      t_rows = t_base + _aligned(j, sub) + row
      x = x_ref[:, rows, ls].astype(_F32)
      gx = gx_ref[:, rows, ls].astype(_F32)
      ga = ga_ref[:, rows, ls].astype(_F32)
      dh = dh_ref[:, rows, ls].astype(_F32)
      # h_{t-1} for the chunk: h shifted down one row; row 0 from the chunk before (or h_start).
      if isinstance(j, int):
        h_before = h_cur if j == 0 else h_rows(j - 1)  # (h_cur is a placeholder at j == 0)
        prev_last = h_start if j == 0 else _last_row(h_before)
      else:
        h_before = h_rows(jnp.maximum(j - 1, 0))
        prev_last = jnp.where(j == 0, h_start, _last_row(h_before))
      h_prev = prev_last if sub == 1 else jnp.where(row == 0, prev_last, pltpu.roll(h_cur, 1, 1))

      reset_rows = _reset_rows(t_rows, flag)
      a, a2, s_a, s_x, u, m = _gates(gx, ga, ncsp, reset_rows)
      if plan.padded_time:  # rows past the end are identity steps with no output gradient
        valid = t_rows < plan.seq_len
        a = jnp.where(valid, a, 1.0)
        dh = jnp.where(valid, dh, 0.0)
      # Reverse recurrence g_t = dh_t + a_{t+1} g_{t+1}: a_next_i = a_{i+1}, and the last row
      # takes the incoming g_carry (already multiplied by its a).
      a_next = a if sub == 1 else pltpu.roll(a, sub - 1, 1)
      a_next = jnp.where(row == sub - 1, 1.0, a_next)
      g = _reverse_scan_chunk(a_next, dh, g_carry)

      gs = g * s_x
      dx = gs * m
      dgx = dx * x * (1.0 - s_x)
      dm = gs * x
      # d h / d log_a = a * h_{t-1};  d m / d log_a = -a^2 / sqrt(max(u, eps)).
      dlog_a = a * g * h_prev - dm * a2 * jax.lax.rsqrt(jnp.maximum(u, _SQRT_U_MIN))
      if reset_rows is not None:  # m_0 = 1 and h_{-1} = 0: a_0 is unused
        dlog_a = jnp.where(reset_rows, 0.0, dlog_a)
      dq = dlog_a * s_a
      if plan.padded_time:  # padding must not reach the sum over time (0 * NaN is NaN)
        dq = jnp.where(valid, dq, 0.0)
      dga = dlog_a * ncsp * s_a * (1.0 - s_a)
      dx_ref[:, rows, ls] = dx.astype(dx_ref.dtype)
      dgx_ref[:, rows, ls] = dgx.astype(dgx_ref.dtype)
      dga_ref[:, rows, ls] = dga.astype(dga_ref.dtype)
      return _first_row(a * g), dq_acc + dq, h_before

    last_chunk = plan.num_chunks - 1
    g_carry, dq_acc, _ = _loop(
      plan.num_chunks,
      chunk,
      (g_init, dq_init, h_rows(last_chunk)),
      reverse=True,
      unroll=plan.unroll,
    )
    if plan.num_t_blocks > 1:
      g_scratch[:, :, ls] = g_carry
      dq_scratch[:, :, ls] = dq_acc

    @pl.when(last)
    def _():
      dq_ref[:, ls] = jnp.sum(dq_acc, axis=1).astype(dq_ref.dtype)
      if dh0_ref is not None:
        dh0 = g_carry if reset is False else jnp.where(flag > 0.5, 0.0, g_carry)  # a_0 * g_0
        dh0_ref[:, ls] = _from_rows(dh0).astype(dh0_ref.dtype)

    return 0

  _lane_loop(plan, lane_group)


# ------------------------------------------------------------------------------------ pallas calls


def _out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """An output that varies over the same shard_map axes as `like` (needed under check_vma)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def _reset_mode(h0, ap_rows) -> bool | str:
  """The kernels' `reset`: True (h0 None), _FLAG (a_param block carries flags), False."""
  if h0 is None:
    return True
  return _FLAG if ap_rows.shape[0] == 2 else False


def _ap_rows(a_param, reset):
  """[1, W] float32 a_param, or [2, W] with the reset flag broadcast in row 1 (flagged mode)."""
  ap_1W = a_param.astype(_F32).reshape(1, -1)
  if reset is None:
    return ap_1W
  flag_1W = jnp.broadcast_to(jnp.asarray(reset, _F32).reshape(1, 1), ap_1W.shape)
  return jnp.concatenate([ap_1W, flag_1W], axis=0)


def _specs(plan: _Plan, *, reverse: bool, ap_rows: int = 1):
  """BlockSpecs for [B, T, W], [B, W] and [ap_rows, W] arrays on the (b, w, t) grid."""
  nt = plan.num_t_blocks

  def t_block(k):
    return nt - 1 - k if reverse else k

  btw = pl.BlockSpec((plan.block_b, plan.block_t, plan.block_w), lambda i, j, k: (i, t_block(k), j))
  bw = pl.BlockSpec((plan.block_b, plan.block_w), lambda i, j, k: (i, j))
  w = pl.BlockSpec((ap_rows, plan.block_w), lambda i, j, k: (0, j))
  return btw, bw, w


def _fwd_call(plan: _Plan, c: float, interpret: bool, x, gx, ga, ap_1W, h0):
  batch, seq_len, width = x.shape
  reset = _reset_mode(h0, ap_1W)
  btw, bw, w = _specs(plan, reverse=False, ap_rows=ap_1W.shape[0])
  args = [x, gx, ga, ap_1W] + ([] if h0 is None else [h0])
  in_specs = [btw, btw, btw, w] + ([] if h0 is None else [bw])
  scratch = []
  if plan.num_t_blocks > 1:
    scratch = [pltpu.VMEM((plan.block_b, plan.sub, plan.block_w), _F32)]
  elems = batch * seq_len * width
  return pl.pallas_call(
    functools.partial(_fwd_kernel, plan=plan, c=c, reset=reset),
    out_shape=(
      _out_struct(x.shape, x.dtype, x),
      _out_struct((batch, width), x.dtype, x),
    ),
    grid=plan.grid(batch, width),
    in_specs=in_specs,
    out_specs=(btw, bw),
    scratch_shapes=scratch,
    compiler_params=_compiler_params(plan),
    cost_estimate=pl.CostEstimate(
      flops=20 * elems,
      transcendentals=5 * elems,
      bytes_accessed=sum(v.size * v.dtype.itemsize for v in args) + elems * x.dtype.itemsize,
    ),
    interpret=interpret,
    name=f"gated_lru_fwd_{plan.backend}",
  )(*args)


def _bwd_call(plan: _Plan, c: float, interpret: bool, x, gx, ga, ap_1W, h0, h, dh, dh_last):
  batch, seq_len, width = x.shape
  reset = _reset_mode(h0, ap_1W)
  btw, bw, w = _specs(plan, reverse=True, ap_rows=ap_1W.shape[0])
  args = [x, gx, ga, ap_1W, h, dh, dh_last] + ([] if h0 is None else [h0])
  in_specs = [btw, btw, btw, w, btw, btw, bw] + ([] if h0 is None else [bw])
  scratch = []
  if plan.num_t_blocks > 1:
    # The last 8 rows of h before this time block (h_{t-1} of its first step).
    nt, rows_per_block = plan.num_t_blocks, plan.block_t // 8
    args.append(h)
    in_specs.append(
      pl.BlockSpec(
        (plan.block_b, 8, plan.block_w),
        lambda i, j, k: (i, jnp.maximum((nt - 1 - k) * rows_per_block - 1, 0), j),
      )
    )
    scratch = [pltpu.VMEM((plan.block_b, plan.sub, plan.block_w), _F32)] * 2
  out_shape = [
    _out_struct(x.shape, x.dtype, x),
    _out_struct(gx.shape, gx.dtype, x),
    _out_struct(ga.shape, ga.dtype, x),
    _out_struct((batch, width), _F32, x),
  ]
  out_specs = [btw, btw, btw, bw]
  if h0 is not None:
    out_shape.append(_out_struct((batch, width), _F32, x))
    out_specs.append(bw)
  elems = batch * seq_len * width
  outs = pl.pallas_call(
    functools.partial(_bwd_kernel, plan=plan, c=c, reset=reset),
    out_shape=tuple(out_shape),
    grid=plan.grid(batch, width),
    in_specs=in_specs,
    out_specs=tuple(out_specs),
    scratch_shapes=scratch,
    compiler_params=_compiler_params(plan),
    cost_estimate=pl.CostEstimate(
      flops=50 * elems,
      transcendentals=6 * elems,
      bytes_accessed=sum(v.size * v.dtype.itemsize for v in args[:7])
      + sum(math.prod(s.shape) * s.dtype.itemsize for s in out_shape),
    ),
    interpret=interpret,
    name=f"gated_lru_bwd_{plan.backend}",
  )(*args)
  return tuple(outs) if h0 is not None else (*outs, None)


def _per_backend(make_call, shape, itemsize, backend, interpret):
  """make_call(plan, interpret) with the blocking and interpreter choice of the lowering platform.

  All branches are traced; only the lowering platform's is lowered. A plan is compiled only on its
  own platform (TPU plan: Mosaic on TPU; GPU plan: Triton on CUDA/ROCm) and interpreted elsewhere
  (CPU) unless `interpret` forces it. CPU runs the TPU blocking, which exercises the chunked scan
  and the time grid.
  """
  if backend not in (None, "tpu", "gpu"):
    raise ValueError(f"gated_lru_pallas: backend must be 'tpu', 'gpu' or None, got {backend!r}.")
  batch, seq_len, width = shape
  plans = {
    "tpu": lambda: _tpu_plan(batch, seq_len, width, itemsize),
    "gpu": lambda: _gpu_plan(batch, seq_len, width),
  }

  def call(kind, interp):
    return lambda: make_call(plans[kind](), interp)

  if interpret is not None:
    if backend is not None:
      return call(backend, interpret)()
    tpu, gpu = call("tpu", interpret), call("gpu", interpret)
    return jax.lax.platform_dependent(tpu=tpu, cuda=gpu, rocm=gpu, default=tpu)
  if backend == "tpu":
    return jax.lax.platform_dependent(tpu=call("tpu", False), default=call("tpu", True))
  gpu = call("gpu", False)
  if backend == "gpu":
    return jax.lax.platform_dependent(cuda=gpu, rocm=gpu, default=call("gpu", True))
  return jax.lax.platform_dependent(
    tpu=call("tpu", False), cuda=gpu, rocm=gpu, default=call("tpu", True)
  )


# ------------------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gated_lru(x, gx, ga, a_param, h0, c, interpret, backend):
  return _forward(x, gx, ga, a_param, h0, None, c, interpret, backend)


# The passes are jitted so that a model calling the kernel once per layer traces (and lowers) each
# pass once per shape: every call traces all the platform branches (TPU, GPU, interpreter).
@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _forward(x, gx, ga, a_param, h0, reset, c, interpret, backend):
  ap_1W = _ap_rows(a_param, reset)
  return _per_backend(
    lambda plan, interp: _fwd_call(plan, c, interp, x, gx, ga, ap_1W, h0),
    x.shape,
    max(v.dtype.itemsize for v in (x, gx, ga)),
    backend,
    interpret,
  )


def _gated_lru_fwd(x, gx, ga, a_param, h0, c, interpret, backend):
  h, h_last = _forward(x, gx, ga, a_param, h0, None, c, interpret, backend)
  return (h, h_last), (x, gx, ga, a_param, h0, h)


def _gated_lru_bwd(c, interpret, backend, residuals, cotangents):
  x, gx, ga, a_param, h0, h = residuals
  return _backward(x, gx, ga, a_param, h0, None, h, *cotangents, c, interpret, backend)


@functools.partial(jax.jit, static_argnums=(9, 10, 11))
def _backward(x, gx, ga, a_param, h0, reset, h, dh, dh_last, c, interpret, backend):
  ap_1W = _ap_rows(a_param, reset)
  dx, dgx, dga, dq_BW, dh0 = _per_backend(
    lambda plan, interp: _bwd_call(plan, c, interp, x, gx, ga, ap_1W, h0, h, dh, dh_last),
    x.shape,
    max(v.dtype.itemsize for v in (x, gx, ga, dh)),
    backend,
    interpret,
  )
  # log_a = -c * sigmoid(gate_a) * softplus(a_param): the kernel summed dlog_a * sigmoid(gate_a)
  # over time; finish the chain rule and the batch sum here ([B, W] is 1/T of an input).
  d_a_param = (-c * jax.nn.sigmoid(a_param.astype(_F32)) * jnp.sum(dq_BW, axis=0)).astype(
    a_param.dtype
  )
  dh0 = None if h0 is None else dh0.astype(h0.dtype)
  return dx, dgx, dga, d_a_param, dh0


_gated_lru.defvjp(_gated_lru_fwd, _gated_lru_bwd)


def gated_lru_pallas(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  *,
  h0: jax.Array | None = None,
  c: float = 8.0,
  interpret: bool | None = None,
  backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Fused Pallas gated LRU; returns (h [b, t, w], h_last [b, w]) in x's dtype.

  interpret=None decides where the call is lowered: Mosaic on TPU, Triton on GPU, the interpreter
  on CPU (whatever the host's default backend); True/False force it. backend forces the "tpu" or
  "gpu" blocking.
  """
  _check_shapes(x, gate_x, gate_a, a_param, h0)
  if interpret is not None:
    interpret = bool(interpret)
  x, gate_x, gate_a, a_param, h0 = _vary_alike(x, gate_x, gate_a, a_param, h0)
  return _gated_lru(x, gate_x, gate_a, a_param, h0, float(c), interpret, backend)


def _check_reset(h0, reset):
  if reset is not None and (h0 is None or jnp.shape(reset) != ()):
    given = "None" if h0 is None else "given"
    raise ValueError(
      "gated_lru_pallas: reset is a boolean scalar that goes with h0 (with h0=None the first step "
      f"always resets); got reset of shape {jnp.shape(reset)} and h0 {given}."
    )


def gated_lru_pallas_fwd(
  x: jax.Array,
  gate_x: jax.Array,
  gate_a: jax.Array,
  a_param: jax.Array,
  h0: jax.Array | None,
  *,
  reset: jax.Array | None = None,
  c: float = 8.0,
  interpret: bool | None = None,
  backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The forward kernel alone (no VJP): (h, h_last), for callers that own the backward.

  reset (with h0): a traced boolean scalar; where true the first step resets as with h0=None
  (m_0 = 1, h0 ignored). It costs no recompilation: the time-parallel shards pass shard == 0.
  """
  _check_shapes(x, gate_x, gate_a, a_param, h0)
  _check_reset(h0, reset)
  interpret = None if interpret is None else bool(interpret)
  return _forward(x, gate_x, gate_a, a_param, h0, reset, float(c), interpret, backend)


def gated_lru_pallas_vjp(
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
  interpret: bool | None = None,
  backend: str | None = None,
) -> tuple[jax.Array, ...]:
  """The backward kernel alone, given the forward's h: (dx, dgate_x, dgate_a, da_param, dh0).

  For callers that own the forward (gated_lru_pallas_fwd); dh0 is None when h0 is (and zero where
  reset is true). No vma casts: a_param's gradient is this call's partial, summed by the caller.
  """
  _check_shapes(x, gate_x, gate_a, a_param, h0)
  _check_reset(h0, reset)
  interpret = None if interpret is None else bool(interpret)
  return _backward(
    x, gate_x, gate_a, a_param, h0, reset, h, dh, dh_last, float(c), interpret, backend
  )


def _vary_alike(*args):
  """Under shard_map, casts all args to vary over the union of their mesh axes.

  The kernel's outputs and cotangents vary over all of them; a_param is typically replicated over
  the batch axes. The cast's transpose is a psum, so its gradient is summed over batch shards.
  """
  varying = [None if v is None else jax.typeof(v).mat.varying for v in args]
  union = frozenset().union(*(s for s in varying if s is not None))
  return tuple(
    v if v is None or s == union else jax.lax.pcast(v, tuple(sorted(union - s)), to="varying")
    for v, s in zip(args, varying, strict=True)
  )


__all__ = ["gated_lru_pallas", "gated_lru_pallas_fwd", "gated_lru_pallas_vjp"]
