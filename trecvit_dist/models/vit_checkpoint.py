"""Public ImageNet-ViT checkpoints (.npz) read into one canonical form video models start from.

Layouts recognised (keys may sit under a prefix: "", "opt/target/", "params/", "params/img/"):

  vision_transformer (ViT-B_16.npz, the augreg releases): embedding/kernel [p, p, 3, c],
    embedding/bias, cls [1, 1, c], Transformer/posembed_input/pos_embedding [1, 1 + n, c] (the
    CLS's position first), Transformer/encoderblock_{i}/{LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}, Transformer/encoder_norm, head/ (and
    pre_logits/) for the image classes.
  big_vision: pos_embedding [1, n, c] (no CLS position; cls only with pool_type "tok"),
    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0} or one scanned Transformer/encoderblock/ with a leading depth axis, MAPHead_0/,
    head/.

`read(flat)` gives an `ImageViT` whose blocks use layers.vit_block's names (LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1, MlpBlock_0/Dense_{0,1}); each
family's `import_npz` maps it onto its own tree with the helpers below (2D patch kernel -> tubelet,
position grid resized and tiled over time) and lists what it loaded, adapted and left fresh.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

PREFIXES = ("", "opt/target/", "params/", "params/img/")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCANNED = "Transformer/encoderblock/"


@dataclasses.dataclass(frozen=True)
class ImageViT:
  """An image ViT's parameters (float32), named as layers.vit_block names them."""

  layout: str  # "vision_transformer" or "big_vision"
  patch_kernel: np.ndarray  # [ph, pw, 3, c]
  patch_bias: np.ndarray  # [c]
  cls: np.ndarray | None  # [c]; None for a ViT without a class token (gap / MAP pooling)
  cls_pos: np.ndarray | None  # [c]: the CLS's own position embedding (vision_transformer only)
  pos_grid: np.ndarray  # [gh, gw, c]: the patches' position embedding
  blocks: tuple[dict[str, np.ndarray], ...]  # per block {"LayerNorm_0/scale": ..., ...}
  encoder_norm: dict[str, np.ndarray]  # {"scale": [c], "bias": [c]}
  ignored: tuple[str, ...]  # source keys not used for video (image classifier, MAP head)

  @property
  def width(self) -> int:
    return int(self.patch_kernel.shape[-1])

  @property
  def depth(self) -> int:
    return len(self.blocks)

  @property
  def num_heads(self) -> int:
    return int(self.blocks[0]["MultiHeadDotProductAttention_0/query/kernel"].shape[1])

  @property
  def mlp_dim(self) -> int:
    return int(self.blocks[0]["MlpBlock_0/Dense_0/kernel"].shape[1])

  @property
  def patch_size(self) -> tuple[int, int]:
    return tuple(int(p) for p in self.patch_kernel.shape[:2])

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(int(g) for g in self.pos_grid.shape[:2])

  def summary(self) -> str:
    cls = "a CLS token" if self.cls is not None else "no CLS token"
    return (
      f"ImageNet ViT ({self.layout} layout): width {self.width}, depth {self.depth}, "
      f"{self.num_heads} heads, MLP {self.mlp_dim}, patch {self.patch_size[0]}x"
      f"{self.patch_size[1]}, position grid {self.grid[0]}x{self.grid[1]}, {cls}"
    )

  def check_fits(
    self, model: str, *, width: int, depth: int, num_heads: int, mlp_dim: int, patch_hw
  ) -> None:
    """Raises a ValueError listing every size in which the model differs from this ViT."""
    wanted = dict(
      width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, patch=tuple(patch_hw)
    )
    have = dict(
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      patch=self.patch_size,
    )
    diffs = [f"{k} {have[k]} (model: {wanted[k]})" for k in wanted if have[k] != wanted[k]]
    if diffs:
      raise ValueError(
        f"init_from: the ImageNet ViT does not fit {model}: the checkpoint has "
        + ", ".join(diffs)
        + ". Pick the model size matching the checkpoint (model.variant: Ti 192, S 384, B 768, "
        "L 1024 wide) or a ViT checkpoint of the model's size; the patch size must match too."
      )

  def block_params(self, prefix: str) -> dict[str, np.ndarray]:
    """Every block under prefix + "encoderblock_{i}/" (our vit_block names)."""
    return {
      f"{prefix}encoderblock_{i}/{k}": v
      for i, block in enumerate(self.blocks)
      for k, v in block.items()
    }

  def encoder_norm_params(self, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}encoder_norm/{k}": v for k, v in self.encoder_norm.items()}

  def resized_grid(self, grid_hw) -> np.ndarray:
    """The patch position embedding [gh * gw, c] for a grid of grid_hw patches."""
    gh, gw = grid_hw
    return resize_grid(self.pos_grid, (gh, gw)).reshape(gh * gw, self.width)

  def cls_with_position(self) -> np.ndarray:
    """CLS + its position embedding [c], for models that add no position to their CLS."""
    pos = self.cls_pos if self.cls_pos is not None else 0.0
    return self.cls + pos


