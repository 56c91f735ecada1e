"""Training on a mixture of datasets (config `data.mixture`), e.g. images and videos, one head each.

  data.mixture = ({"path": DIR, "weight": w, "head": NAME}, ...)   optional per member:
      "train_split", "eval_split" (default data.train_split / data.eval_split), "num_frames"
      (default: 1 for an image dataset (one-frame records), else data.num_frames), "synthetic"
      (with an empty path: a generated dataset, see `resolve_synthetic`)

Whole global batches come from one member at a time (an image dataset's clips have 1 frame, a
video dataset's T), each member read by its own `pipeline.train_iterator`. The member of global
batch s is `member_of_step(seed, s, weights)`: a draw from np.random.default_rng([seed, s, MIX])
against the normalised weights, so it depends only on (seed, s, weights), is the same on every
process, and needs no history: a resumed run (MixtureIterator.set_state restores every member's
position) yields exactly the batches an uninterrupted one would. Members sharing a head name
share the classifier head (tasks/classification.py); `Member.name` tags its eval metrics
(eval/<name>/top1): the head name, or head.i when several members share that head.

Batches are the member pipeline's dict plus MEMBER_KEY: int, the member index (host only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from data_pipelines import pipeline, records, shards

MEMBER_KEY = "mixture/member"  # batch key: index of the member the batch came from
_STATE_KIND = "trecvit_mixture_iterator"
_STATE_VERSION = 1
_MIX_STREAM = 0x6D6978  # "mix": the sampler's random stream, apart from the pipeline's 1..3
KEYS = ("path", "weight", "head", "train_split", "eval_split", "num_frames", "synthetic")
SYNTHETIC_KINDS = ("motion", "images")
_HEAD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a parameter name and a TensorBoard tag


@dataclasses.dataclass(frozen=True)
class Member:
  """One dataset of the mixture, resolved (frames and classes read from the data)."""

  path: str
  weight: float
  head: str
  train_split: str
  eval_split: str
  num_frames: int
  num_classes: int
  name: str  # eval metrics tag: eval/<name>/top1


def entries(config) -> tuple[Mapping[str, Any], ...]:
  """config.data.mixture as a tuple of dicts (empty: one dataset, data.path)."""
  return tuple(dict(e) for e in (config.data.get("mixture", ()) or ()))


def structure_errors(config) -> list[str]:
  """Errors in data.mixture's own fields (no file read): keys, weights, heads, frames."""
  errors = []
  mixture = entries(config)
  if not mixture:
    return errors
  if config.data.path:
    errors.append(
      f"data.path={config.data.path!r} and data.mixture are both set: a mixture reads its "
      "members' paths only; set data.path=''"
    )
  for i, e in enumerate(mixture):
    where = f"data.mixture[{i}]"
    if unknown := sorted(set(e) - set(KEYS)):
      errors.append(f"{where} has unknown keys {unknown}; known: {list(KEYS)}")
    weight = e.get("weight")
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
      errors.append(f"{where}.weight must be a number > 0 (its share of batches), got {weight!r}")
    head = e.get("head")
    if not isinstance(head, str) or not _HEAD_NAME.match(head):
      errors.append(
        f"{where}.head must name its classifier head (letters, digits, _; e.g. 'images'), got "
        f"{head!r}"
      )
    frames = e.get("num_frames")
    if frames is not None and (not isinstance(frames, int) or frames < 1):
      errors.append(f"{where}.num_frames must be an integer >= 1, got {frames!r}")
    syn = e.get("synthetic")
    if not e.get("path") and not syn:
      errors.append(f"{where}.path is empty: give the directory of a converted dataset")
    if syn and dict(syn).get("kind", "motion") not in SYNTHETIC_KINDS:
      errors.append(f"{where}.synthetic.kind must be one of {SYNTHETIC_KINDS}, got {syn['kind']!r}")
  return errors


def _raise(errors: list[str]) -> None:
  if errors:
    raise ValueError("Invalid data.mixture: " + "; ".join(errors) + ".")


