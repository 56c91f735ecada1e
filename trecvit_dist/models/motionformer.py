"""Motionformer (Patrick et al., 2021): ViT blocks with trajectory attention (motionformer).

video [b, t, h, w, 3] in [0, 1] -> tubelets of model.patch_size (2, 16, 16) -> x [b, T, S, c]
(T time slots, S patches per slot) + a learned spatial position embedding [S, c] + a learned
temporal one [T, c] (separate, as TimeSformer) -> a CLS first, time-major: [b, 1 + T S, c] ->
depth blocks x + TrajectoryAttention(LN(x)); x + MLP(LN(x)) -> LayerNorm -> the CLS -> classifier.

Trajectory attention, per head (d = head_dim), for each patch query n at time slot t_n:
  space: y[n, t] = sum_s softmax_s(q_n . k_ts / sqrt d) v_ts   (a softmax over space per frame:
         one pooled point per frame t along the query's trajectory)
  time:  out[n] = sum_t softmax_t(q'_n . k'_nt / sqrt d) v'_nt with q'_n = Wq' y[n, t_n] (the
         pooled point at the query's own frame) and k'_nt, v'_nt = Wk' y[n, t], Wv' y[n, t]
  CLS:   ordinary attention over all 1 + T S tokens.
The temporal values are projected (v' = Wv' y, the paper's formula); the released code's default
used y itself (a typo its authors keep only for replication).

Orthoformer (model.attention="orthoformer", model.landmarks=R) approximates the space step: R
landmarks P, chosen greedily per example and head as the most mutually orthogonal queries (no
gradient through the selection), give y[n, t] = sum_r softmax_r(q_n . p_r / sqrt d) *
sum_s softmax_s(p_r . k_ts / sqrt d) v_ts: linear in the T S space-time tokens instead of quadratic.

Parameter names: embedding/ (the tubelet Conv), Transformer/{cls, pos_embedding [1, S, c] (the
image ViT's name), temporal_embedding [1, T, c], encoderblock_{i}/{LayerNorm_0,
TrajectoryAttention_0/{query, key, value, temporal_query, temporal_key, temporal_value, out},
LayerNorm_1, MlpBlock_0}, encoder_norm}, head/. The position embeddings are learned for
model.num_frames x model.image_size clips (set from the data config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from trecvit_dist.models import layers
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.layers import LOGICAL

# width, depth, mlp_dim, num_heads. The paper's Motionformer is ViT-B (12 layers, 12 heads, 768).
VARIANTS: dict[str, dict[str, int]] = {
  "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
  "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
  "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
}

ATTENTIONS = ("exact", "orthoformer")


@dataclasses.dataclass(frozen=True)
class MotionformerConfig:
  """Hyper-parameters of Motionformer; defaults are the published Motionformer-B, 16x224x224."""

  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: tuple[int, int, int] = (2, 16, 16)  # (frames, height, width) of a tubelet
  num_frames: int = 16  # clip length of the temporal embedding (set from data.num_frames)
  image_size: int = 224  # clip side of the spatial embedding (set from data.image_size)
  num_classes: int = 400
  attention: str = "exact"  # "exact" trajectory attention or its "orthoformer" approximation
  landmarks: int = 128  # Orthoformer's R (the released code's default)
  # Pre-logits Dense + tanh (the released configs' USE_MLP); None: width wide, 0: none.
  rep_size: int | None = None
  classifier_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none", "full", "dots_saveable" (rematerialise each block)

  def __post_init__(self):
    errors = []
    if self.width % self.num_heads:
      errors.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if len(tuple(self.patch_size)) != 3:
      errors.append(f"patch_size must be (t, h, w), got {self.patch_size}")
    if self.attention not in ATTENTIONS:
      errors.append(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.landmarks < 1:
      errors.append(f"landmarks must be >= 1, got {self.landmarks}")
    if self.remat not in layers.REMAT_POLICIES:
      errors.append(f"remat must be one of {layers.REMAT_POLICIES}, got {self.remat!r}")
    if errors:
      raise ValueError("Invalid MotionformerConfig: " + "; ".join(errors) + ".")
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
    if self.rep_size is None:
      object.__setattr__(self, "rep_size", self.width)

  @property
  def grid(self) -> tuple[int, int, int]:
    """(time slots T, patch rows, patch columns)."""
    pt, ph, pw = self.patch_size
    return self.num_frames // pt, self.image_size // ph, self.image_size // pw

  def replace(self, **kwargs) -> MotionformerConfig:
    return dataclasses.replace(self, **kwargs)


# ----------------------------------------------------------------------------- attention


def space_attention(q_BQHD, k_BTSHD, v_BTSHD):
  """Exact per-frame attention: y[b, q, t] = sum_s softmax_s(q . k_ts / sqrt d) v_ts, the softmax
  in float32 -> y_BQTHD."""
  d = q_BQHD.shape[-1]
  logits = jnp.einsum("bqhd,btshd->bhqts", q_BQHD / math.sqrt(d), k_BTSHD)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v_BTSHD.dtype)
  return jnp.einsum("bhqts,btshd->bqthd", weights, v_BTSHD)


def select_landmarks(q_BNHD, num: int):
  """Indices [b, heads, num] of `num` mutually most orthogonal queries, per example and head.

  Greedy (Orthoformer): the longest query first, then repeatedly the unselected query whose
  largest |cosine| with the ones selected so far is smallest. No gradient flows through it.
  """
  b, n, h, _ = q_BNHD.shape
  if num > n:
    raise ValueError(
      f"model.landmarks={num} is more than the {n} space-time tokens the Orthoformer selects "
      f"them from; use at most {n} landmarks (or more frames / a larger image)."
    )
  q = einops.rearrange(jax.lax.stop_gradient(q_BNHD).astype(jnp.float32), "b n h d -> b h n d")
  norm = jnp.linalg.norm(q, axis=-1)
  unit = q / jnp.maximum(norm, 1e-12)[..., None]
  first = jnp.argmax(norm, axis=-1)  # [b, h]
  idx = jnp.zeros((b, h, num), jnp.int32).at[..., 0].set(first)
  selected = jax.nn.one_hot(first, n, dtype=jnp.bool_)
  max_cos = jnp.zeros((b, h, n), jnp.float32)

  def body(r, state):
    idx, selected, max_cos = state
    last = jnp.take_along_axis(unit, idx[..., r - 1, None, None], axis=2)  # [b, h, 1, d]
    cos = jnp.abs(jnp.einsum("bhnd,bhmd->bhn", unit, last))
    max_cos = jnp.maximum(max_cos, cos)
    pick = jnp.argmin(jnp.where(selected, jnp.inf, max_cos), axis=-1).astype(jnp.int32)
    idx = idx.at[..., r].set(pick)
    return idx, selected | jax.nn.one_hot(pick, n, dtype=jnp.bool_), max_cos

  idx, _, _ = jax.lax.fori_loop(1, num, body, (idx, selected, max_cos))
  return jax.lax.stop_gradient(idx)


def gather_tokens(x_BNHD, idx_BHR):
  """x at per-head token indices: [b, n, h, d], [b, h, r] -> [b, r, h, d]."""
  x = einops.rearrange(x_BNHD, "b n h d -> b h n d")
  picked = jnp.take_along_axis(x, idx_BHR[..., None], axis=2)
  return einops.rearrange(picked, "b h r d -> b r h d")


def landmark_weights(q_BQHD, p_BRHD):
  """softmax_r(q . p_r / sqrt d): each query's weights on the landmarks [b, heads, q, r]."""
  d = q_BQHD.shape[-1]
  logits = jnp.einsum("bqhd,brhd->bhqr", q_BQHD / math.sqrt(d), p_BRHD)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q_BQHD.dtype)


