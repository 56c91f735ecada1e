"""TRecViT in Flax linen: time mixed by gated LRUs, space by ViT attention, channels by MLPs.

Input video float32 [b, t, h, w, 3] in [0, 1]. Tokens x_BTNC: [b, t, n (+1 CLS), c].
Per layer: (b t n c) -> ((b n) t c) gated-LRU residual block; ((b t) n c) ViT block.

Module and parameter names follow the official release (tokenizer/, encoder/residualblock_{i:02d},
encoder/encoderblock_{i}, decoder/) so official checkpoints load by path. Linen is used (not NNX)
because the official model is linen, so its parameter tree maps one-to-one, and linen's logical
partitioning (nn.with_logical_partitioning + logical rules) is what the trainer shards with.

Every temporal block accepts a recurrent `state` ({"h": [(b n), lru_width], "conv": [(b n),
W-1, lru_width]}); None means "start of a video". Passing the returned state back continues the
video, which is how frame-by-frame inference runs in constant memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from trecvit_dist.models.config import TRecViTConfig

LOGICAL = nn.with_logical_partitioning
Dtype = Any


def _dtype(cfg: TRecViTConfig) -> Dtype:
  return jnp.dtype(cfg.dtype)


def a_param_init(min_rad: float, max_rad: float, eps: float = 1e-8):
  """a_param so that a = exp(-softplus(a_param)) lies uniformly (in r^2) on [min_rad, max_rad]."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    r2 = u * (max_rad**2 - min_rad**2) + min_rad**2
    a_real = 0.5 * jnp.log(r2 + eps)
    # Inverse softplus of -a_real: softplus(a_param) = -a_real.
    return jnp.log(jnp.expm1(-a_real)).astype(dtype)

  return init


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


class Conv1D(nn.Module):
  """Causal depthwise conv over time: out[t] = b + sum_s w[W-1-s] * x[t-s] (zeros before t=0).

  x_BTD [batch, time, width]; the state is the last W-1 inputs [batch, W-1, width].
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
    pad = self.temporal_width - 1
    if window_BWD is None:
      window_BWD = jnp.zeros((x_BTD.shape[0], pad, width), x_BTD.dtype)
    x_full = jnp.concatenate([window_BWD.astype(x_BTD.dtype), x_BTD], axis=1)
    t = x_BTD.shape[1]
    out = jnp.broadcast_to(b[None, None], x_BTD.shape)
    for shift in range(self.temporal_width):
      # x[t - shift] for every output t lives at x_full[pad - shift + t].
      out = out + x_full[:, pad - shift : pad - shift + t] * w[None, None, pad - shift]
    new_window = x_full[:, x_full.shape[1] - pad :] if pad else window_BWD
    return out, new_window


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


def _dense(features, names, dtype, name):
  return nn.Dense(
    features,
    dtype=dtype,
    kernel_init=LOGICAL(nn.initializers.lecun_normal(), names),
    bias_init=LOGICAL(nn.initializers.zeros_init(), names[-1:]),
    name=name,
  )


def run_lru(x, gate_x, gate_a, a_param, h0, *, c, impl):
  """Runs kernels.gated_lru; per shard under shard_map when a mesh is active (the trainer's).

  Shapes that do not divide over the mesh (e.g. a batch-1 init) run unsharded.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # Compiling for a TPU/GPU mesh from a CPU host (compile_check): the real kernel, not interpret.
  platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
  interpret = None
  if platform in ("tpu", "gpu", "cuda", "rocm"):
    interpret = False
    impl = "pallas" if impl == "auto" else impl
  if mesh is not None and not mesh.empty and mesh.size > 1:
    batch_ways = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if x.shape[0] % batch_ways == 0 and x.shape[-1] % mesh.shape.get("tensor", 1) == 0:
      return kernels.gated_lru_sharded(
        x,
        gate_x,
        gate_a,
        a_param,
        h0=h0,
        c=c,
        impl=impl,
        mesh=mesh,
        batch_axes=("data", "fsdp"),
        width_axis="tensor",
        interpret=interpret,
      )
  return kernels.gated_lru(x, gate_x, gate_a, a_param, h0=h0, c=c, impl=impl, interpret=interpret)


class RGLRU(nn.Module):
  """Real-gated linear recurrent unit over x_BTD [batch, time, lru_width]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTD, h0_BD=None):
    cfg = self.cfg
    a_param = self.param(
      "a_param", LOGICAL(a_param_init(cfg.min_rad, cfg.max_rad), ("lru",)), (x_BTD.shape[-1],)
    )
    dtype = _dtype(cfg)
    gate_x = BlockDiagonalLinear(cfg.gate_heads, dtype, name="input_gate")(x_BTD)
    gate_a = BlockDiagonalLinear(cfg.gate_heads, dtype, name="a_gate")(x_BTD)
    return run_lru(x_BTD, gate_x, gate_a, a_param, h0_BD, c=cfg.lru_c, impl=cfg.lru_impl)


class RecurrentBlock(nn.Module):
  """Griffin recurrent block: linear_out(gelu(linear_y(x)) * rg_lru(conv_1d(linear_x(x))))."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTC, state=None):
    cfg, dtype = self.cfg, _dtype(self.cfg)
    y = _dense(cfg.lru_width, ("embed", "lru"), dtype, "linear_y")(x_BTC)
    y = jax.nn.gelu(y)
    x = _dense(cfg.lru_width, ("embed", "lru"), dtype, "linear_x")(x_BTC)
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_lru"))
    x, conv_window = Conv1D(cfg.conv1d_temporal_width, dtype, name="conv_1d")(
      x, None if state is None else state["conv"]
    )
    h, h_last = RGLRU(cfg, name="rg_lru")(x, None if state is None else state["h"])
    out = _dense(cfg.width, ("lru", "embed"), dtype, "linear_out")(h * y)
    return out, {"h": h_last.astype(jnp.float32), "conv": conv_window}


class ResidualBlock(nn.Module):
  """Temporal mixing, space folded into batch: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC, state=None):
    b, _, n, _ = x_BTNC.shape
    x = einops.rearrange(x_BTNC, "b t n c -> (b n) t c")
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
    y = RMSNorm(name="temporal_pre_norm")(x)
    y, state = RecurrentBlock(self.cfg, name="recurrent_block")(y, state)
    x = x + y
    return einops.rearrange(x, "(b n) t c -> b t n c", b=b, n=n), state


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


class Attention(nn.Module):
  """Multi-head self-attention over the tokens of one frame: x_BNC -> x_BNC."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BNC):
    cfg, dtype = self.cfg, _dtype(self.cfg)
    q, k, v = (
      HeadsProjection(cfg.num_heads, cfg.head_dim, dtype, name=name)(x_BNC)
      for name in ("query", "key", "value")
    )
    q = q / jnp.sqrt(jnp.asarray(cfg.head_dim, dtype))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
    out_BNHD = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return OutProjection(cfg.width, dtype, name="out")(out_BNHD)


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


class MlpBlock(nn.Module):
  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x):
    cfg, dtype = self.cfg, _dtype(self.cfg)
    x = _dense(cfg.mlp_dim, ("embed", "mlp"), dtype, "Dense_0")(x)
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_mlp"))
    x = jax.nn.gelu(x)
    return _dense(cfg.width, ("mlp", "embed"), dtype, "Dense_1")(x)


