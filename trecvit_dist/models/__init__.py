"""TRecViT models."""

from trecvit_dist.models.config import VARIANTS, TRecViTConfig, from_official_json, make_config
from trecvit_dist.models.trecvit import TRecViT, check_video

__all__ = [
  "VARIANTS",
  "TRecViT",
  "TRecViTConfig",
  "check_video",
  "from_official_json",
  "make_config",
]
