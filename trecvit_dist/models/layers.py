"""Layers every model family shares, with logical axis names for sharding (sharding.LOGICAL_RULES).

Names and parameter layouts follow the official TRecViT release and the public ViT checkpoints
(big_vision / vision_transformer): a ViT block is LayerNorm_0, MultiHeadDotProductAttention_0
(query/key/value kernels [c, heads, head_dim], out [heads, head_dim, c]), LayerNorm_1,
MlpBlock_0 (Dense_0, Dense_1), so image-ViT and official checkpoints load by path.

Parameter logical names: embed (model width), mlp (MLP hidden), heads, kv (head dim), lru,
lru_heads, classes. Activation names: act_batch, act_embed, act_mlp, act_lru.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trecvit_dist import sharding

LOGICAL = nn.with_logical_partitioning
Dtype = Any


def dense(features: int, names: tuple, dtype: Dtype, name: str) -> nn.Dense:
  """nn.Dense whose kernel carries logical axis `names` (in, out) and bias names[-1:]."""
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=LOGICAL(nn.initializers.lecun_normal(), names),
    bias_init=LOGICAL(nn.initializers.zeros_init(), names[-1:]),
    name=name,
  )


def layer_norm(dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm(eps 1e-6) with scale and bias over the embed axis."""
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    scale_init=LOGICAL(nn.initializers.ones_init(), ("embed",)),
    bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", LOGICAL(nn.initializers.zeros_init(), ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + scale).reshape((1,) * (x.ndim - 1) + (-1,))
    return y.astype(x.dtype)


class HeadsProjection(nn.Module):
  """x [..., c] -> [..., heads, head_dim] (kernel [c, heads, head_dim], official layout)."""

  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      LOGICAL(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")),
      (x.shape[-1], self.heads, self.head_dim),
    )
    bias = self.param(
      "bias", LOGICAL(nn.initializers.zeros_init(), ("heads", "kv")), (self.heads, self.head_dim)
    )
    y = jnp.einsum("...c,chd->...hd", x, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 2) + bias.shape)


class OutProjection(nn.Module):
  """[..., heads, head_dim] -> [..., width] (kernel [heads, head_dim, width], official layout)."""

  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    heads, head_dim = x.shape[-2:]
    kernel = self.param(
      "kernel",
      LOGICAL(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
      (heads, head_dim, self.width),
    )
    bias = self.param("bias", LOGICAL(nn.initializers.zeros_init(), ("embed",)), (self.width,))
    y = jnp.einsum("...hd,hdc->...c", x, kernel.astype(self.dtype))
    return y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


def attention_weights(q_BQHD, k_BKHD, dtype: Dtype):
  """softmax(q k^T / sqrt(d)) [b, heads, q, k], the softmax in float32."""
  q_BQHD = q_BQHD / jnp.sqrt(jnp.asarray(q_BQHD.shape[-1], dtype))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q_BQHD, k_BKHD)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention over the tokens of x_BNC -> x_BNC (query/key/value/out)."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BNC):
    width = x_BNC.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = (
      HeadsProjection(self.num_heads, head_dim, self.dtype, name=name)(x_BNC)
      for name in ("query", "key", "value")
    )
    weights = attention_weights(q, k, self.dtype)
    out_BNHD = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return OutProjection(width, self.dtype, name="out")(out_BNHD)


