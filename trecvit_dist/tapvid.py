"""TAP-Vid point-tracking metrics, with the published evaluation's conventions and key names.

Inputs, per batch of b videos with q query points over t frames, in 256x256 raster pixels:
  query_points_BQ3  (frame, y, x) of each query; the frame is rounded to the nearest integer.
  gt_occluded_BQT, pred_occluded_BQT  booleans, True = occluded.
  gt_tracks_BQT2, pred_tracks_BQT2    (x, y) per frame.
Returns a dict of float64 [b] arrays, one value per video (the benchmark number is their mean):
  occlusion_accuracy            fraction of evaluated points whose occlusion is predicted right;
  pts_within_{1,2,4,8,16}       among evaluated points visible in the ground truth, the fraction
                                predicted strictly closer than the threshold (occlusion ignored);
  jaccard_{1,2,4,8,16}          TP / (TP + FP + FN): TP visible in both and within the threshold,
                                FP predicted visible but occluded or too far, FN the other
                                visible ground-truth points (so TP + FN = visible points);
  average_pts_within_thresh, average_jaccard   their means over the five thresholds.
Evaluated points: the query frame itself never is; query_mode "strided" evaluates every other
frame, "first" (queries at the first visible frame) only the frames after the query. A video with
no evaluated point (or no visible one, for the visible-only fractions) gets NaN.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS_PX = (1, 2, 4, 8, 16)
QUERY_MODES = ("first", "strided")


def _check(query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks, query_mode):
  """Validates shapes, dtypes, query frames and the mode; returns the query frames [b, q]."""
  if query_mode not in QUERY_MODES:
    raise ValueError(
      f"compute_tapvid_metrics: query_mode must be one of {QUERY_MODES}, got {query_mode!r}."
    )
  if gt_occluded.ndim != 3:
    raise ValueError(
      f"compute_tapvid_metrics: gt_occluded must be [batch, queries, frames], got "
      f"shape {gt_occluded.shape}."
    )
  b, q, t = gt_occluded.shape
  expected = {
    "query_points": (query_points, (b, q, 3)),
    "gt_tracks": (gt_tracks, (b, q, t, 2)),
    "pred_occluded": (pred_occluded, (b, q, t)),
    "pred_tracks": (pred_tracks, (b, q, t, 2)),
  }
  for name, (value, shape) in expected.items():
    if value.shape != shape:
      raise ValueError(
        f"compute_tapvid_metrics: {name} must have shape {shape} (from gt_occluded "
        f"[batch, queries, frames] = {(b, q, t)}), got {value.shape}."
      )
  for name, value in (("gt_occluded", gt_occluded), ("pred_occluded", pred_occluded)):
    if value.dtype != np.bool_:
      raise ValueError(
        f"compute_tapvid_metrics: {name} must be boolean (True = occluded), got "
        f"{value.dtype}; threshold scores first, e.g. occlusion_prob > 0.5."
      )
  query_frame = np.round(query_points[..., 0]).astype(np.int64)
  if query_frame.size and (query_frame.min() < 0 or query_frame.max() >= t):
    raise ValueError(
      f"compute_tapvid_metrics: query frames must lie in [0, {t}), got "
      f"[{query_frame.min()}, {query_frame.max()}]; query_points is (t, y, x)."
    )
  return query_frame


def _ratio(num, den):
  """num / den per video, NaN where den is 0 (no warning)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def compute_tapvid_metrics(
  query_points: np.ndarray,
  gt_occluded: np.ndarray,
  gt_tracks: np.ndarray,
  pred_occluded: np.ndarray,
  pred_tracks: np.ndarray,
  query_mode: str,
) -> dict[str, np.ndarray]:
  """TAP-Vid metrics of a batch of videos (see the module docstring); each value is [b]."""
  args = [np.asarray(v) for v in (query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks)]
  query_points, gt_occluded, gt_tracks, pred_occluded, pred_tracks = args
  query_frame_BQ = _check(*args, query_mode)
  frames_T = np.arange(gt_occluded.shape[2])
  if query_mode == "first":
    evaluated_BQT = frames_T > query_frame_BQ[..., None]
  else:
    evaluated_BQT = frames_T != query_frame_BQ[..., None]

  def count(mask_BQT):
    return np.sum(mask_BQT & evaluated_BQT, axis=(1, 2))

  gt_visible, pred_visible = ~gt_occluded, ~pred_occluded
  metrics = {
    "occlusion_accuracy": _ratio(count(gt_occluded == pred_occluded), count(evaluated_BQT))
  }
  sq_dist_BQT = np.sum(np.square(pred_tracks.astype(np.float64) - gt_tracks), axis=-1)
  for thresh in THRESHOLDS_PX:
    within = sq_dist_BQT < thresh**2
    true_pos = count(within & gt_visible & pred_visible)
    false_pos = count(pred_visible & (gt_occluded | ~within))
    metrics[f"pts_within_{thresh}"] = _ratio(count(within & gt_visible), count(gt_visible))
    metrics[f"jaccard_{thresh}"] = _ratio(true_pos, count(gt_visible) + false_pos)
  for name, prefix in (("average_jaccard", "jaccard"), ("average_pts_within_thresh", "pts_within")):
    metrics[name] = np.mean([metrics[f"{prefix}_{x}"] for x in THRESHOLDS_PX], axis=0)
  return metrics


__all__ = ["QUERY_MODES", "THRESHOLDS_PX", "compute_tapvid_metrics"]