def orthoformer_space_attention(q_BQHD, k_BTSHD, v_BTSHD, num_landmarks: int):
  """Orthoformer's space step -> y_BQTHD: the landmarks' exact per-frame attention
  (space_attention with the landmarks as queries), mixed by each query's landmark weights."""
  landmarks = jax.lax.stop_gradient(gather_tokens(q_BQHD, select_landmarks(q_BQHD, num_landmarks)))
  pooled_BRTHD = space_attention(landmarks, k_BTSHD, v_BTSHD)
  return jnp.einsum("bhqr,brthd->bqthd", landmark_weights(q_BQHD, landmarks), pooled_BRTHD)


def own_frame(y_BQTHD, frames: int):
  """Each query's pooled point at its own time slot (queries time-major): -> [b, q, h, d]."""
  y = einops.rearrange(y_BQTHD, "b (t s) u h d -> b t s u h d", t=frames)
  own = jnp.diagonal(y, axis1=1, axis2=3)  # [b, s, h, d, t]
  return einops.rearrange(own, "b s h d t -> b (t s) h d")


class TrajectoryAttention(nn.Module):
  """Trajectory attention over x_BNC = [CLS, T S time-major patches] -> [b, 1 + T S, c]."""

  num_heads: int
  frames: int  # time slots T
  attention: str = "exact"
  landmarks: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BNC):
    b, n, c = x_BNC.shape
    h, d, t = self.num_heads, c // self.num_heads, self.frames
    s = (n - 1) // t
    q, k, v = (
      layers.HeadsProjection(h, d, self.dtype, name=name)(x_BNC)
      for name in ("query", "key", "value")
    )
    cls_out = jnp.einsum("bhqk,bkhd->bqhd", layers.attention_weights(q[:, :1], k, self.dtype), v)
    q_p = q[:, 1:]
    k_p, v_p = (einops.rearrange(z[:, 1:], "b (t s) h d -> b t s h d", t=t, s=s) for z in (k, v))
    if self.attention == "exact":
      y = space_attention(q_p, k_p, v_p)
    else:
      y = orthoformer_space_attention(q_p, k_p, v_p, self.landmarks)
    # Along each query's trajectory: attention over its T pooled points, queried at its own frame.
    q2 = layers.HeadsProjection(h, d, self.dtype, name="temporal_query")(
      einops.rearrange(own_frame(y, t), "b q h d -> b q (h d)")
    )
    y_BQTC = einops.rearrange(y, "b q u h d -> b q u (h d)")
    k2, v2 = (
      layers.HeadsProjection(h, d, self.dtype, name=name)(y_BQTC)
      for name in ("temporal_key", "temporal_value")
    )
    logits = jnp.einsum("bqhd,bquhd->bqhu", q2 / math.sqrt(d), k2)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bqhu,bquhd->bqhd", weights, v2)
    out = jnp.concatenate([cls_out, out], axis=1)
    return layers.OutProjection(c, self.dtype, name="out")(out)


