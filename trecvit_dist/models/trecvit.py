"""TRecViT in Flax linen: time mixed by gated LRUs, space by ViT attention, channels by MLPs.

Input video float32 [b, t, h, w, 3] in [0, 1]. Tokens x_BTNC: [b, t, n (+1 CLS), c].
Per layer: (b t n c) -> ((b n) t c) gated-LRU residual block; ((b t) n c) ViT block.

Module and parameter names follow the official release (tokenizer/, encoder/residualblock_{i:02d},
encoder/encoderblock_{i}, decoder/) so official checkpoints load by path (`import_params`).
Linen is used (not NNX) because the official model is linen, so its parameter tree maps
one-to-one, and linen's logical partitioning (nn.with_logical_partitioning + logical rules) is
what the trainer shards with.

Every temporal block accepts a recurrent `state` ({"h": [(b n), lru_width], "conv": [(b n),
W-1, lru_width]}); None means "start of a video". Passing the returned state back continues the
video, which is how frame-by-frame inference runs in constant memory.

Time parallelism (mesh.time > 1): activations carry act_time on their frame axis, so each device
holds a contiguous block of frames for the whole model. The ViT blocks act within a frame
(`sharding.frame_rows` keeps the (video, frame) rows local); the gated-LRU block's conv1d and scan
exchange only halos and [rows, width] carries across shards (sharding.causal_conv, gated_lru).

The family (`FAMILY`, model.name=trecvit) owns the config, the named sizes (Ti, S, B, L, H), the
config checks against the mesh and the data, the analytic FLOPs behind perf/mfu, and the import
of official and ImageNet-ViT .npz files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trecvit_dist import sharding
from trecvit_dist.models import layers, vit_checkpoint
from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.layers import LOGICAL

# width, depth, mlp_dim, num_heads: the ViT sizes the paper's TRecViT variants follow.
VARIANTS: dict[str, dict[str, int]] = {
  "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
  "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
  "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
  "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
  "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class TRecViTConfig:
  """Every hyper-parameter of the official TRecViT; defaults are the released TRecViT-B (K400)."""

  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: tuple[int, int, int] = (1, 16, 16)
  num_classes: int = 400
  # Pre-logits Dense(rep_size) + tanh before the classifier, as released; None drops it.
  rep_size: int | None = 3072
  # Clips of this many frames are run independently (fresh recurrent state) and averaged.
  frames_per_clip: int = 32
  conv1d_temporal_width: int = 4  # 4 as released, 2 in the paper.
  state_multiplier: int = 2  # lru_width = state_multiplier * width (1 gives the paper's 109M).
  lru_num_heads: int | None = None  # blocks of the block-diagonal gates; None = num_heads.
  min_rad: float = 0.5
  max_rad: float = 0.999
  lru_c: float = 8.0
  lru_impl: str = "auto"  # kernels.gated_lru impl: "auto", "pallas", "xla", "associative".
  posemb: str = "learned"  # "learned" or "sincos2d" (spatial only).
  use_cls_token: bool = True
  pooling: str = "cls"  # "cls" (mean over frames of the per-frame CLS) or "gap" (all tokens).
  classifier_dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32.
  remat: str = "none"  # "none", "full", "dots_saveable" (rematerialise each layer).
  # Ablation switch: False drops every gated-LRU block (a per-frame ViT, blind to motion).
  temporal_blocks: bool = True

  def __post_init__(self):
    errors = []
    if self.width % self.num_heads:
      errors.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if len(tuple(self.patch_size)) != 3:
      errors.append(f"patch_size must be (t, h, w), got {self.patch_size}")
    if self.lru_width % self.gate_heads:
      errors.append(f"lru width {self.lru_width} is not divisible by {self.gate_heads} gate heads")
    if self.posemb not in ("learned", "sincos2d"):
      errors.append(f"posemb must be 'learned' or 'sincos2d', got {self.posemb!r}")
    if self.pooling not in ("cls", "gap"):
      errors.append(f"pooling must be 'cls' or 'gap', got {self.pooling!r}")
    if self.pooling == "cls" and not self.use_cls_token:
      errors.append("pooling='cls' needs use_cls_token=True (or set pooling='gap')")
    if self.remat not in layers.REMAT_POLICIES:
      errors.append(f"remat must be 'none', 'full' or 'dots_saveable', got {self.remat!r}")
    if self.lru_impl not in ("auto", "pallas", "xla", "associative"):
      errors.append(f"lru_impl must be auto/pallas/xla/associative, got {self.lru_impl!r}")
    if not 0.0 < self.min_rad < self.max_rad < 1.0:
      errors.append(f"need 0 < min_rad < max_rad < 1, got {self.min_rad}, {self.max_rad}")
    if errors:
      raise ValueError("Invalid TRecViT config: " + "; ".join(errors) + ".")
    object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

  @property
  def lru_width(self) -> int:
    return self.state_multiplier * self.width

  @property
  def gate_heads(self) -> int:
    return self.lru_num_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def lru(self) -> layers.LRUSettings:
    return layers.LRUSettings(
      lru_width=self.lru_width,
      gate_heads=self.gate_heads,
      conv1d_temporal_width=self.conv1d_temporal_width,
      min_rad=self.min_rad,
      max_rad=self.max_rad,
      c=self.lru_c,
      impl=self.lru_impl,
      dtype=self.dtype,
    )

  def replace(self, **kwargs) -> TRecViTConfig:
    return dataclasses.replace(self, **kwargs)


def make_config(variant: str | None = None, **overrides: Any) -> TRecViTConfig:
  """Config for a named size ("Ti", "S", "B", "L", "H"), with field overrides."""
  fields = {}
  if variant:
    if variant not in VARIANTS:
      raise ValueError(f"Unknown TRecViT variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    fields.update(VARIANTS[variant])
  unknown = set(overrides) - {f.name for f in dataclasses.fields(TRecViTConfig)}
  if unknown:
    raise ValueError(f"Unknown TRecViT config fields: {sorted(unknown)}.")
  fields.update({k: v for k, v in overrides.items() if v is not None or k == "rep_size"})
  return TRecViTConfig(**fields)


def from_official_json(cfg: Mapping[str, Any], **overrides: Any) -> TRecViTConfig:
  """Config from the official fixture's JSON keys (tiny_config.json layout)."""
  fields = dict(
    width=cfg["width"],
    depth=cfg["depth"],
    mlp_dim=cfg["mlp_dim"],
    num_heads=cfg["num_heads"],
    patch_size=tuple(cfg["patch_size"]),
    conv1d_temporal_width=cfg.get("conv1d_temporal_width", 4),
    state_multiplier=cfg.get("state_multiplier", 2),
    min_rad=cfg.get("min_rad", 0.5),
    num_classes=cfg["num_classes"],
    rep_size=cfg.get("rep_size"),
    frames_per_clip=cfg.get("frames_per_clip", cfg.get("frames", 32)),
  )
  fields.update(overrides)
  return TRecViTConfig(**fields)


