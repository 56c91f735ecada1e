"""TRecViT hyper-parameters and the named sizes (Ti, S, B, L, H)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
    if self.remat not in ("none", "full", "dots_saveable"):
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
