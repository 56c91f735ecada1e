"""What a model family tells the rest of the system: `ModelFamily`, one instance per model module.

A family module (trecvit_dist/models/NAME.py) defines its hyper-parameter dataclass, its named
sizes, a Flax module and a `FAMILY = ModelFamily(...)`; `models.register` or one line in
`models.FAMILIES` makes `--config.model.name=NAME` pick it. The trainer, tasks, `compile_check`,
`cost` and `init_from` use only what is declared here.

The module built by `FAMILY.build(cfg)` must provide
  __call__(video_BTHWC, train=False) -> logits [b, cfg.num_classes]
  tokens(video_BTHWC, train=False)   -> final-layer tokens [b, t', L, c] per time slot t'
                                        (TokenGrid says how the L tokens are laid out)
with video float32 [b, t, h, w, 3] in [0, 1]. Parameters of the classifier live under
`head_prefixes` (they start fresh when init_from's source lacks them or has another shape).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

# Fields of config.model that are not family hyper-parameters.
META_FIELDS = ("name", "variant", "num_classes")


@dataclasses.dataclass(frozen=True)
class TokenGrid:
  """Layout of `tokens()`: [b, frames, prefix + height * width, c], patch tokens row-major."""

  frames: int  # time slots t' (frames / temporal patch size)
  prefix: int  # per-slot tokens before the patch tokens (e.g. a per-frame CLS)
  height: int  # patch rows
  width: int  # patch columns


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """A registry entry; see the module docstring for the module protocol."""

  name: str
  config_class: type
  variants: Mapping[str, Mapping[str, Any]]
  build: Callable[[Any], nn.Module]
  # (cfg, mesh_shape {"data", "fsdp", "tensor", ...}, num_frames, image_size) -> error strings.
  config_errors: Callable[[Any, Mapping[str, int], int, int], list[str]]
  # (cfg, num_frames, image_size, head) -> forward FLOPs of one clip (2 per multiply-add; matmuls
  # and attention, not element-wise work); head=False leaves out the classifier.
  forward_flops: Callable[..., float]
  # (cfg, num_frames, image_size) -> TokenGrid of tokens().
  token_grid: Callable[[Any, int, int], TokenGrid]
  head_prefixes: tuple[str, ...] = ("head/",)
  # Fills family-specific fields after the generic ones: (cfg, num_frames, image_size, fields).
  finalize: Callable[..., Any] | None = None
  # (flat npz dict, cfg, image_size, with_head) -> (flat params in our paths, notes); None: the
  # family loads no .npz (init_from then takes another workdir only).
  import_npz: Callable[..., tuple[dict, list[str]]] | None = None
  causal: bool = False  # outputs at frame t depend on frames <= t only
  # Frames may be sharded over the mesh axis `time` (mesh.time > 1): every layer acts within a
  # frame or along time through sharding.gated_lru / causal_conv. Others refuse mesh.time > 1.
  time_parallel: bool = False

  def make_config(
    self, fields: Mapping[str, Any], *, num_classes: int, num_frames: int, image_size: int
  ):
    """cfg from config.model fields: dataclass defaults <- variant <- set (non-None) fields."""
    names = {f.name for f in dataclasses.fields(self.config_class)}
    variant = fields.get("variant") or None
    values: dict[str, Any] = {}
    if variant:
      if variant not in self.variants:
        raise ValueError(
          f"Unknown {self.name} variant {variant!r}; choose one of {sorted(self.variants)} "
          "(model.variant)."
        )
      values.update(self.variants[variant])
    ignored = []
    for key, value in fields.items():
      if key in META_FIELDS or value is None:
        continue
      if key in names:
        values[key] = tuple(value) if isinstance(value, list) else value
      else:
        ignored.append(key)
    if ignored:
      logging.info(
        "model %s: config.model fields %s are not its hyper-parameters.", self.name, ignored
      )
    if "num_classes" in names:
      values["num_classes"] = num_classes
    if self.finalize is not None:
      values = self.finalize(values, fields=fields, num_frames=num_frames, image_size=image_size)
    return self.config_class(**values)