def _dtype(cfg: TRecViTConfig):
  return jnp.dtype(cfg.dtype)


# ----------------------------------------------------------------------------- modules


class ResidualBlock(nn.Module):
  """Temporal mixing, space folded into batch: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC, state=None):
    b, _, n, _ = x_BTNC.shape
    x = einops.rearrange(x_BTNC, "b t n c -> (b n) t c")
    x = nn.with_logical_constraint(x, ("act_batch", "act_time", "act_embed"))
    y = layers.RMSNorm(name="temporal_pre_norm")(x)
    y, state = layers.RecurrentBlock(self.cfg.lru, name="recurrent_block")(y, state)
    x = x + y
    return einops.rearrange(x, "(b n) t c -> b t n c", b=b, n=n), state


class EncoderBlock(nn.Module):
  """Spatial + channel mixing, time folded into batch: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC):
    b, t = x_BTNC.shape[:2]
    cfg = self.cfg
    # Rows are (video, frame) pairs: sharded over batch and time axes alike, no data moves.
    with sharding.frames_as_rows():
      x = sharding.frame_rows(x_BTNC)
      x = nn.with_logical_constraint(x, ("act_batch", None, "act_embed"))
      x = layers.vit_block(x, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, dtype=_dtype(cfg))
    x = sharding.frame_rows_inverse(x, b, t)
    return nn.with_logical_constraint(x, ("act_batch", "act_time", None, "act_embed"))


