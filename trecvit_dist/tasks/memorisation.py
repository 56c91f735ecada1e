"""Task `memorisation`: reconstruct the frame seen k steps ago from the model's last output.

MemorisationModel: video [b, t, h, w, 3] in [0, 1] -> the target frame [b, h, w, 3] (float32,
unclipped). The family's encoder gives final-layer tokens per time slot (`tokens()`, laid out as
`family.token_grid` says: [b, t', prefix + gh * gw, c]); the head reads ONE set of patch tokens
[b, gh * gw, c] and maps each token with one linear layer (`memorisation_head/`) to its patch's
pixels (h / gh) x (w / gw) x 3 of the target frame:
  - causal families (`family.causal`: TRecViT, pure_lru) read the LAST time slot's tokens, the
    only ones that have seen the whole clip (the paper's TRecViT readout);
  - the others (ViViT, the factorised encoder, Motionformer) average their tokens over the time
    slots first, then apply the same head.
Per-slot prefix tokens (TRecViT's per-frame CLS, the factorised encoder's temporal output) are
left out. A family whose tokens are not a patch grid (TubeViT: one flat list of tubes) is refused.

Targets (config.memorisation; clips of T = data.num_frames frames, k = offset):
  mode="last"   the frame T-1-k of every clip (k frames before its last one);
  mode="fixed"  the frame T-1-k of the training clip length, at that index in every clip, so on
                longer eval clips the target stays put while the clip grows past it (the paper's
                supplementary setting); training is the same in both modes.
Offsets count clip frames (data.stride apart in the video). Loss: mean squared error on [0, 1]
pixels. Evaluation (on the same clips): `psnr` of the clipped reconstruction, and two baselines,
`psnr_copy_last` (predict the clip's last frame) and `psnr_mean_frame` (the clip's mean frame),
each averaged over videos; TensorBoard image rows: input frames, target, reconstruction.

Longer eval clips (`memorisation.eval_frames` > 0, E frames): TRecViT runs as it is; families
whose parameters hold a position embedding over time (TEMPORAL_POSEMB: ViViT, the factorised
encoder, pure_lru) run a copy of the model built for E frames whose temporal embedding is the
trained one resized over time by nearest neighbour (`resize_temporal_posemb`; class and spatial
parts untouched). Other families with a clip length in their config are refused.

Streaming: `MemorisationModel.step(frame, state)` runs one frame through an encoder that carries
its recurrent state (TRecViT's `encode(video, state)`) and the head, giving at frame t the
reconstruction of frame t-k in constant memory; `reconstruct_frame_by_frame` does a whole video
and equals `reconstruct_every_step`, the full pass with the head on every time slot.
"""

import dataclasses
import functools
import inspect
from typing import Any, ClassVar

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics

from trecvit_dist.models.family import TokenGrid
from trecvit_dist.models.layers import LOGICAL
from trecvit_dist.tasks.task import Task, flatten_views

MODES = ("last", "fixed")
HEAD = "memorisation_head"
MSE_FLOOR = 1e-10  # PSNR of a perfect prediction: 100 dB, not infinity

# config.memorisation fields and their defaults (a config may leave any out).
DEFAULTS = dict(
  offset=4,  # k: clip frames between the target and the clip's last frame
  mode="last",  # "last" or "fixed" (see the module docstring)
  eval_frames=0,  # 0: evaluate on training-length clips; else clips of this many frames
  image_videos=4,  # videos in the TensorBoard image
  image_frames=8,  # input frames shown per video (evenly spaced)
)


@dataclasses.dataclass(frozen=True)
class TemporalPosemb:
  """Where a family keeps its position embedding over time: the flat parameter path, the axis
  of its positions, and whether each time slot has one position per patch (else one)."""

  path: str
  axis: int
  per_patch: bool