class Mlp(nn.Module):
  """Dense_0 (width -> mlp_dim), gelu, Dense_1 (-> width)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "Dense_0")(x)
    x = nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 2) + ("act_mlp",))
    x = jax.nn.gelu(x)
    return dense(width, ("mlp", "embed"), self.dtype, "Dense_1")(x)


def vit_block(x_BNC, *, num_heads: int, mlp_dim: int, dtype: Dtype):
  """Pre-LN transformer block body, x + attn(ln(x)); x + mlp(ln(x)), in the calling module's scope.

  Call it inside an nn.compact method: its parameters (LayerNorm_0,
  MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0) land directly in that module, which is
  how TRecViT's per-frame blocks and ViViT's blocks share the public ViT checkpoint layout.
  """
  attn = MultiHeadAttention(num_heads, dtype, name="MultiHeadDotProductAttention_0")
  x = x_BNC + attn(layer_norm(dtype, "LayerNorm_0")(x_BNC))
  return x + Mlp(mlp_dim, dtype, name="MlpBlock_0")(layer_norm(dtype, "LayerNorm_1")(x))


class ViTBlock(nn.Module):
  """A pre-LN transformer block over the tokens of x_BNC [b, n, c]."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BNC):
    x = nn.with_logical_constraint(x_BNC, ("act_batch", None, "act_embed"))
    return vit_block(x, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype)


class ViTEncoder(nn.Module):
  """depth ViT blocks (encoderblock_{i}) then encoder_norm: [b, n, c] -> [b, n, c]."""

  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x_BNC):
    block = remat(ViTBlock, self.remat)
    for i in range(self.depth):
      x_BNC = block(self.num_heads, self.mlp_dim, self.dtype, name=f"encoderblock_{i}")(x_BNC)
    return layer_norm(self.dtype, "encoder_norm")(x_BNC)


class AttentionPool(nn.Module):
  """A learned query attends to the tokens: [b, n, c] -> [b, c] (MAP head, big_vision layout)."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BNC):
    b, _, c = x_BNC.shape
    probe = self.param(
      "probe", LOGICAL(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, c)
    )
    q = HeadsProjection(self.num_heads, c // self.num_heads, self.dtype, name="query")(
      jnp.broadcast_to(probe.astype(self.dtype), (b, 1, c))
    )
    k, v = (
      HeadsProjection(self.num_heads, c // self.num_heads, self.dtype, name=name)(x_BNC)
      for name in ("key", "value")
    )
    out = jnp.einsum("bhqk,bkhd->bqhd", attention_weights(q, k, self.dtype), v)
    x = OutProjection(c, self.dtype, name="out")(out)
    x = x + Mlp(self.mlp_dim, self.dtype, name="MlpBlock_0")(
      layer_norm(self.dtype, "LayerNorm_0")(x)
    )
    return x[:, 0]


class ClassifierHead(nn.Module):
  """[b, c] -> logits [b, classes]: optional pre_logits Dense + tanh, dropout, zero-init head."""

  num_classes: int
  rep_size: int | None = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BC, train: bool = False):
    x = x_BC.astype(jnp.float32)
    if self.rep_size:
      x = jnp.tanh(dense(self.rep_size, ("embed", "mlp"), jnp.float32, "pre_logits")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(
      self.num_classes,
      kernel_init=LOGICAL(
        nn.initializers.zeros_init(), ("mlp" if self.rep_size else "embed", "classes")
      ),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("classes",)),
      name="head",
    )(x)


def remat(cls, policy: str):
  """cls wrapped in nn.remat with a named policy ("none", "full", "dots_saveable")."""
  if policy == "none":
    return cls
  saveable = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[policy]
  return nn.remat(cls, policy=saveable)


REMAT_POLICIES = ("none", "full", "dots_saveable")


def sincos_1d(positions: np.ndarray, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """[len(positions), width]: sin of width/2 frequencies then cos (float positions allowed)."""
  if width % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {width}.")
  omega = 1.0 / temperature ** (np.arange(width // 2) / (width // 2 - 1 or 1))
  angles = np.einsum("m,d->md", np.asarray(positions, np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embedding [h*w, width] (MoCo v3 / big_vision layout)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def dtype_of(name: str) -> Dtype:
  return jnp.dtype(name)


# ----------------------------------------------------------------------------- gated LRU block


def a_param_init(min_rad: float, max_rad: float, eps: float = 1e-8):
  """a_param so that a = exp(-softplus(a_param)) lies uniformly (in r^2) on [min_rad, max_rad]."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    r2 = u * (max_rad**2 - min_rad**2) + min_rad**2
    a_real = 0.5 * jnp.log(r2 + eps)
    # Inverse softplus of -a_real: softplus(a_param) = -a_real.
    return jnp.log(jnp.expm1(-a_real)).astype(dtype)

  return init