class Encoder(nn.Module):
  """depth x (ResidualBlock, EncoderBlock), then LayerNorm: [b, t, n, c] -> [b, t, n, c]."""

  cfg: TRecViTConfig

  @nn.compact
  def __call__(self, x_BTNC, state=None):
    cfg = self.cfg
    residual_cls = layers.remat(ResidualBlock, cfg.remat)
    encoder_cls = layers.remat(EncoderBlock, cfg.remat)
    new_state = []
    for i in range(cfg.depth):
      if cfg.temporal_blocks:
        x_BTNC, layer_state = residual_cls(cfg, name=f"residualblock_{i:02d}")(
          x_BTNC, None if state is None else state[i]
        )
        new_state.append(layer_state)
      x_BTNC = encoder_cls(cfg, name=f"encoderblock_{i}")(x_BTNC)
    x_BTNC = layers.layer_norm(_dtype(cfg), "encoder_norm")(x_BTNC)
    return x_BTNC, tuple(new_state)


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
      pos_NC = jnp.asarray(layers.sincos_2d(gh, gw, cfg.width))
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
      self.pre_logits = layers.dense(cfg.rep_size, ("embed", "mlp"), jnp.float32, "pre_logits")
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
    x = nn.with_logical_constraint(x, ("act_batch", "act_time", None, "act_embed"))
    return self.encoder(x, state)

  def tokens(self, video_BTHWC, train: bool = False):
    """Final-layer tokens [b, t', 1 + n, c] (the per-frame CLS first), from a fresh state."""
    del train
    return self.encode(video_BTHWC)[0]

  def __call__(self, video_BTHWC, train: bool = False):
    """One clip from a fresh state: logits [b, classes]."""
    encoded, _ = self.encode(video_BTHWC)
    logits, _ = self.decoder(encoded, train)
    return logits

  def frame_features(self, encoded_BTNC):
    return self.decoder.frame_features(encoded_BTNC)

  def classify(self, pooled_BR):
    return self.decoder.logits(pooled_BR)


# ----------------------------------------------------------------------------- FLOPs


def blocks_flops(cfg: TRecViTConfig, frames: int, tokens_per_frame: int) -> float:
  """Forward FLOPs (2 per multiply-add) of cfg.depth layers on [frames, tokens_per_frame] tokens.

  Counts matmuls and attention; element-wise work (norms, gates' nonlinearities, the scan
  itself) is left out, as is customary for MFU.
  """
  per_token = layers.vit_block_flops(cfg.width, cfg.mlp_dim, tokens_per_frame)
  if cfg.temporal_blocks:
    per_token += layers.recurrent_block_flops(cfg.width, cfg.lru)
  return float(cfg.depth * frames * tokens_per_frame * per_token)


def grid(cfg: TRecViTConfig, num_frames: int, image_size: int) -> tuple[int, int, int]:
  """(frames t, patches per frame n, pixels per patch P * 3)."""
  pt, ph, pw = cfg.patch_size
  return num_frames // pt, (image_size // ph) * (image_size // pw), pt * ph * pw * 3


def forward_flops(cfg: TRecViTConfig, num_frames: int, image_size: int, head: bool = True) -> float:
  """Analytic forward FLOPs of one clip through TRecViT (see blocks_flops)."""
  t, n, patch_dim = grid(cfg, num_frames, image_size)
  c, cls = cfg.width, int(cfg.use_cls_token)
  patch = 2 * t * n * patch_dim * c
  classifier = 2 * t * c * (cfg.rep_size or 0) + 2 * (cfg.rep_size or c) * cfg.num_classes
  return float(patch + blocks_flops(cfg, t, n + cls) + (classifier if head else 0))


# ----------------------------------------------------------------------------- checks


def config_errors(cfg: TRecViTConfig, mesh_shape: Mapping[str, int], num_frames, image_size):
  """What would otherwise fail deep inside a compile: sizes that do not split over the mesh."""
  errors = []
  tensor = mesh_shape.get("tensor", 1)
  for what, size in (
    ("num_heads", cfg.num_heads),
    ("mlp_dim", cfg.mlp_dim),
    ("lru width", cfg.lru_width),
    ("gate heads", cfg.gate_heads),
  ):
    if size % tensor:
      errors.append(f"{what} {size} is not divisible by mesh.tensor={tensor}")
  if cfg.width % mesh_shape.get("fsdp", 1):
    errors.append(f"width {cfg.width} is not divisible by mesh.fsdp={mesh_shape['fsdp']}")
  if image_size % cfg.patch_size[1] or num_frames % cfg.patch_size[0]:
    errors.append(
      f"data.image_size {image_size} / data.num_frames {num_frames} do not divide by the patch "
      f"size {cfg.patch_size}"
    )
  time = mesh_shape.get(sharding.TIME_AXIS, 1)
  slots = num_frames // cfg.patch_size[0]
  if time > 1 and (num_frames % cfg.patch_size[0] or slots % time):
    errors.append(
      f"mesh.time={time} does not divide the {slots} time steps of a clip (data.num_frames "
      f"{num_frames} / temporal patch {cfg.patch_size[0]}); pick data.num_frames a multiple of "
      f"{time * cfg.patch_size[0]} or a mesh.time that divides {slots}"
    )
  return errors


