"""Evaluation: one pass over an eval split with a compiled eval step, summed over processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import pipeline
from trecvit_dist import experiment

STATS = ("skipped_records", "looped_clips")  # the pipeline's per-batch counts, logged as data/*


def sum_over_processes(counts: np.ndarray) -> list[int]:
  """Sums of per-process counts (a collective: every process calls it at the same steps)."""
  if jax.process_count() == 1:
    return [int(c) for c in counts]
  gathered = multihost_utils.process_allgather(np.asarray(counts, np.int32))
  return [int(c) for c in np.asarray(gathered).reshape(-1, len(counts)).sum(axis=0)]


def stats_text(totals: dict[str, int]) -> str:
  return (
    f"{totals['skipped_records']} corrupt record(s) skipped, {totals['looped_clips']} clip(s) "
    "looped (their video is shorter than the clip)"
  )


def evaluate(
  exp: experiment.Experiment, eval_step, images_step, params, data_path: str, split: str = ""
):
  """One pass over the eval split (default data.eval_split) -> ({metric: mean over samples},
  images or None, {stat: n}).

  images_step, if given, runs on the first batch (the same RNG as that batch's metrics) and is
  replicated, so every process has the whole image array.
  """
  config, d = exp.config, exp.config.data
  batch_size = experiment.eval_batch_size(config)
  options = dict(
    global_batch_size=batch_size,
    num_frames=d.num_frames,
    stride=d.stride,
    image_size=d.image_size,
    num_clips=d.eval_clips,
    num_crops=d.eval_crops,
    worker_count=0,
    skip_corrupt_records=d.skip_corrupt_records,
    mean=d.get("mean"),  # (video - mean) / std when set
    std=d.get("std"),
  )
  it = pipeline.eval_iterator(
    data_path, split or d.eval_split, **{**options, **exp.task.data_options(train=False)}
  )
  shardings = exp.batch_shardings(batch_size, train=False)
  totals, images = None, None
  stats = np.zeros(len(STATS), np.int64)
  for i, local in enumerate(it):
    stats += [int(local[f"{pipeline.STATS_PREFIX}{k}"]) for k in STATS]
    batch = pipeline.global_batch({k: local[k] for k in shardings}, shardings)
    sums = eval_step(params, batch, i)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if images_step is not None and images is None:
      # Replicated: this process's first shard is the whole array.
      images = np.asarray(images_step(params, batch, i).addressable_data(0))
  totals = jax.device_get(totals)
  count = max(float(totals.pop("count")), 1.0)
  result = {k: float(v) / count for k, v in totals.items()}
  return result, images, dict(zip(STATS, sum_over_processes(stats), strict=True))
