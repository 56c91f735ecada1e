"""What a run reads, checked before anything slow: the workdir, the data (or the synthetic data
generated into it, or a mixture of datasets), the class count and init_from.

Every check opens the inputs the run will need (each shard's footer and index, classes.txt, the
init_from file or workdir) so that a missing split or a misspelt path fails in one line before
the first compile, not at the first evaluation hours in.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import mixture, pipeline, synthetic
from trecvit_dist import checkpointing, experiment


@dataclasses.dataclass(frozen=True)
class Inputs:
  build_config: ml_collections.ConfigDict  # what the experiment is built from
  data_path: str | None  # None for a mixture (each member has its own)
  members: list[mixture.Member]  # empty unless data.mixture is set
  num_classes: int  # of the (first) dataset; a mixture's task builds one head per member


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
  """Checks every input of the run (ValueError naming the path and the fix), generates synthetic
  data into the workdir where the config asks for it, and resolves the class count."""
  checkpointing.check_workdir(workdir)
  is_mixture = bool(mixture.entries(config))
  if is_mixture:
    # Every member's fields, splits and classes (synthetic members': once generated, below).
    if mixture.structure_errors(config) or all(e.get("path") for e in mixture.entries(config)):
      mixture.members(config)
  elif config.data.path:
    check_data(config, config.data.path)
  if config.init_from and not checkpointing.has_steps(workdir):
    check_init_from(config.init_from)
  checkpointing.check_workdir_writable(workdir)
  if is_mixture:
    # Synthetic members are generated into WORKDIR/data/<i>_<head> (one writer); their paths
    # stay out of the config the checkpoints keep, so a copied workdir still resumes.
    build_config = mixture.resolve_synthetic(config, workdir, jax.process_index() == 0)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("synthetic mixture data generated")
    members = mixture.members(build_config)
    return Inputs(build_config, None, members, members[0].num_classes)
  data_path = resolve_data(config, workdir)
  if not config.data.path:
    check_data(config, data_path)
  return Inputs(config, data_path, [], num_classes_of(config, data_path))


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> str:
  """data.path, or the synthetic dataset generated into WORKDIR/data when it is empty."""
  if config.data.path:
    return config.data.path
  syn = config.data.synthetic
  if not syn.num_train:
    raise ValueError(
      "data.path is empty and the config defines no synthetic dataset; set --config.data.path."
    )
  path = str(epath.Path(workdir) / "data")
  if jax.process_index() == 0:  # one writer; the others wait for complete files
    synthetic.ensure(path, **syn.to_dict())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data generated")
  return path


def check_data(config: ml_collections.ConfigDict, data_path: str) -> None:
  """Opens every shard of the train and eval splits (footers and indices, no records)."""
  d = config.data
  for field, split in (("data.train_split", d.train_split), ("data.eval_split", d.eval_split)):
    try:
      pipeline.check_split(data_path, split)
    except ValueError as e:
      if not epath.Path(data_path).is_dir():  # the directory itself, not the split
        field, split = "data.path", data_path
      raise ValueError(f"{field}={split!r}: {e}") from e


def num_classes_of(config, data_path: str) -> int:
  """model.num_classes, else the length of DATA/classes.txt (a task without labels: not read)."""
  if config.model.num_classes:
    return config.model.num_classes
  if not experiment.task_class(config).needs_labels:  # unlabelled data may have no classes.txt
    return 1
  classes = pipeline.read_classes(data_path)
  if not classes:
    raise ValueError(
      f"{data_path}/classes.txt lists no classes: the data is unlabelled. Train it with "
      "task=mae (e.g. configs/trecvit_mae_k400.py), or convert it with labels."
    )
  return len(classes)


def check_init_from(source: str) -> None:
  """init_from is an .npz that opens, or a workdir with a checkpoint (read fully at init)."""
  path = epath.Path(source)
  if source.endswith(".npz"):
    if not path.exists():
      raise ValueError(f"init_from={source} does not exist: give the path of an .npz file.")
    try:  # the zip directory only; init_from.load reads the arrays, still before any compile
      with path.open("rb") as f, np.load(f) as npz:
        names = npz.files
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file raises many kinds)
      raise ValueError(f"init_from={source} is not a readable .npz file: {e}") from e
    if not names:
      raise ValueError(f"init_from={source} holds no arrays.")
    return
  if not path.is_dir():
    raise ValueError(
      f"init_from={source} is neither an .npz file nor a directory: give an official .npz "
      "(e.g. trecvit_B_k400.npz) or another run's workdir."
    )
  source_ckpt = checkpointing.Checkpointer(source, every_steps=0, keep=1, read_only=True)
  try:
    if not source_ckpt.steps():
      raise ValueError(
        f"init_from={source} has no checkpoint under {source_ckpt.directory}: give a workdir "
        "that has trained at least one checkpoint, or an .npz."
      )
  finally:
    source_ckpt.close()