# Families whose parameters depend on the clip length, and how to resize them to another one.
# Layouts: vivit [1, cls + t' n, c] (time-major); vivit_factorised [1, cls + t', c];
# pure_lru [t', c].
TEMPORAL_POSEMB: dict[str, TemporalPosemb] = {
  "vivit": TemporalPosemb("Transformer/pos_embedding", 1, True),
  "vivit_factorised": TemporalPosemb("TemporalTransformer/pos_embedding", 1, False),
  "pure_lru": TemporalPosemb("temporal_pos_embedding", 0, False),
}


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.memorisation over DEFAULTS; unknown fields are an error (a typo would go unnoticed)."""
  given = dict(config.get("memorisation", None) or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(
      f"config.memorisation has unknown fields {unknown}; known: {sorted(DEFAULTS)}."
    )
  return {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def target_index(mode: str, offset: int, train_frames: int, clip_frames: int) -> int:
  """Index of the frame to reconstruct in a clip of clip_frames frames (see module docstring)."""
  if mode == "last":
    index = clip_frames - 1 - offset
  elif mode == "fixed":
    index = train_frames - 1 - offset
  else:
    raise ValueError(f"memorisation.mode must be one of {MODES}, got {mode!r}.")
  if not 0 <= index < clip_frames:
    raise ValueError(
      f"memorisation mode={mode!r}, offset={offset}: the target frame {index} is outside a "
      f"{clip_frames}-frame clip (training clips: {train_frames} frames)."
    )
  return index


# ----------------------------------------------------------------------------- metrics


def mse_per_video(pred_BHWC, target_BHWC):
  """[b]: mean squared error of each frame over its pixels and channels."""
  diff = pred_BHWC.astype(jnp.float32) - target_BHWC.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=(1, 2, 3))


def psnr_per_video(pred_BHWC, target_BHWC):
  """[b]: PSNR in dB of [0, 1] frames (the prediction clipped to [0, 1])."""
  mse = mse_per_video(jnp.clip(pred_BHWC, 0.0, 1.0), target_BHWC)
  return -10.0 * jnp.log10(jnp.maximum(mse, MSE_FLOOR))


def baselines(video_BTHWC) -> dict[str, jax.Array]:
  """The predictions that need no model: the clip's last frame and its mean frame [b, h, w, 3]."""
  video = video_BTHWC.astype(jnp.float32)
  return dict(copy_last=video[:, -1], mean_frame=jnp.mean(video, axis=1))


# ----------------------------------------------------------------------------- longer clips


def nearest_slots(old_slots: int, new_slots: int) -> np.ndarray:
  """For each of new_slots time slots, the old slot nearest to its centre:
  floor((j + 1/2) * old / new) (e.g. 4 -> 8: 0 0 1 1 2 2 3 3; 8 -> 4: 1 3 5 7)."""
  if old_slots < 1 or new_slots < 1:
    raise ValueError(f"time slots must be >= 1, got {old_slots} -> {new_slots}.")
  return np.floor((np.arange(new_slots) + 0.5) * old_slots / new_slots).astype(np.int32)


def resize_temporal_posemb(pos, old_slots: int, new_slots: int, *, axis: int, per_slot: int):
  """A position embedding laid out along `axis` as [prefix, slot 0's per_slot positions, slot
  1's, ...] (time-major) resized to new_slots by nearest neighbour over time. The prefix (a class
  token's position) and the within-slot (spatial) order are kept as they are."""
  length = pos.shape[axis]
  prefix = length - old_slots * per_slot
  if prefix < 0 or per_slot < 1:
    raise ValueError(
      f"a position embedding of {length} positions along axis {axis} does not hold "
      f"{old_slots} time slots of {per_slot} position(s)."
    )
  slots = nearest_slots(old_slots, new_slots)
  index = np.concatenate(
    [np.arange(prefix), prefix + (slots[:, None] * per_slot + np.arange(per_slot)).reshape(-1)]
  )
  return jnp.take(pos, index, axis=axis)


def params_for_frames(family_name: str, params, grid: TokenGrid, old_slots: int, new_slots: int):
  """params (nested) with the family's temporal position embedding resized to new_slots."""
  if old_slots == new_slots or family_name not in TEMPORAL_POSEMB:
    return params
  spec = TEMPORAL_POSEMB[family_name]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  if spec.path not in flat:
    raise ValueError(f"{family_name}: no parameter {spec.path} to resize over time.")
  per_slot = grid.height * grid.width if spec.per_patch else 1
  flat[spec.path] = resize_temporal_posemb(
    flat[spec.path], old_slots, new_slots, axis=spec.axis, per_slot=per_slot
  )
  return flax.traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- the model