def causal_conv1d(x_BTD, window_BWD, w_KD, b_D):
  """out[t] = b + sum_s w[K-1-s] * x[t-s], x[-1..-(K-1)] from window_BWD (None: zeros).

  -> (out_BTD, new window: the last K-1 frames of [window, x]).
  """
  pad = w_KD.shape[0] - 1
  if window_BWD is None:
    window_BWD = jnp.zeros((x_BTD.shape[0], pad, x_BTD.shape[2]), x_BTD.dtype)
  x_full = jnp.concatenate([window_BWD.astype(x_BTD.dtype), x_BTD], axis=1)
  t = x_BTD.shape[1]
  out = jnp.broadcast_to(b_D[None, None], x_BTD.shape)
  for shift in range(pad + 1):
    # x[t - shift] for every output t lives at x_full[pad - shift + t].
    out = out + x_full[:, pad - shift : pad - shift + t] * w_KD[None, None, pad - shift]
  new_window = x_full[:, x_full.shape[1] - pad :] if pad else window_BWD
  return out, new_window


class Conv1D(nn.Module):
  """Causal depthwise conv over time: out[t] = b + sum_s w[W-1-s] * x[t-s] (zeros before t=0).

  x_BTD [batch, time, width]; the state is the last W-1 inputs [batch, W-1, width]. With frames
  sharded over time, each shard receives the W-1 frames before it (sharding.causal_conv).
  """

  temporal_width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, window_BWD=None):
    width = x_BTD.shape[-1]
    w = self.param(
      "w",
      LOGICAL(nn.initializers.normal(1.0 / math.sqrt(width)), (None, "lru")),
      (self.temporal_width, width),
    )
    b = self.param("b", LOGICAL(nn.initializers.zeros_init(), ("lru",)), (width,))
    w, b = w.astype(self.dtype), b.astype(self.dtype)
    return sharding.causal_conv(causal_conv1d, x_BTD, window_BWD, w, b)


class BlockDiagonalLinear(nn.Module):
  """Block-diagonal linear map with `num_blocks` blocks: w [h, i, j], b [h, j]."""

  num_blocks: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    bw = x.shape[-1] // self.num_blocks
    w = self.param(
      "w",
      LOGICAL(nn.initializers.normal(1.0 / math.sqrt(bw)), ("lru_heads", None, None)),
      (self.num_blocks, bw, bw),
    )
    b = self.param(
      "b", LOGICAL(nn.initializers.zeros_init(), ("lru_heads", None)), (self.num_blocks, bw)
    )
    x = einops.rearrange(x, "... (h i) -> ... h i", h=self.num_blocks)
    y = jnp.einsum("...hi,hij->...hj", x, w.astype(self.dtype))
    y = y + b.astype(self.dtype).reshape((1,) * (y.ndim - 2) + b.shape)
    return einops.rearrange(y, "... h j -> ... (h j)")


@dataclasses.dataclass(frozen=True)
class LRUSettings:
  """Hyper-parameters of a Griffin recurrent block (RG-LRU with a causal conv)."""

  lru_width: int
  gate_heads: int
  conv1d_temporal_width: int = 4
  min_rad: float = 0.5
  max_rad: float = 0.999
  c: float = 8.0
  impl: str = "auto"  # kernels.gated_lru impl
  dtype: str = "float32"


class RGLRU(nn.Module):
  """Real-gated linear recurrent unit over x_BTD [batch, time, lru_width]."""

  lru: LRUSettings

  @nn.compact
  def __call__(self, x_BTD, h0_BD=None):
    s = self.lru
    a_param = self.param(
      "a_param", LOGICAL(a_param_init(s.min_rad, s.max_rad), ("lru",)), (x_BTD.shape[-1],)
    )
    dtype = jnp.dtype(s.dtype)
    gate_x = BlockDiagonalLinear(s.gate_heads, dtype, name="input_gate")(x_BTD)
    gate_a = BlockDiagonalLinear(s.gate_heads, dtype, name="a_gate")(x_BTD)
    return sharding.gated_lru(x_BTD, gate_x, gate_a, a_param, h0_BD, c=s.c, impl=s.impl)