class EncoderBlock(nn.Module):
  """Spatial + channel mixing, time folded into batch: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC):
    b = x_BTNC.shape[0]
    x = einops.rearrange(x_BTNC, "b t n c -> (b t) n c")
    x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
    ln = functools.partial(
      nn.LayerNorm,
      epsilon=1e-6,
      dtype=_dtype(self.cfg),
      scale_init=LOGICAL(nn.initializers.ones_init(), ("embed",)),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    )
    x = x + Attention(self.cfg, name="MultiHeadDotProductAttention_0")(ln(name="LayerNorm_0")(x))
    x = x + MlpBlock(self.cfg, name="MlpBlock_0")(ln(name="LayerNorm_1")(x))
    return einops.rearrange(x, "(b t) n c -> b t n c", b=b)


def _remat(cls, policy: str):
  if policy == "none":
    return cls
  saveable = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[policy]
  return nn.remat(cls, policy=saveable)


class Encoder(nn.Module):
  """depth x (ResidualBlock, EncoderBlock), then LayerNorm: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC, state=None):
    cfg = self.cfg
    residual_cls = _remat(ResidualBlock, cfg.remat)
    encoder_cls = _remat(EncoderBlock, cfg.remat)
    new_state = []
    for i in range(cfg.depth):
      if cfg.temporal_blocks:
        x_BTNC, layer_state = residual_cls(cfg, name=f"residualblock_{i:02d}")(
          x_BTNC, None if state is None else state[i]
        )
        new_state.append(layer_state)
      x_BTNC = encoder_cls(cfg, name=f"encoderblock_{i}")(x_BTNC)
    x_BTNC = nn.LayerNorm(
      epsilon=1e-6,
      dtype=_dtype(cfg),
      name="encoder_norm",
      scale_init=LOGICAL(nn.initializers.ones_init(), ("embed",)),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    )(x_BTNC)
    return x_BTNC, tuple(new_state)


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embedding [h*w, width] (MoCo v3 / big_vision layout)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}.")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Tokenizer(nn.Module):
  """Per-frame patch embedding + spatial position embedding (+ per-frame CLS).

  [b, t, h, w, 3] -> [b, t, n (+1), c]. With keep_BK (indices of kept spatial positions, [b, k]),
  only those tubes are kept (masked pre-training); the CLS token always stays.
  """

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, video_BTHWC, keep_BK=None):
    cfg = self.cfg
    x = nn.Conv(
      cfg.width,
      kernel_size=cfg.patch_size,
      strides=cfg.patch_size,
      padding="VALID",
      dtype=_dtype(cfg),
      kernel_init=LOGICAL(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
      name="embedding",
    )(video_BTHWC.astype(_dtype(cfg)))
    b, t, gh, gw, c = x.shape
    x = einops.rearrange(x, "b t gh gw c -> b t (gh gw) c")
    if cfg.posemb == "sincos2d":
      pos_NC = jnp.asarray(sincos_2d(gh, gw, cfg.width))
    else:
      pos_NC = self.param(
        "pos_embedding",
        LOGICAL(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, gh * gw, cfg.width),
      )[0]
    x = x + pos_NC[None, None].astype(x.dtype)
    if keep_BK is not None:
      x = jnp.take_along_axis(x, keep_BK[:, None, :, None], axis=2)
    if cfg.use_cls_token:
      cls = self.param(
        "cls", LOGICAL(nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, c)
      )
      cls = jnp.broadcast_to(cls[None].astype(x.dtype), (b, t, 1, c))
      x = jnp.concatenate([cls, x], axis=2)
    return x


class ClassifierHead(nn.Module):
  """Official decoder: per-frame CLS (or token mean) -> pre_logits+tanh -> mean over frames -> head.

  x_BTNC -> (logits [b, classes], pre_logits [b, rep]). `frame_features` gives the per-frame
  pre-logits [b, t, rep] so frame-by-frame inference can keep a running mean.
  """

  cfg: TRecViTConfig

  def setup(self):
    cfg = self.cfg
    if cfg.rep_size:
      self.pre_logits = _dense(cfg.rep_size, ("embed", "mlp"), jnp.float32, "pre_logits")
    self.cls_head = nn.Dense(
      cfg.num_classes,
      kernel_init=LOGICAL(
        nn.initializers.zeros_init(), ("mlp" if cfg.rep_size else "embed", "classes")
      ),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("classes",)),
    )
    self.dropout = nn.Dropout(cfg.classifier_dropout)

  def frame_features(self, x_BTNC):
    x = x_BTNC.astype(jnp.float32)
    x = x[:, :, 0] if self.cfg.pooling == "cls" else jnp.mean(x, axis=2)
    if self.cfg.rep_size:
      x = jnp.tanh(self.pre_logits(x))
    return x

  def logits(self, pooled_BR, train: bool = False):
    return self.cls_head(self.dropout(pooled_BR, deterministic=not train))

  def __call__(self, x_BTNC, train: bool = False):
    pooled = jnp.mean(self.frame_features(x_BTNC), axis=1)
    return self.logits(pooled, train), pooled