class MemorisationModel(nn.Module):
  """Encoder + linear patch head: [b, t, h, w, 3] -> reconstruction [b, h, w, 3] (float32).

  backbone: the family's module (unbound); its parameters keep their own top-level names (shared
  scope), beside memorisation_head/. grid: the spatial layout of its tokens (prefix, gh, gw);
  read_last: read the last time slot (causal families) rather than the mean over slots.
  """

  backbone: nn.Module
  grid: TokenGrid
  patch_hw: tuple[int, int]
  read_last: bool

  def setup(self):
    self.net = self.backbone.clone()
    nn.share_scope(self, self.net)
    ph, pw = self.patch_hw
    self.memorisation_head = nn.Dense(
      ph * pw * 3,
      # Zero kernel, mid-grey bias: training starts from a flat grey frame, not from a random
      # image ten times worse (a lecun-normal head began at MSE ~0.5 on the synthetic data).
      kernel_init=LOGICAL(nn.initializers.zeros_init(), ("embed", None)),
      bias_init=LOGICAL(nn.initializers.constant(0.5), (None,)),
    )

  def decode(self, tokens_XLC):
    """Per-slot tokens [..., prefix + gh gw, c] -> frames [..., h, w, 3]."""
    ph, pw = self.patch_hw
    patches = self.memorisation_head(tokens_XLC[..., self.grid.prefix :, :].astype(jnp.float32))
    return einops.rearrange(
      patches,
      "... (gh gw) (ph pw c) -> ... (gh ph) (gw pw) c",
      gh=self.grid.height,
      gw=self.grid.width,
      ph=ph,
      pw=pw,
    )

  def __call__(self, video_BTHWC, train: bool = False):
    tokens_BTLC = self.net.tokens(video_BTHWC, train)
    read = tokens_BTLC[:, -1] if self.read_last else jnp.mean(tokens_BTLC, axis=1)
    return self.decode(read)

  def every_step(self, video_BTHWC):
    """The head on every time slot: [b, t', h, w, 3] (for causal encoders, slot i is what a
    clip ending there would give)."""
    return self.decode(self.net.tokens(video_BTHWC))

  def step(self, frame_BHWC, state=None):
    """One frame of a stream: (reconstruction [b, h, w, 3], encoder state); state None starts.

    The encoder must step with a carried state (`encode(video, state)`, e.g. TRecViT's).
    """
    tokens_B1LC, state = self.net.encode(frame_BHWC[:, None], state)
    return self.decode(tokens_B1LC[:, 0]), state


def can_stream(model: MemorisationModel) -> str | None:
  """None when the model runs frame by frame, else the reason it cannot."""
  encode = getattr(type(model.backbone), "encode", None)
  if encode is None or "state" not in inspect.signature(encode).parameters:
    return (
      f"the encoder {type(model.backbone).__name__} has no encode(video, state) that carries a "
      "recurrent state from frame to frame (TRecViT has)"
    )
  patch_t = getattr(getattr(model.backbone, "cfg", None), "patch_size", (1,))[0]
  if patch_t != 1:
    return f"frame by frame needs temporal patch size 1, got {patch_t}"
  if not model.read_last:
    return "the model pools over time instead of reading its last time step"
  return None


def reconstruct_every_step(model: MemorisationModel, params, video_BTHWC) -> np.ndarray:
  """The full pass, the head on every time slot: [b, t', h, w, 3] (step t: frame t - k)."""
  return np.asarray(_every_step_jit(model, params, jnp.asarray(video_BTHWC, jnp.float32)))


@functools.partial(jax.jit, static_argnums=0)
def _every_step_jit(model, params, video):
  return model.apply({"params": params}, video, method=MemorisationModel.every_step)


