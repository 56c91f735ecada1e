"""config.init_from: start a run's parameters from an .npz or from another run's workdir.

Resume order, written once: an existing checkpoint in the workdir -> init_from -> scratch (the
trainer calls `load` only when the workdir has no checkpoint). The encoder must load; the family's
classifier (`head_prefixes`), the task's heads (`fresh_prefixes`, e.g. an MAE decoder or a
readout) and what an .npz import declares it cannot provide (its third return value, e.g.
TRecViT's gated-LRU blocks from an ImageNet ViT) keep their fresh initialisation when the source
lacks them or has another shape (a new class count, a readout from an MAE run, MAE from a
supervised run). Every re-initialised and every ignored source key is logged.
"""

from __future__ import annotations

import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from trecvit_dist import checkpointing
from trecvit_dist.models.family import ModelFamily


def load_npz(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """Reads an .npz of parameters (keys: flax paths joined by "/") into a flat dict."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  try:
    with path.open("rb") as f, np.load(f) as npz:
      return {k: np.asarray(npz[k]) for k in npz.files}
  except Exception as e:  # noqa: BLE001 (a corrupt npz raises many kinds of error)
    raise ValueError(f"Could not read {path} as an .npz of parameters: {e}") from e


def check(source: str, *, family: ModelFamily, model_cfg, image_size: int) -> None:
  """Maps an .npz source onto the model's shapes (host arrays only, nothing compiled), so a
  source of another width or layout is refused before the first compile. Workdir sources are
  checked by shape when loaded (their state is not read twice)."""
  if not source.endswith(".npz"):
    return
  if family.import_npz is None:
    raise ValueError(
      f"init_from={source}: model {family.name!r} loads no .npz files; give another run's "
      "workdir instead."
    )
  family.import_npz(load_npz(source), model_cfg, image_size, True)


def load(
  params,
  source: str,
  *,
  family: ModelFamily,
  model_cfg,
  image_size: int,
  fresh_prefixes: tuple[str, ...] = (),
):
  """params (sharded, freshly initialised) with every key the source has loaded into them."""
  flat_target = flax.traverse_util.flatten_dict(params, sep="/")
  heads = tuple(family.head_prefixes) + tuple(fresh_prefixes)
  if source.endswith(".npz"):
    if family.import_npz is None:
      raise ValueError(
        f"init_from={source}: model {family.name!r} loads no .npz files; give another run's "
        "workdir instead."
      )
    with_head = any(k.startswith(tuple(family.head_prefixes)) for k in flat_target)
    # (params, notes) or (params, notes, stay_fresh): stay_fresh are key prefixes of ours the
    # source cannot provide and that keep their fresh initialisation, like a head (e.g. the
    # gated-LRU blocks when TRecViT starts from an ImageNet ViT).
    loaded, notes, *stay_fresh = family.import_npz(
      load_npz(source), model_cfg, image_size, with_head
    )
    heads += tuple(stay_fresh[0]) if stay_fresh else ()
    for note in notes:
      logging.info("init_from %s: %s", source, note)
  else:
    # Another run's workdir: read-only, params only, restored onto this run's shardings (so a
    # different mesh or device count works); a differently shaped head is not read.
    source_ckpt = checkpointing.Checkpointer(source, every_steps=0, keep=1, read_only=True)
    try:
      step, loaded = source_ckpt.load_params(flat_target)
    except checkpointing.CheckpointError as e:
      raise ValueError(f"init_from={source}: {e}") from e
    finally:
      source_ckpt.close()
    logging.info("init_from: parameters of step %d of %s.", step, source)
  out, fresh, bad = {}, [], []
  for key, target in flat_target.items():
    value = loaded.get(key)
    if value is not None and tuple(value.shape) == tuple(target.shape):
      out[key] = jax.device_put(jnp.asarray(value, target.dtype), target.sharding)
    elif key.startswith(heads):
      out[key] = target
      fresh.append(key)
    else:
      bad.append(key)
  if bad:
    raise ValueError(
      f"init_from={source}: {len(bad)} parameter(s) missing or mis-shaped, e.g. {bad[:5]}; check "
      "the model size, patch size and image size against the source's."
    )
  if fresh:
    logging.info("init_from: %d parameter(s) freshly initialised: %s", len(fresh), fresh)
  return flax.traverse_util.unflatten_dict(out, sep="/")