def find_prefix(flat: Mapping[str, np.ndarray]) -> str | None:
  """The prefix under which flat holds an image ViT (see PREFIXES), or None."""
  for prefix in PREFIXES:
    kernel = flat.get(f"{prefix}embedding/kernel")
    has_blocks = f"{prefix}Transformer/encoderblock_0/LayerNorm_0/scale" in flat or (
      f"{prefix}{_SCANNED}LayerNorm_0/scale" in flat
    )
    # A 2D patch kernel: a video model's embedding (e.g. our ViViT's) has a 5-D one.
    if kernel is not None and np.ndim(kernel) == 4 and has_blocks:
      return prefix
  return None


def is_image_vit(flat: Mapping[str, np.ndarray]) -> bool:
  """Whether flat is an image ViT in one of the public layouts."""
  return find_prefix(flat) is not None


def read(flat: Mapping[str, np.ndarray]) -> ImageViT:
  """An image ViT's flat .npz dict -> ImageViT; a ValueError names what is missing."""
  prefix = find_prefix(flat)
  if prefix is None:
    raise ValueError(
      "Not an image ViT checkpoint: expected embedding/kernel [p, p, 3, c] and "
      "Transformer/encoderblock_0/... (vision_transformer or big_vision layout), possibly under "
      f"one of the prefixes {[p for p in PREFIXES if p]}."
    )
  src = {
    k[len(prefix) :]: np.asarray(v, np.float32) for k, v in flat.items() if k.startswith(prefix)
  }
  used: set[str] = set()

  def take(key: str) -> np.ndarray:
    if key not in src:
      raise ValueError(f"Image ViT checkpoint: missing {prefix}{key}.")
    used.add(key)
    return src[key]

  raw_blocks = _raw_blocks(src, used)
  blocks = tuple(_canonical_block(b, i) for i, b in enumerate(raw_blocks))
  layout = (
    "big_vision"
    if "MultiHeadDotProductAttention_0/query/kernel" in raw_blocks[0]
    else ("vision_transformer")
  )
  if "Transformer/posembed_input/pos_embedding" in src:
    pos = take("Transformer/posembed_input/pos_embedding")
  else:
    pos = take("pos_embedding")
  pos = pos.reshape(-1, pos.shape[-1])
  cls = take("cls").reshape(-1) if "cls" in src else None
  cls_pos = None
  side = math.isqrt(pos.shape[0])
  if side * side != pos.shape[0]:
    side = math.isqrt(pos.shape[0] - 1)
    if side * side != pos.shape[0] - 1:
      raise ValueError(
        f"Image ViT checkpoint: position embedding of {pos.shape[0]} positions is neither a square "
        "grid nor 1 + a square grid."
      )
    cls_pos, pos = pos[0], pos[1:]
  vit = ImageViT(
    layout=layout,
    patch_kernel=take("embedding/kernel"),
    patch_bias=take("embedding/bias"),
    cls=cls,
    cls_pos=cls_pos,
    pos_grid=pos.reshape(side, side, -1),
    blocks=blocks,
    encoder_norm={k: take(f"Transformer/encoder_norm/{k}") for k in ("scale", "bias")},
    ignored=tuple(sorted(prefix + k for k in src if k not in used)),
  )
  shapes_ok = (
    vit.patch_kernel.shape[2] == 3
    and vit.pos_grid.shape[-1] == vit.width
    and all(b["LayerNorm_0/scale"].shape == (vit.width,) for b in blocks)
  )
  if not shapes_ok:
    raise ValueError(
      f"Image ViT checkpoint: inconsistent shapes (patch kernel {vit.patch_kernel.shape}, position "
      f"embedding {vit.pos_grid.shape}, block width {blocks[0]['LayerNorm_0/scale'].shape})."
    )
  return vit