def record_frames(path: str, split: str) -> int:
  """Frames of the split's first record (1: an image dataset made by `convert --images`)."""
  for shard in shards.find_shards(path, split):
    reader = shards.open_reader(shard)
    try:
      if reader.num_records():
        return int(records.read_header(reader.read([0])[0])["num_frames"])
    finally:
      reader.close()
  raise ValueError(f"Split {split!r} in {path} has no records.")


def members(config) -> list[Member]:
  """data.mixture resolved and checked: splits open, classes listed, frames known. One ValueError
  lists every problem (before anything is compiled)."""
  _raise(structure_errors(config))
  d = config.data
  mixture = entries(config)
  errors, out = [], []
  heads = [e["head"] for e in mixture]
  classes_of_head: dict[str, tuple[int, str]] = {}
  for i, e in enumerate(mixture):
    where, path = f"data.mixture[{i}] (head {e['head']!r})", str(e.get("path") or "")
    if not path:
      errors.append(
        f"{where}: a synthetic member has no path until the trainer generates it into "
        "WORKDIR/data; a tool without a workdir (compile_check, cost) needs a path"
      )
      continue
    splits = (e.get("train_split") or d.train_split, e.get("eval_split") or d.eval_split)
    bad = False
    for split in splits:
      try:
        pipeline.check_split(path, split)
      except ValueError as err:
        errors.append(f"{where} path={path!r} split {split!r}: {err}")
        bad = True
    if bad:
      continue
    try:
      num_classes = len(pipeline.read_classes(path))
    except ValueError as err:
      errors.append(f"{where}: {err}")
      continue
    if not num_classes:
      errors.append(
        f"{where}: {path}/classes.txt lists no classes (unlabelled data); a mixture trains "
        "classifier heads: convert it with labels"
      )
      continue
    head = e["head"]
    if head in classes_of_head and classes_of_head[head][0] != num_classes:
      first_n, first_path = classes_of_head[head]
      errors.append(
        f"{where} shares head {head!r} with {first_path} but has {num_classes} classes, not "
        f"{first_n}: members sharing a head need the same classes.txt; name another head"
      )
    classes_of_head.setdefault(head, (num_classes, path))
    frames = e.get("num_frames") or (1 if record_frames(path, splits[0]) == 1 else d.num_frames)
    name = head if heads.count(head) == 1 else f"{head}.{i}"
    out.append(
      Member(path, float(e["weight"]), head, splits[0], splits[1], int(frames), num_classes, name)
    )
  _raise(errors)
  return out


def member_of_step(seed: int, step: int, weights: Sequence[float]) -> int:
  """Index of the member that global batch `step` comes from: a pure function of its inputs."""
  cumulative = np.cumsum(np.asarray(weights, np.float64))
  u = np.random.default_rng([int(seed), int(step), _MIX_STREAM]).random() * cumulative[-1]
  return int(min(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1))


class MixtureIterator:
  """Endless global batches drawn from the members by weight; state holds every member's state.

  iterators: one pipeline.TrainIterator (or anything with next/get_state/set_state/close) per
  member, in data.mixture order.
  """

  def __init__(self, iterators: Sequence[Any], weights: Sequence[float], seed: int):
    if len(iterators) != len(weights) or not iterators:
      raise ValueError(f"{len(iterators)} iterators for {len(weights)} weights.")
    self._iterators = list(iterators)
    self._weights = [float(w) for w in weights]
    self._seed = int(seed)
    self._step = 0  # global batches yielded (restored by set_state)

  def __iter__(self):
    return self

  def next_member(self) -> int:
    """The member the next batch comes from."""
    return member_of_step(self._seed, self._step, self._weights)

  def __next__(self) -> dict[str, Any]:
    member = self.next_member()
    batch = dict(next(self._iterators[member]))
    batch[MEMBER_KEY] = member
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable: the step, the sampler's inputs and every member's iterator state."""
    return dict(
      kind=_STATE_KIND,
      version=_STATE_VERSION,
      step=self._step,
      seed=self._seed,
      weights=self._weights,
      members=[it.get_state() for it in self._iterators],
    )

  def set_state(self, state: Mapping[str, Any] | bytes | str) -> None:
    """Restores every member; refuses a state of another seed, weights or number of members."""
    if isinstance(state, bytes | str):
      state = json.loads(state)
    if state.get("kind") != _STATE_KIND or state.get("version") != _STATE_VERSION:
      raise ValueError(
        f"Not a mixture iterator state of version {_STATE_VERSION} (kind {state.get('kind')!r}): "
        "this checkpoint was written by a run without data.mixture (or another version)."
      )
    for key, mine in (
      ("seed", self._seed),
      ("weights", self._weights),
      ("members", len(self._iterators)),
    ):
      saved = state[key] if key != "members" else len(state["members"])
      if saved != mine:
        raise ValueError(
          f"Mixture iterator state has {key}={saved} but this run has {key}={mine}: resuming "
          "would change which dataset each step reads. Restore with the original data.mixture "
          "and seed."
        )
    for it, member_state in zip(self._iterators, state["members"], strict=True):
      it.set_state(member_state)
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops every member's worker processes."""
    for it in self._iterators:
      it.close()