def _finalize(values: dict, *, fields, num_frames: int, image_size: int) -> dict:
  del image_size
  values["frames_per_clip"] = num_frames
  if fields.get("rep_size") is None:  # unset: 4 * width, as released (3072 for B)
    values["rep_size"] = 4 * values.get("width", TRecViTConfig.width)
  return values


def token_grid(cfg: TRecViTConfig, num_frames: int, image_size: int) -> TokenGrid:
  pt, ph, pw = cfg.patch_size
  return TokenGrid(num_frames // pt, int(cfg.use_cls_token), image_size // ph, image_size // pw)


# ----------------------------------------------------------------------------- official layout


def expected_shapes(cfg: TRecViTConfig, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
  """Flat {"a/b/c": shape} of the parameters our model has for this config and image size."""
  video = jax.ShapeDtypeStruct((1, cfg.patch_size[0], *image_size, 3), jnp.float32)
  variables = jax.eval_shape(TRecViT(cfg).init, jax.random.key(0), video)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(variables["params"]), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def import_params(
  flat: Mapping[str, np.ndarray],
  cfg: TRecViTConfig,
  image_size: tuple[int, int],
  *,
  ignore_prefixes: Iterable[str] = (),
  allow_missing_prefixes: Iterable[str] = (),
) -> dict:
  """Official flat params -> our nested params; lists every missing, unexpected or mis-shaped key.

  ignore_prefixes: checkpoint keys to drop silently (e.g. an MAE pixel decoder when only the
  encoder is wanted). allow_missing_prefixes: our keys that may stay absent (the caller
  initialises them, e.g. a new classifier head).
  """
  expected = expected_shapes(cfg, image_size)
  ignore, allow_missing = tuple(ignore_prefixes), tuple(allow_missing_prefixes)
  given = {k: v for k, v in flat.items() if not (ignore and k.startswith(ignore))}
  missing = sorted(
    k for k in expected if k not in given and not (allow_missing and k.startswith(allow_missing))
  )
  unexpected = sorted(k for k in given if k not in expected)
  misshaped = sorted(
    f"{k}: checkpoint {tuple(given[k].shape)} vs model {expected[k]}"
    for k in given
    if k in expected and tuple(given[k].shape) != expected[k]
  )
  if missing or unexpected or misshaped:
    lines = ["The checkpoint does not match the model config:"]
    for title, keys in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    ):
      if keys:
        lines.append(f"  {len(keys)} {title} key(s):")
        lines += [f"    {k}" for k in keys]
    lines.append(
      "Check the config (width, depth, heads, mlp_dim, patch_size, state_multiplier, "
      "conv1d_temporal_width, rep_size, num_classes, image size for pos_embedding)."
    )
    raise ValueError("\n".join(lines))
  kept = {tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in given.items()}
  return flax.traverse_util.unflatten_dict(kept)


ENCODER_PREFIXES = ("tokenizer/", "encoder/")
HEAD_PREFIXES = ("decoder/",)


def import_encoder(flat: Mapping[str, np.ndarray], cfg: TRecViTConfig, image_size):
  """({"tokenizer": ..., "encoder": ...}, ignored keys) from a flat official-layout dict.

  Keys outside tokenizer/ and encoder/ (a classifier's or an MAE release's decoder/, our
  mae_decoder/) are ignored and listed; tokenizer/ and encoder/ must match cfg exactly (missing,
  unexpected or mis-shaped keys raise import_params' ValueError).
  """
  ignored = sorted(k for k in flat if not k.startswith(ENCODER_PREFIXES))
  params = import_params(
    flat, cfg, image_size, ignore_prefixes=tuple(ignored), allow_missing_prefixes=HEAD_PREFIXES
  )
  return {k: params[k] for k in ("tokenizer", "encoder")}, ignored


def import_image_vit(vit: vit_checkpoint.ImageViT, cfg: TRecViTConfig, image_size: int):
  """An ImageNet ViT -> (flat params under our paths, notes, keys left fresh) for init_from.

  The ViT's blocks become the per-frame encoderblock_{i} and its encoder_norm ours; the 2D patch
  kernel becomes the tokenizer's (1, p, p) one (central frame of a longer tubelet); the position
  grid is resized bilinearly when the image grid differs; the CLS gets its position embedding
  folded in (TRecViT adds none to it). The gated-LRU blocks and the classifier start fresh.
  """
  vit.check_fits(
    "TRecViT",
    width=cfg.width,
    depth=cfg.depth,
    num_heads=cfg.num_heads,
    mlp_dim=cfg.mlp_dim,
    patch_hw=cfg.patch_size[1:],
  )
  expected = expected_shapes(cfg, (image_size, image_size))
  pt, ph, pw = cfg.patch_size
  patch_grid = (image_size // ph, image_size // pw)
  loaded = {
    "tokenizer/embedding/bias": vit.patch_bias,
    **vit.block_params("encoder/"),
    **vit.encoder_norm_params("encoder/"),
  }
  adapted = {"tokenizer/embedding/kernel": f"2D patch kernel placed on frame {pt // 2} of {pt}"}
  params = {"tokenizer/embedding/kernel": vit_checkpoint.central_frame_kernel(vit.patch_kernel, pt)}
  if "tokenizer/pos_embedding" in expected:
    params["tokenizer/pos_embedding"] = vit.resized_grid(patch_grid)[None]
    if patch_grid != vit.grid:
      adapted["tokenizer/pos_embedding"] = f"{vit.grid} grid resized bilinearly to {patch_grid}"
    else:
      loaded["tokenizer/pos_embedding"] = params["tokenizer/pos_embedding"]
  if "tokenizer/cls" in expected and vit.cls is not None:
    params["tokenizer/cls"] = vit.cls_with_position().reshape(1, 1, -1)
    adapted["tokenizer/cls"] = "the ViT's CLS plus its position embedding"
  params.update(loaded)
  fresh = sorted(k for k in expected if k not in params)
  misshaped = [k for k, v in params.items() if tuple(v.shape) != expected.get(k)]
  if misshaped:
    raise ValueError(f"init_from: ImageNet ViT mapped to mis-shaped TRecViT keys {misshaped}.")
  notes = vit_checkpoint.import_notes(vit, list(loaded), adapted, fresh)
  if "tokenizer/pos_embedding" not in expected:
    notes.append("the ViT's position embedding is unused (model.posemb=sincos2d)")
  return params, notes, fresh


def import_npz(flat: Mapping[str, np.ndarray], cfg: TRecViTConfig, image_size, with_head: bool):
  """An official-layout or ImageNet-ViT .npz -> (flat params under our paths, notes, keys left
  fresh) for init_from.

  Official layout: with a classifier wanted and present in the file, everything loads (a head of
  another class count is left out, so it starts fresh); otherwise only the encoder loads
  (`import_encoder`). An ImageNet ViT (vit_checkpoint's layouts): `import_image_vit`.
  """
  if vit_checkpoint.is_image_vit(flat):
    return import_image_vit(vit_checkpoint.read(flat), cfg, image_size)
  size = (image_size, image_size)
  if with_head and any(k.startswith("decoder/cls_head") for k in flat):
    shapes = expected_shapes(cfg, size)
    mismatch = any(
      k.startswith("decoder/cls_head") and k in shapes and tuple(v.shape) != shapes[k]
      for k, v in flat.items()
    )
    kept = {k: v for k, v in flat.items() if not (mismatch and k.startswith("decoder/cls_head"))}
    params = import_params(
      kept,
      cfg,
      size,
      ignore_prefixes=("mae_decoder/",),
      allow_missing_prefixes=("decoder/cls_head",) if mismatch else (),
    )
    notes = ["the classifier head has another class count: not loaded"] if mismatch else []
  else:
    params, ignored = import_encoder(flat, cfg, size)
    notes = [f"ignored {len(ignored)} keys: {ignored}"] if ignored else []
  return flax.traverse_util.flatten_dict(params, sep="/"), notes, ()


FAMILY = ModelFamily(
  name="trecvit",
  config_class=TRecViTConfig,
  variants=VARIANTS,
  build=TRecViT,
  config_errors=config_errors,
  forward_flops=forward_flops,
  token_grid=token_grid,
  head_prefixes=HEAD_PREFIXES,
  finalize=_finalize,
  import_npz=import_npz,
  causal=True,
  time_parallel=True,
)