def _raw_blocks(src: Mapping[str, np.ndarray], used: set[str]) -> list[dict[str, np.ndarray]]:
  """[{name within the block: array}] per block, from numbered or scanned blocks."""
  numbered: dict[int, dict[str, np.ndarray]] = {}
  for key, value in src.items():
    m = _BLOCK.match(key)
    if m:
      numbered.setdefault(int(m.group(1)), {})[m.group(2)] = value
      used.add(key)
  if numbered:
    if sorted(numbered) != list(range(len(numbered))):
      raise ValueError(f"Image ViT checkpoint: block numbers {sorted(numbered)} are not 0..n-1.")
    return [numbered[i] for i in range(len(numbered))]
  scanned = {k[len(_SCANNED) :]: v for k, v in src.items() if k.startswith(_SCANNED)}
  used.update(_SCANNED + k for k in scanned)
  depth = int(next(iter(scanned.values())).shape[0])
  return [{k: v[i] for k, v in scanned.items()} for i in range(depth)]


def _canonical_block(block: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
  """A block's keys renamed to vit_block's: the attention, the MLP and the two LayerNorms in
  order (vision_transformer numbers them 0, 1, 2, 3; big_vision 0, 0, 1, 0)."""

  def modules(pattern: str) -> list[str]:
    found = {m.group(0) for k in block if (m := re.match(pattern, k))}
    return sorted(found, key=lambda name: int(name.rsplit("_", 1)[1]))

  attention, mlp, norms = (
    modules(r"MultiHeadDotProductAttention_\d+"),
    modules(r"MlpBlock_\d+"),
    modules(r"LayerNorm_\d+"),
  )
  if len(attention) != 1 or len(mlp) != 1 or len(norms) != 2:
    raise ValueError(
      f"Image ViT checkpoint: encoderblock_{index} has attention {attention}, MLP {mlp} and "
      f"LayerNorms {norms}; expected one, one and two."
    )
  rename = {
    attention[0]: "MultiHeadDotProductAttention_0",
    mlp[0]: "MlpBlock_0",
    norms[0]: "LayerNorm_0",
    norms[1]: "LayerNorm_1",
  }
  out = {}
  for key, value in block.items():
    module, rest = key.split("/", 1)
    out[f"{rename[module]}/{rest}"] = value
  return out


# ----------------------------------------------------------------------------- adapting


def resize_grid(grid_HWC: np.ndarray, size_hw) -> np.ndarray:
  """A position-embedding grid [h, w, c] resized bilinearly (half-pixel centres) to size_hw."""
  h, w = size_hw
  if tuple(grid_HWC.shape[:2]) == (h, w):
    return np.asarray(grid_HWC)
  resized = jax.image.resize(grid_HWC, (h, w, grid_HWC.shape[-1]), "bilinear", antialias=False)
  return np.asarray(resized, np.float32)


def central_frame_kernel(kernel_HWIO: np.ndarray, frames: int) -> np.ndarray:
  """A 2D patch kernel [h, w, 3, c] as a tubelet kernel [frames, h, w, 3, c]: on the central frame
  (index frames // 2), zero on the others, so a static video embeds like the image."""
  out = np.zeros((frames, *kernel_HWIO.shape), np.float32)
  out[frames // 2] = kernel_HWIO
  return out


def describe(keys: Iterable[str]) -> str:
  """Keys with numbered blocks collapsed ("encoderblock_*/... x12"), sorted, comma-separated."""
  counts: dict[str, int] = {}
  for key in keys:
    short = re.sub(r"(encoderblock|residualblock|block)_\d+", r"\1_*", key)
    counts[short] = counts.get(short, 0) + 1
  return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(counts.items())) or "nothing"


def import_notes(
  vit: ImageViT,
  loaded: Iterable[str],
  adapted: Mapping[str, str],
  fresh: Iterable[str],
) -> list[str]:
  """The notes init_from logs: the source, then what was loaded, adapted (and how), left fresh,
  and which source keys were ignored."""
  notes = [vit.summary()]
  notes.append(f"loaded as is: {describe(loaded)}")
  notes += [f"adapted: {key}: {how}" for key, how in sorted(adapted.items())]
  notes.append(f"fresh (not in an image ViT): {describe(fresh)}")
  if vit.ignored:
    notes.append(f"ignored (image classifier and pooling heads): {describe(vit.ignored)}")
  return notes
