"""The fields every experiment config has (configs/*.py start from `base_config()`).

Field names are part of the project's interface (docs/interfaces.md): model.name, model.variant,
model.num_classes, data.path, data.train_split, data.eval_split, data.num_frames, data.stride,
data.image_size, batch_size, total_steps, seed, mesh.data/fsdp/tensor/time, log_every_steps,
eval_every_steps, checkpoint_every_steps, init_from.

A workdir's checkpoints carry the config they were written with; a resumed run must keep every
field that changes what the run computes (`resume_changes`, called by the trainer).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments; each config file overrides what it needs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, over all processes and devices
  c.total_steps = 1000
  c.task = "classification"
  c.init_from = ""  # official .npz or another workdir; used only when the workdir has no checkpoint
  # Comma-separated config fields that may differ from the checkpoints' config on resume (e.g.
  # "optimizer.learning_rate,batch_size"): a deliberate change to a run (see resume_changes).
  c.allow_config_change = ""

  # Model: a family (trecvit_dist/models/), a named size, and explicit overrides (unset fields
  # take the variant's value). The fields below are TRecViT's; other families ignore the ones
  # they do not have (a family's config file lists its own).
  c.model = ml_collections.ConfigDict()
  c.model.name = "trecvit"
  c.model.variant = "B"
  c.model.num_classes = config_dict.placeholder(int)  # unset: the length of DATA/classes.txt
  for name, kind in (("width", int), ("depth", int), ("mlp_dim", int), ("num_heads", int)):
    c.model[name] = config_dict.placeholder(kind)
  c.model.patch_size = (1, 16, 16)
  c.model.rep_size = config_dict.placeholder(int)  # unset: 4 * width (3072 for B, as released)
  c.model.conv1d_temporal_width = 4
  c.model.state_multiplier = 2
  c.model.min_rad = 0.5
  c.model.posemb = "learned"
  c.model.pooling = "cls"
  c.model.classifier_dropout = 0.0
  c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
  c.model.remat = "none"
  c.model.lru_impl = "auto"
  c.model.temporal_blocks = True

  c.data = ml_collections.ConfigDict()
  c.data.path = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_frames = 32
  c.data.stride = 2
  c.data.image_size = 224
  c.data.flip = True
  c.data.randaugment = False
  c.data.scale_jitter = (0.875, 1.33)
  c.data.workers = 2  # Grain worker processes per host
  c.data.eval_clips = 1
  c.data.eval_crops = 1
  # Unreadable records: False stops the run naming shard and record; True skips and counts them
  # (TensorBoard data/skipped_records; training draws a deterministic replacement).
  c.data.skip_corrupt_records = False
  # Input normalisation: the model sees (video / 255 - mean) / std per channel when set (None: the
  # [0, 1] pixels the official checkpoints take). `official export` folds it into the tokenizer.
  c.data.mean = config_dict.placeholder(tuple)
  c.data.std = config_dict.placeholder(tuple)
  # Generated into WORKDIR/data when data.path is empty (the embedded default dataset).
  # kind: motion | memorisation | tracking (data_pipelines/synthetic.py); variant: the motion
  # generator's "dark" (the default) or "realistic".
  c.data.synthetic = ml_collections.ConfigDict(
    dict(num_train=0, num_validation=0, frames=16, size=32, seed=0, kind="motion", variant="")
  )

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.end_learning_rate = 0.0
  c.optimizer.weight_decay = 0.03
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip_norm = 1.0
  c.label_smoothing = 0.1
  c.grad_accum_steps = 1

  # time: frames split over this many devices (sequence parallelism, families with
  # time_parallel only, e.g. trecvit); it multiplies with data x fsdp x tensor.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, time=1))

  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.eval_batch_size = 0  # 0: batch_size
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_every_steps = 0  # also keep every N-th step forever (0: off)
  c.profile_steps = (0, 0)  # [start, stop) steps of a profiler trace (0, 0: off)
  c.peak_flops_per_device = 0.0  # 0: look up the device kind (for perf/mfu)
  return c


def apply_size(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`:Ti`, `:S`, `:B`, `:L`, `:H` picks model.variant."""
  if arg:
    c.model.variant = arg
  return c


def load_sibling(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of NAME.py beside config_file: for a config built on another one."""
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- resuming

# Fields that may change between runs of one workdir: how the run is watched, saved, fed and laid
# out on devices, not what it computes. Every other field is compared with the config saved with
# the newest checkpoint when a run resumes; a difference is refused unless allow_config_change
# names it. total_steps passes (extending a run is the common case; the cosine schedule then
# decays over the new length from the resumed step on) and data.path passes (data moves between
# disks and buckets; the iterator state refuses another number of records); both are logged.
RESUME_FREE_FIELDS = (
  "allow_config_change",
  "log_every_steps",
  "eval_every_steps",
  "eval_batch_size",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "keep_every_steps",
  "profile_steps",
  "peak_flops_per_device",
  "init_from",  # only read when the workdir has no checkpoint
  "total_steps",
  "grad_accum_steps",  # the same mean gradient, in fewer or more micro-batches
  "mesh",
  "model.remat",
  "model.lru_impl",
  "data.path",
  "data.workers",
  "data.skip_corrupt_records",
  # Evaluation only: re-evaluating a trained workdir on longer clips or another target mode.
  "memorisation.eval_frames",
  "memorisation.mode",
  "memorisation.image_videos",
  "memorisation.image_frames",
)
RESUME_LOGGED_FIELDS = ("total_steps", "data.path")


class ConfigChangeError(ValueError):
  """The config changes a field that the workdir's checkpoints were trained with."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _matches(field: str, names) -> bool:
  """field is one of names, or inside one of them (a section such as "mesh")."""
  return any(field == n or field.startswith(n + ".") for n in names)


def resume_changes(
  saved: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> list[str]:
  """The differences from the saved config (as JSON) that pass, as "field: old -> new" lines.

  Raises ConfigChangeError listing the refused ones, and ValueError when allow_config_change
  names a field the config does not have. Fields only one side has (added or removed since the
  checkpoint was written) are not compared. where: the checkpoint, for the message.
  """
  current = _flat(json.loads(json.dumps(config.to_dict())))  # tuples compare as the JSON lists
  allowed = [n.strip() for n in str(config.get("allow_config_change", "")).split(",") if n.strip()]
  unknown = [n for n in allowed if not any(_matches(f, [n]) for f in current)]
  if unknown:
    raise ValueError(
      f"allow_config_change names {unknown}, which are not config fields (e.g. "
      "optimizer.learning_rate, batch_size, data.num_frames)."
    )
  passed, refused = [], []
  old_fields = _flat(saved)
  for field in sorted(set(old_fields) & set(current)):
    old, new = old_fields[field], current[field]
    if old == new:
      continue
    line = f"{field}: {old!r} -> {new!r}"
    if _matches(field, allowed):
      passed.append(line + " (allow_config_change)")
    elif _matches(field, RESUME_FREE_FIELDS):
      if _matches(field, RESUME_LOGGED_FIELDS):
        passed.append(line)
    else:
      refused.append(line)
  if refused:
    names = ",".join(line.split(":")[0] for line in refused)
    raise ConfigChangeError(
      f"The config differs from the one {where} was trained with, in fields that change what "
      "the run computes:\n  " + "\n  ".join(refused) + "\nTo train with this config from "
      "the start, use a new --workdir. To continue this run with the change on purpose, add "
      f"--config.allow_config_change={names}"
    )
  return passed