class RecurrentBlock(nn.Module):
  """Griffin recurrent block: linear_out(gelu(linear_y(x)) * rg_lru(conv_1d(linear_x(x)))).

  x_BTC [batch, time, c] -> ([batch, time, c], state {"h": [batch, lru_width] float32,
  "conv": [batch, W-1, lru_width]}); state None is the start of a sequence.
  """

  lru: LRUSettings

  @nn.compact
  def __call__(self, x_BTC, state=None):
    s, dtype = self.lru, jnp.dtype(self.lru.dtype)
    y = dense(s.lru_width, ("embed", "lru"), dtype, "linear_y")(x_BTC)
    y = jax.nn.gelu(y)
    x = dense(s.lru_width, ("embed", "lru"), dtype, "linear_x")(x_BTC)
    x = nn.with_logical_constraint(x, ("act_batch", "act_time", "act_lru"))
    x, conv_window = Conv1D(s.conv1d_temporal_width, dtype, name="conv_1d")(
      x, None if state is None else state["conv"]
    )
    h, h_last = RGLRU(s, name="rg_lru")(x, None if state is None else state["h"])
    out = dense(x_BTC.shape[-1], ("lru", "embed"), dtype, "linear_out")(h * y)
    return out, {"h": h_last.astype(jnp.float32), "conv": conv_window}


def recurrent_block_flops(width: int, lru: LRUSettings) -> float:
  """Forward FLOPs of RecurrentBlock per token (matmuls and the depthwise conv)."""
  w = lru.lru_width
  return float(
    2 * (2 * width * w)  # linear_x, linear_y
    + 2 * w * width  # linear_out
    + 2 * 2 * w * (w // lru.gate_heads)  # block-diagonal input and a gates
    + 2 * lru.conv1d_temporal_width * w  # depthwise conv
  )


def vit_block_flops(width: int, mlp_dim: int, tokens: int) -> float:
  """Forward FLOPs of one ViT block per token, attending over `tokens` tokens."""
  return float(2 * 4 * width * width + 2 * 2 * tokens * width + 2 * 2 * width * mlp_dim)


# ----------------------------------------------------------------------------- config checks
# Shared by the ViT-style families' config_errors (vivit, motionformer, tubevit).


def vit_mesh_errors(width: int, num_heads: int, mlp_dim: int, mesh_shape) -> list[str]:
  """Sizes that do not split over the mesh (heads and MLP over tensor, width over fsdp)."""
  errors = []
  tensor = mesh_shape.get("tensor", 1)
  for what, size in (("num_heads", num_heads), ("mlp_dim", mlp_dim)):
    if size % tensor:
      errors.append(f"{what} {size} is not divisible by mesh.tensor={tensor}")
  if width % mesh_shape.get("fsdp", 1):
    errors.append(f"width {width} is not divisible by mesh.fsdp={mesh_shape['fsdp']}")
  return errors


def tubelet_errors(patch_size, num_frames: int, image_size: int) -> list[str]:
  """Tubelets (t, h, w) that do not tile a num_frames x image_size x image_size clip."""
  errors = []
  pt, ph, pw = patch_size
  if num_frames % pt:
    errors.append(
      f"data.num_frames {num_frames} is not divisible by the tubelet's {pt} frames "
      f"(model.patch_size {tuple(patch_size)}); use a multiple of {pt} frames or another tubelet"
    )
  if image_size % ph or image_size % pw:
    errors.append(
      f"data.image_size {image_size} is not divisible by the patch size {ph}x{pw} "
      f"(model.patch_size {tuple(patch_size)})"
    )
  return errors
