"""TAP-Vid metrics on hand-made tracks whose values can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from trecvit_dist.tapvid import compute_tapvid_metrics

KEYS = (
  ["occlusion_accuracy", "average_jaccard", "average_pts_within_thresh"]
  + [f"jaccard_{x}" for x in (1, 2, 4, 8, 16)]
  + [f"pts_within_{x}" for x in (1, 2, 4, 8, 16)]
)


def _case(batch=2, queries=3, frames=6, query_frame=0, seed=0):
  """(query_points_BQ3, occluded_BQT, tracks_BQT2): random visible tracks, queried at a frame."""
  rng = np.random.default_rng(seed)
  tracks = rng.uniform(20.0, 230.0, (batch, queries, frames, 2))
  occluded = np.zeros((batch, queries, frames), bool)
  qf = np.full((batch, queries), query_frame)
  y, x = tracks[:, :, query_frame, 1], tracks[:, :, query_frame, 0]
  return np.stack([qf, y, x], axis=-1).astype(np.float64), occluded, tracks


def _metrics(query, gt_occ, gt_tracks, pred_occ, pred_tracks, mode="first"):
  return compute_tapvid_metrics(query, gt_occ, gt_tracks, pred_occ, pred_tracks, mode)


@pytest.mark.parametrize("mode", ["first", "strided"])
def test_perfect_predictions_score_one(mode):
  query, occ, tracks = _case(query_frame=2)
  occ[0, 1, 4:] = True  # occluded points predicted occluded are right too
  m = _metrics(query, occ, tracks, occ.copy(), tracks.copy(), mode)
  assert sorted(m) == sorted(KEYS)
  for key in KEYS:
    assert m[key].shape == (2,) and np.allclose(m[key], 1.0), key


def test_everything_predicted_occluded_scores_zero_jaccard():
  query, occ, tracks = _case()
  m = _metrics(query, occ, tracks, np.ones_like(occ), tracks.copy())
  assert np.allclose(m["average_jaccard"], 0.0)
  assert np.allclose(m["occlusion_accuracy"], 0.0)
  assert np.allclose(m["average_pts_within_thresh"], 1.0)  # positions ignore occlusion


def test_three_pixel_offset_is_within_4_8_16_only():
  query, occ, tracks = _case()
  pred = tracks + np.array([3.0, 0.0])  # 3 px in x: not < 1 or 2 px, < 4, 8 and 16 px
  m = _metrics(query, occ, tracks, occ.copy(), pred)
  for thresh, want in ((1, 0.0), (2, 0.0), (4, 1.0), (8, 1.0), (16, 1.0)):
    assert np.allclose(m[f"jaccard_{thresh}"], want) and np.allclose(
      m[f"pts_within_{thresh}"], want
    )
  assert np.allclose(m["average_jaccard"], 0.6)
  assert np.allclose(m["average_pts_within_thresh"], 0.6)
  # "Within" is strict: exactly 4 px is not within 4.
  m = _metrics(query, occ, tracks, occ.copy(), tracks + np.array([0.0, 4.0]))
  assert np.allclose(m["jaccard_4"], 0.0) and np.allclose(m["jaccard_8"], 1.0)


def test_query_frame_is_not_evaluated_and_first_skips_earlier_frames():
  """One track of 4 visible frames queried at frame 2: wrong at the query frame only -> perfect
  in both modes; wrong (20 px) at frames 0 and 1 -> perfect in "first", which evaluates frame 3
  only, but 1 hit of 3 in "strided", which evaluates frames 0, 1 and 3."""
  query, occ, tracks = _case(batch=1, queries=1, frames=4, query_frame=2)
  wrong_at_query = tracks.copy()
  wrong_at_query[:, :, 2] += 20.0
  for mode in ("first", "strided"):
    m = _metrics(query, occ, tracks, occ.copy(), wrong_at_query, mode)
    assert np.allclose(m["average_jaccard"], 1.0), mode

  wrong_before = tracks.copy()
  wrong_before[:, :, :2] += 20.0
  first = _metrics(query, occ, tracks, occ.copy(), wrong_before, "first")
  strided = _metrics(query, occ, tracks, occ.copy(), wrong_before, "strided")
  assert np.allclose(first["average_jaccard"], 1.0)
  # TP = 1 (frame 3), visible = 3, FP = 2 (frames 0, 1 predicted visible but 20 px off).
  assert np.allclose(strided["average_jaccard"], 1 / (3 + 2))
  assert np.allclose(strided["average_pts_within_thresh"], 1 / 3)
  assert np.allclose(strided["occlusion_accuracy"], 1.0)


def test_false_visible_counts_against_jaccard_only():
  """Query at frame 0 of 4; the ground truth is occluded at frame 3 where the prediction says
  visible (at the right place): OA 2/3, Jaccard 2 / (2 + 1), positions among visible ones 1."""
  query, occ, tracks = _case(batch=1, queries=1, frames=4)
  gt_occ = occ.copy()
  gt_occ[0, 0, 3] = True
  m = _metrics(query, gt_occ, tracks, occ.copy(), tracks.copy())
  assert np.allclose(m["occlusion_accuracy"], 2 / 3)
  assert np.allclose(m["average_jaccard"], 2 / 3)
  assert np.allclose(m["average_pts_within_thresh"], 1.0)


def test_metrics_are_per_video():
  query, occ, tracks = _case(batch=2)
  pred = tracks.copy()
  pred[1] += np.array([3.0, 0.0])
  m = _metrics(query, occ, tracks, occ.copy(), pred)
  assert np.allclose(m["average_jaccard"], [1.0, 0.6])


def test_bad_inputs_are_rejected_with_the_fix():
  query, occ, tracks = _case()
  with pytest.raises(ValueError, match="query_mode must be one of"):
    _metrics(query, occ, tracks, occ, tracks, "last")
  with pytest.raises(ValueError, match=r"pred_tracks must have shape \(2, 3, 6, 2\)"):
    _metrics(query, occ, tracks, occ, tracks[..., ::-1, :][:, :, :5])
  with pytest.raises(ValueError, match=r"query_points must have shape \(2, 3, 3\)"):
    _metrics(query[..., :2], occ, tracks, occ, tracks)
  with pytest.raises(ValueError, match="pred_occluded must be boolean"):
    _metrics(query, occ, tracks, occ.astype(np.float32), tracks)
  with pytest.raises(ValueError, match=r"query frames must lie in \[0, 6\)"):
    _metrics(query + np.array([6.0, 0.0, 0.0]), occ, tracks, occ, tracks)
  with pytest.raises(ValueError, match="gt_occluded must be"):
    _metrics(query, occ[0], tracks, occ, tracks)