class TrajectoryBlock(nn.Module):
  """Pre-LN block: x + TrajectoryAttention(LN(x)); x + MLP(LN(x)) over [b, 1 + T S, c]."""

  num_heads: int
  mlp_dim: int
  frames: int
  attention: str = "exact"
  landmarks: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BNC):
    x = nn.with_logical_constraint(x_BNC, ("act_batch", None, "act_embed"))
    attn = TrajectoryAttention(
      self.num_heads,
      self.frames,
      self.attention,
      self.landmarks,
      self.dtype,
      name="TrajectoryAttention_0",
    )
    x = x + attn(layers.layer_norm(self.dtype, "LayerNorm_0")(x))
    mlp = layers.Mlp(self.mlp_dim, self.dtype, name="MlpBlock_0")
    return x + mlp(layers.layer_norm(self.dtype, "LayerNorm_1")(x))


class Encoder(nn.Module):
  """Patch tokens [b, T, S, c] -> + spatial and temporal embeddings, CLS first, depth blocks,
  LayerNorm -> [b, 1 + T S, c]."""

  cfg: MotionformerConfig

  @nn.compact
  def __call__(self, x_BTSC):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, s, c = x_BTSC.shape
    pos_init = LOGICAL(nn.initializers.normal(0.02), (None, None, "embed"))
    spatial = self.param("pos_embedding", pos_init, (1, s, c))
    temporal = self.param("temporal_embedding", pos_init, (1, t, c))
    x = x_BTSC + spatial[:, None].astype(dtype) + temporal[:, :, None].astype(dtype)
    cls = self.param("cls", LOGICAL(nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, c))
    x = jnp.concatenate(
      [jnp.broadcast_to(cls.astype(dtype), (b, 1, c)), einops.rearrange(x, "b t s c -> b (t s) c")],
      axis=1,
    )
    block = layers.remat(TrajectoryBlock, cfg.remat)
    for i in range(cfg.depth):
      x = block(
        cfg.num_heads,
        cfg.mlp_dim,
        t,
        cfg.attention,
        cfg.landmarks,
        dtype,
        name=f"encoderblock_{i}",
      )(x)
    return layers.layer_norm(dtype, "encoder_norm")(x)


def check_video(cfg: MotionformerConfig, shape) -> None:
  """Raises a ValueError naming the problem when a video's shape does not fit the model."""
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"video must be [batch, time, height, width, 3], got {tuple(shape)}.")
  _, t, h, w, _ = shape
  if (t, h, w) != (cfg.num_frames, cfg.image_size, cfg.image_size):
    raise ValueError(
      f"a {t}x{h}x{w} clip, but the learned position embeddings cover model.num_frames="
      f"{cfg.num_frames} frames of {cfg.image_size}x{cfg.image_size} (data.num_frames and "
      "data.image_size set them)."
    )