# ----------------------------------------------------------------------------- synthetic members


def resolve_synthetic(config, workdir: str, generate: bool = True):
  """A copy of config whose synthetic members (empty path, a `synthetic` dict) point at
  WORKDIR/data/<i>_<head>, generated there when generate (process 0; others wait elsewhere)."""
  mixture = entries(config)
  if not any(not e.get("path") and e.get("synthetic") for e in mixture):
    return config
  resolved = []
  for i, e in enumerate(mixture):
    if not e.get("path") and e.get("synthetic"):
      path = str(epath.Path(workdir) / "data" / f"{i}_{e['head']}")
      syn = dict(e["synthetic"])
      if generate:
        if syn.pop("kind", "motion") == "images":
          ensure_images(path, **syn)
        else:
          from data_pipelines import synthetic

          synthetic.ensure(path, kind="motion", **syn)
      e = {**e, "path": path}
    resolved.append(e)
  config = config.copy_and_resolve_references()
  config.data.mixture = tuple(resolved)
  return config


QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: noise with a bright square of random size and colour inside the
  quadrant `label` (QUADRANTS) names."""
  image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
  half = size // 2
  side = int(rng.integers(max(half // 3, 2), half - 1))
  top = (label // 2) * half + int(rng.integers(0, half - side + 1))
  left = (label % 2) * half + int(rng.integers(0, half - side + 1))
  image[top : top + side, left : left + side] = rng.integers(160, 256, 3, dtype=np.uint8)
  return image


def ensure_images(
  out_dir: str,
  *,
  num_train: int = 512,
  num_validation: int = 128,
  size: int = 32,
  seed: int = 0,
  num_classes: int = 4,
) -> None:
  """A generated image dataset (num_classes <= 4 classes: which quadrant holds a bright square)
  in `train` and `validation`, written by the real converter (`convert --images`) from PNG files;
  a split whose summary records the same parameters is reused."""
  if not 1 <= num_classes <= len(QUADRANTS):
    raise ValueError(f"num_classes must be 1..{len(QUADRANTS)} (quadrants), got {num_classes}.")
  from PIL import Image

  from data_pipelines import convert

  params = dict(
    num_train=num_train, num_validation=num_validation, size=size, seed=seed, classes=num_classes
  )
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  splits = (("train", num_train, seed), ("validation", num_validation, seed + 1))
  for split, n, split_seed in splits:
    summary = out / f"{split}.summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("generated_images") == params:
      continue
    rng = np.random.default_rng([split_seed, 0x696D67])
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
      rows = []
      for k in range(n):
        label = k % num_classes
        name = f"{split}_{k:06d}.png"
        Image.fromarray(_image(rng, label, size)).save(os.path.join(tmp, name))
        rows.append((name, QUADRANTS[label]))
      labels = os.path.join(tmp, "labels.csv")
      with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
      result = convert.convert_images(
        tmp, labels, out_dir, split, num_shards=1, short_side=0, progress=False
      )
    result["generated_images"] = params
    result.pop("labels_file", None)  # a temporary file, gone
    tmp_summary = out / f".tmp.{split}.generated.json"  # the converter's summary, overwritten
    tmp_summary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_summary, summary)