def reconstruct_frame_by_frame(model: MemorisationModel, params, video_BTHWC) -> np.ndarray:
  """`reconstruct_every_step`'s output one frame at a time, carrying the encoder's state
  (constant memory in the video length): [b, t, h, w, 3]."""
  if reason := can_stream(model):
    raise ValueError(f"reconstruct_frame_by_frame: {reason}; use reconstruct_every_step.")
  video = np.asarray(video_BTHWC, np.float32)
  if video.ndim != 5 or video.shape[-1] != 3:
    raise ValueError(f"video must be [batch, frames, height, width, 3], got {video.shape}.")
  frames, state = [], None
  for t in range(video.shape[1]):
    recon, state = _step_jit(model, params, jnp.asarray(video[:, t]), state)
    frames.append(np.asarray(recon))
  return np.stack(frames, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _step_jit(model, params, frame, state):
  return model.apply({"params": params}, frame, state, method=MemorisationModel.step)


# ----------------------------------------------------------------------------- images


def reconstruction_row(video_BTHWC, target_BHWC, recon_BHWC, max_frames: int = 8):
  """uint8 [b, h, (f + 2) w + 2, 3]: f evenly spaced input frames, the target, the (clipped)
  reconstruction, with a one-pixel white line before each of the last two."""
  t = video_BTHWC.shape[1]
  frames = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
  inputs = einops.rearrange(video_BTHWC[:, frames].astype(jnp.float32), "b t h w c -> b h (t w) c")
  line = jnp.ones(inputs.shape[:2] + (1, 3), jnp.float32)
  row = jnp.concatenate(
    [inputs, line, target_BHWC.astype(jnp.float32), line, jnp.clip(recon_BHWC, 0.0, 1.0)], axis=2
  )
  return jnp.round(row * 255.0).astype(jnp.uint8)


# ----------------------------------------------------------------------------- the task


@flax.struct.dataclass
class MemorisationTrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")
  psnr: clu_metrics.Average.from_output("psnr")  # of the train batch's reconstructions, dB


class Memorisation(Task):
  """Frame memorisation (config.memorisation: offset, mode, eval_frames; see DEFAULTS)."""

  name = "memorisation"
  needs_labels = False
  fresh_prefixes: ClassVar[tuple[str, ...]] = (f"{HEAD}/",)
  train_metrics = MemorisationTrainMetrics
  image_tag = "eval/memorisation_inputs_target_reconstruction"

  def __init__(self, config, family, model_cfg):
    super().__init__(config, family, model_cfg)
    self._eval_model = None

  @property
  def settings(self) -> dict[str, Any]:
    return settings(self.config)

  @property
  def train_frames(self) -> int:
    return int(self.config.data.num_frames)

  @property
  def eval_frames(self) -> int:
    return int(self.settings["eval_frames"]) or self.train_frames

  def target(self, clip_frames: int) -> int:
    s = self.settings
    return target_index(s["mode"], int(s["offset"]), self.train_frames, clip_frames)

  def _grid(self, frames: int) -> TokenGrid:
    return self.family.token_grid(self.model_cfg, frames, self.config.data.image_size)

  def _patch_hw(self) -> tuple[int, int]:
    grid, size = self._grid(self.train_frames), self.config.data.image_size
    return size // grid.height, size // grid.width

  # --- config and model

  def config_errors(self, mesh_shape):
    try:
      s = self.settings
    except ValueError as e:
      return [str(e)]
    d, errors = self.config.data, []
    t, size, k, mode = self.train_frames, d.image_size, s["offset"], s["mode"]
    eval_frames = s["eval_frames"]
    if mode not in MODES:
      errors.append(f"memorisation.mode must be one of {MODES}, got {mode!r}")
    if not isinstance(k, int) or k < 0:
      errors.append(f"memorisation.offset must be an integer >= 0, got {k!r}")
    elif k >= t:
      errors.append(
        f"memorisation.offset {k} is not smaller than the clip (data.num_frames {t}): the "
        f"target frame T-1-k must lie in the clip; use an offset of at most {t - 1} or raise "
        f"data.num_frames above {k}"
      )
    if not isinstance(eval_frames, int) or eval_frames < 0:
      errors.append(f"memorisation.eval_frames must be an integer >= 0, got {eval_frames!r}")
    elif eval_frames and isinstance(k, int) and 0 <= k < t:
      if mode == "last" and eval_frames < k + 1:
        errors.append(
          f"memorisation.eval_frames {eval_frames} is shorter than the offset {k} + 1: the "
          f"target frame E-1-k would lie before the clip; use eval_frames >= {k + 1} (0: "
          "evaluate on training-length clips)"
        )
      if mode == "fixed" and eval_frames < t - k:
        errors.append(
          f"memorisation.eval_frames {eval_frames} does not reach the fixed target frame "
          f"{t - 1 - k} (mode='fixed', data.num_frames {t}, offset {k}); use eval_frames >= "
          f"{t - k}"
        )
      time = mesh_shape.get("time", 1)
      if time > 1 and eval_frames % time:
        errors.append(
          f"memorisation.eval_frames {eval_frames} is not divisible by mesh.time={time} (eval "
          "clips are sharded over time like training clips)"
        )
      pt = getattr(self.model_cfg, "patch_size", (1,))[0]
      if eval_frames % pt:
        errors.append(
          f"memorisation.eval_frames {eval_frames} is not divisible by the model's temporal "
          f"patch size {pt}"
        )
      clip_length_field = any(
        f.name == "num_frames" for f in dataclasses.fields(self.family.config_class)
      )
      if eval_frames != t and clip_length_field and self.family.name not in TEMPORAL_POSEMB:
        errors.append(
          f"model.name={self.family.name} learns embeddings for data.num_frames={t} frames; "
          f"evaluating on memorisation.eval_frames={eval_frames} needs them resized over time, "
          f"which is implemented for {sorted(TEMPORAL_POSEMB)} (TRecViT runs unchanged)"
        )
    if not self._is_patch_grid(self._grid(t)):
      grid = self._grid(t)
      errors.append(
        f"task=memorisation maps each patch token to its patch of the frame, but "
        f"model.name={self.family.name}'s tokens are not a grid over a {size}x{size} frame "
        f"({grid}); use trecvit, vivit, vivit_factorised, pure_lru or motionformer"
      )
    return errors

  def _is_patch_grid(self, grid: TokenGrid) -> bool:
    """The tokens tile the frame in patches: of the family's patch size where it has one (a
    flat list of tubes, TubeViT's, is no grid), else square."""
    size = self.config.data.image_size
    if grid.height < 1 or grid.width < 1 or size % grid.height or size % grid.width:
      return False
    patch = getattr(self.model_cfg, "patch_size", None)
    if patch is not None:
      return (size // grid.height, size // grid.width) == tuple(patch)[1:]
    return grid.height == grid.width

  def build_model(self) -> MemorisationModel:
    return self._model(self.model_cfg, self.train_frames)

  def _model(self, model_cfg, frames: int) -> MemorisationModel:
    return MemorisationModel(
      self.family.build(model_cfg), self._grid(frames), self._patch_hw(), self.family.causal
    )

  def for_frames(self, model, params, frames: int):
    """(model, params) for clips of `frames` frames: the trained ones, or (longer or shorter
    eval clips) a copy built for that length with the temporal position embedding resized."""
    if frames == self.train_frames:
      return model, params
    if self._eval_model is None or self._eval_model[0] != frames:
      d = self.config.data
      cfg = self.family.make_config(
        self.config.model.to_dict(),
        num_classes=getattr(self.model_cfg, "num_classes", 1),
        num_frames=frames,
        image_size=d.image_size,
      )
      self._eval_model = (frames, self._model(cfg, frames))
    old, new = self._grid(self.train_frames), self._grid(frames)
    params = params_for_frames(self.family.name, params, old, old.frames, new.frames)
    return self._eval_model[1], params

  def data_options(self, train):
    if train or self.eval_frames == self.train_frames:
      return {}
    return {"num_frames": self.eval_frames}

  def batch_spec(self, batch_size, train):
    d = self.config.data
    s = d.image_size
    if train:
      video = (batch_size, self.train_frames, s, s, 3)
      return dict(video=jax.ShapeDtypeStruct(video, jnp.float32))
    video = (batch_size, d.eval_clips * d.eval_crops, self.eval_frames, s, s, 3)
    return dict(
      video=jax.ShapeDtypeStruct(video, jnp.float32),
      mask=jax.ShapeDtypeStruct((batch_size,), jnp.bool_),
    )

  # --- training and evaluation

  def loss(self, model, params, batch, rng):
    video = batch["video"]
    target = video[:, self.target(video.shape[1])].astype(jnp.float32)
    recon = model.apply({"params": params}, video, train=True, rngs={"dropout": rng})
    loss = jnp.mean(mse_per_video(recon, target))
    return loss, dict(psnr=jnp.mean(psnr_per_video(jax.lax.stop_gradient(recon), target)))

  def _reconstruct(self, model, params, video_BTHWC):
    """(target, reconstruction) [b, h, w, 3] of clips of any length the config evaluates."""
    model, params = self.for_frames(model, params, video_BTHWC.shape[1])
    target = video_BTHWC[:, self.target(video_BTHWC.shape[1])].astype(jnp.float32)
    return target, model.apply({"params": params}, video_BTHWC)

  def eval_sums(self, model, params, batch, rng):
    del rng
    video, views = flatten_views(batch["video"])
    target, recon = self._reconstruct(model, params, video)
    weight = jnp.repeat(batch["mask"].astype(jnp.float32), views)
    sums = dict(
      loss=jnp.sum(mse_per_video(recon, target) * weight),
      psnr=jnp.sum(psnr_per_video(recon, target) * weight),
      count=jnp.sum(weight),
    )
    for name, pred in baselines(video).items():
      sums[f"psnr_{name}"] = jnp.sum(psnr_per_video(pred, target) * weight)
    return sums

  def images(self, model, params, batch, rng):
    del rng
    s = self.settings
    video = batch["video"]
    video = (video[:, 0] if video.ndim == 6 else video)[: s["image_videos"]]
    target, recon = self._reconstruct(model, params, video)
    return reconstruction_row(video, target, recon, s["image_frames"])

  def train_flops_per_clip(self):
    """The encoder forward and the head on one slot's patch tokens, 3x (forward and backward)."""
    d, cfg = self.config.data, self.model_cfg
    grid = self._grid(self.train_frames)
    ph, pw = self._patch_hw()
    width = getattr(cfg, "width", 0)
    head = 2 * grid.height * grid.width * width * ph * pw * 3
    encoder = self.family.forward_flops(cfg, d.num_frames, d.image_size, head=False)
    return 3.0 * float(encoder + head)


TASK = Memorisation