class Motionformer(nn.Module):
  """Trajectory-attention video transformer: [b, t, h, w, 3] in [0, 1] -> logits [b, classes]."""

  cfg: MotionformerConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = nn.Conv(
      cfg.width,
      kernel_size=cfg.patch_size,
      strides=cfg.patch_size,
      padding="VALID",
      dtype=jnp.dtype(cfg.dtype),
      kernel_init=LOGICAL(nn.initializers.lecun_normal(), (None, None, None, None, "embed")),
      bias_init=LOGICAL(nn.initializers.zeros_init(), ("embed",)),
    )
    self.encoder = Encoder(cfg, name="Transformer")
    self.head = layers.ClassifierHead(cfg.num_classes, cfg.rep_size, cfg.classifier_dropout)

  def encode(self, video_BTHWC):
    """Final-layer tokens [b, 1 + T S, c]: the CLS, then the tubelets time-major."""
    check_video(self.cfg, video_BTHWC.shape)
    x = self.embedding(video_BTHWC.astype(jnp.dtype(self.cfg.dtype)))
    x = einops.rearrange(x, "b t gh gw c -> b t (gh gw) c")
    x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
    return self.encoder(x)

  def tokens(self, video_BTHWC, train: bool = False):
    """The tubelets' final tokens [b, T, S, c] (the CLS, not per slot, left out)."""
    del train
    t = self.cfg.grid[0]
    return einops.rearrange(self.encode(video_BTHWC)[:, 1:], "b (t s) c -> b t s c", t=t)

  def __call__(self, video_BTHWC, train: bool = False):
    return self.head(self.encode(video_BTHWC)[:, 0], train)


# ----------------------------------------------------------------------------- FLOPs


def attention_flops(cfg: MotionformerConfig, frames: int, patches: int) -> float:
  """Forward FLOPs of one TrajectoryAttention on T=frames slots of S=patches (2 per
  multiply-add; the landmark selection's similarities included, its argmins not)."""
  c, t, n = cfg.width, frames, frames * patches
  projections = 2 * (n + 1) * c * c * 4  # query, key, value, out
  cls = 2 * 2 * (n + 1) * c
  if cfg.attention == "exact":
    space = 2 * 2 * n * n * c  # q.k over all T S keys, then the weighted values
  else:
    r = cfg.landmarks
    # selection (r - 1 rounds of |cos| with every query), landmarks' space attention,
    # queries' landmark weights, mixing the landmarks' T pooled points
    space = 2 * (r - 1) * n * c + 2 * 2 * r * n * c + 2 * n * r * c + 2 * n * r * t * c
  temporal = 2 * n * c * c + 2 * 2 * n * t * c * c + 2 * 2 * n * t * c
  return float(projections + cls + space + temporal)


def head_flops(cfg: MotionformerConfig) -> float:
  rep = cfg.rep_size or 0
  return 2.0 * cfg.width * rep + 2.0 * (rep or cfg.width) * cfg.num_classes


def forward_flops(
  cfg: MotionformerConfig, num_frames: int, image_size: int, head: bool = True
) -> float:
  """Analytic forward FLOPs of one clip (matmuls and attention; 2 per multiply-add)."""
  pt, ph, pw = cfg.patch_size
  t, s = num_frames // pt, (image_size // ph) * (image_size // pw)
  embed = 2 * t * s * pt * ph * pw * 3 * cfg.width
  mlp = 2 * 2 * (t * s + 1) * cfg.width * cfg.mlp_dim
  blocks = cfg.depth * (attention_flops(cfg, t, s) + mlp)
  return float(embed + blocks + (head_flops(cfg) if head else 0))


# ----------------------------------------------------------------------------- checks


def config_errors(cfg: MotionformerConfig, mesh_shape: Mapping[str, int], num_frames, image_size):
  """Sizes that do not split over the mesh, tubelets that do not tile the clip, too many
  landmarks."""
  errors = layers.vit_mesh_errors(cfg.width, cfg.num_heads, cfg.mlp_dim, mesh_shape)
  errors += layers.tubelet_errors(cfg.patch_size, num_frames, image_size)
  pt, ph, pw = cfg.patch_size
  tokens = (num_frames // pt) * (image_size // ph) * (image_size // pw)
  if cfg.attention == "orthoformer" and cfg.landmarks > tokens:
    errors.append(
      f"model.landmarks={cfg.landmarks} is more than the {tokens} space-time tokens of a "
      f"{num_frames}x{image_size}x{image_size} clip the Orthoformer selects them from; use at "
      f"most {tokens}"
    )
  return errors


def finalize(values: dict, *, fields, num_frames: int, image_size: int) -> dict:
  """model.num_frames and model.image_size are the data's: the position embeddings cover them."""
  del fields
  values["num_frames"] = num_frames
  values["image_size"] = image_size
  return values


def token_grid(cfg: MotionformerConfig, num_frames: int, image_size: int) -> TokenGrid:
  pt, ph, pw = cfg.patch_size
  return TokenGrid(num_frames // pt, 0, image_size // ph, image_size // pw)


FAMILY = ModelFamily(
  name="motionformer",
  config_class=MotionformerConfig,
  variants=VARIANTS,
  build=Motionformer,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  finalize=finalize,
  causal=False,
)
