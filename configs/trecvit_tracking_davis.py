"""Point tracking on frozen TRecViT features, evaluated on TAP-Vid DAVIS. `:Ti/S/B/L/H`.

  python -m data_pipelines.convert --tapvid kubric_tracks/ --out data/tracking --split train \
      --num-shards 64
  python -m data_pipelines.convert --tapvid tapvid_davis.pkl --out data/tracking --split davis \
      --num-shards 1
  python -m trecvit_dist.main --config configs/trecvit_tracking_davis.py:B \
      --workdir gs://BUCKET/runs/tracking_davis_b --config.data.path=data/tracking \
      --config.init_from=gs://BUCKET/runs/mae_k400_b     (or .../trecvit_B_mae.npz)

Data: TAP-Vid pickles (a dict per video of `video` frames, `points` [Q, T, 2] normalised (x, y)
and `occluded` [Q, T]), converted with `--tapvid` into records with point tracks. The readout
trains on synthetic tracks (Kubric MOVi-E, as MooG and TAPIR do, exported in the TAP-Vid layout:
split `train`) and is evaluated on the 30 TAP-Vid DAVIS videos (`tapvid_davis.pkl`, split
`davis`); any other TAP-Vid pickle (Perception Test, RGB-Stacking) evaluates the same way.

init_from (required): an MAE pre-training workdir (configs/trecvit_mae_k400.py) or an
official-layout .npz (trecvit_B_mae.npz; decoder/ keys are ignored). The encoder is frozen; only
the MooG-style recurrent readout trains (width 512, 3 cross-attention blocks per frame, 8 heads,
16 Fourier bases). Paper settings: 8 frames, lr 3e-4, 200k steps. Evaluation: TAP-Vid metrics in
query mode "first" (eval/average_jaccard, eval/occlusion_accuracy,
eval/average_pts_within_thresh), positions scaled to 256x256, on one 8-frame clip per video, its
central crop (data.eval_crops = 1: the pipeline crops a square, so points outside it count as
occluded, unlike the published protocol's full-frame resize). The paper reports average Jaccard
0.706 on DAVIS for TRecViT-B MAE features. Hardware: TPU v5p-32 for B (the encoder runs forward
only); global batch 64. Expected time and numbers: not measured yet.
"""

import ml_collections

from trecvit_dist.config_base import apply_size, base_config


def get_config(arg="B"):
  c = apply_size(base_config(), arg)
  c.task = "point_tracking"
  c.init_from = ""  # required: the MAE workdir or an official .npz
  c.model.num_classes = 400  # unused by the tracker (the encoder's classifier is not built)
  c.data.train_split = "train"
  c.data.eval_split = "davis"
  c.data.num_frames = 8
  c.data.stride = 1
  c.data.image_size = 224
  c.data.scale_jitter = (0.9, 1.33)
  c.data.flip = True  # the tracks are flipped with the frames
  c.data.workers = 16
  c.data.eval_clips = 1
  c.data.eval_crops = 1
  c.tracking = ml_collections.ConfigDict(
    dict(
      num_points=64,
      eval_num_points=64,
      width=512,
      num_layers=3,
      num_heads=8,
      mlp_dim=2048,
      fourier_bases=16,
      huber_weight=0.05,
      fresh_encoder=False,
      image_videos=2,
      image_points=16,
    )
  )
  c.batch_size = 64
  c.total_steps = 200_000
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.weight_decay = 0.0
  c.label_smoothing = 0.0
  c.mesh.data = -1
  c.eval_every_steps = 5000
  c.eval_batch_size = 32
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  return c