def check_video(cfg: TRecViTConfig, shape) -> None:
  """Raises a ValueError naming the problem when a video's shape does not fit the model."""
  pt, ph, pw = cfg.patch_size
  if len(shape) != 5:
    raise ValueError(
      f"video must be [batch, time, height, width, 3], got rank {len(shape)} {tuple(shape)}."
    )
  _, t, h, w, ch = shape
  if ch != 3:
    raise ValueError(
      f"video must have 3 channels (RGB) in its last axis, got {ch} (shape {tuple(shape)})."
    )
  if t % pt:
    raise ValueError(f"{t} frames are not divisible by the temporal patch size {pt}.")
  if h % ph or w % pw:
    raise ValueError(
      f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}; resize or crop the video."
    )


class TRecViT(nn.Module):
  """Video classifier: [b, t, h, w, 3] in [0, 1] -> logits [b, classes] (and the features)."""

  cfg: TRecViTConfig

  def setup(self):
    self.tokenizer = Tokenizer(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.decoder = ClassifierHead(self.cfg)

  def encode(self, video_BTHWC, state=None):
    """[b, t, h, w, 3] -> (encoded [b, t, n(+1), c], recurrent state)."""
    check_video(self.cfg, video_BTHWC.shape)
    x = self.tokenizer(video_BTHWC)
    x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    return self.encoder(x, state)

  def __call__(self, video_BTHWC, train: bool = False):
    """One clip from a fresh state: logits [b, classes]."""
    encoded, _ = self.encode(video_BTHWC)
    logits, _ = self.decoder(encoded, train)
    return logits

  def frame_features(self, encoded_BTNC):
    return self.decoder.frame_features(encoded_BTNC)

  def classify(self, pooled_BR):
    return self.decoder.logits(pooled_BR)
