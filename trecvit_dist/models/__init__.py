"""Model families, one module each, picked by `--config.model.name` (see models/family.py).

Adding a family: a module with a `FAMILY = ModelFamily(...)` and one line in FAMILIES (or
`register(FAMILY)` at run time, e.g. from a test or a notebook).
"""

from __future__ import annotations

import importlib

from trecvit_dist.models.family import ModelFamily, TokenGrid
from trecvit_dist.models.trecvit import (
  VARIANTS,
  TRecViT,
  TRecViTConfig,
  check_video,
  from_official_json,
  make_config,
)

# name -> the module that defines FAMILY (imported on first use).
FAMILIES: dict[str, str] = {
  "trecvit": "trecvit_dist.models.trecvit",
  "vivit": "trecvit_dist.models.vivit",
  "vivit_factorised": "trecvit_dist.models.vivit_factorised",
  "pure_lru": "trecvit_dist.models.pure_lru",
  "tubevit": "trecvit_dist.models.tubevit",
  "motionformer": "trecvit_dist.models.motionformer",
}
_registered: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> None:
  """Makes model.name=family.name pick `family` (replaces an earlier one of that name)."""
  _registered[family.name] = family


def get(name: str) -> ModelFamily:
  """The family registered as `name`; an unknown name lists the known ones."""
  if name in _registered:
    return _registered[name]
  if name not in FAMILIES:
    known = sorted(set(FAMILIES) | set(_registered))
    raise ValueError(f"Unknown model.name {name!r}; choose one of {known}.")
  family = importlib.import_module(FAMILIES[name]).FAMILY
  _registered[name] = family
  return family


def names() -> list[str]:
  return sorted(set(FAMILIES) | set(_registered))


__all__ = [
  "FAMILIES",
  "VARIANTS",
  "ModelFamily",
  "TRecViT",
  "TRecViTConfig",
  "TokenGrid",
  "check_video",
  "from_official_json",
  "get",
  "make_config",
  "names",
  "register",
]
