"""Tiny point-tracking readout on frozen features, on the synthetic tracking data, on CPU.

  python -m trecvit_dist.main --config configs/synthetic_mae_tiny.py --workdir workdirs/mae_tiny
  python -m trecvit_dist.main --config configs/synthetic_tracking_tiny.py \
      --workdir workdirs/tracking_tiny --config.init_from=workdirs/mae_tiny
  python -m trecvit_dist.main --config configs/synthetic_tracking_tiny.py \
      --workdir workdirs/tracking_tiny_random --config.tracking.fresh_encoder=True

init_from: a synthetic_mae_tiny workdir (its newest checkpoint's tokenizer/ and encoder/; the
model fields here are that config's), or none with tracking.fresh_encoder=True (the same encoder
at initialisation: the baseline). The encoder is frozen; only the recurrent readout (width 64,
2 cross-attention blocks per frame) trains. Data: the synthetic tracking kind (textured objects
and an occluding bar over a panning background, exact tracks and occlusion; 16 frames of 32x32),
generated into WORKDIR/data; 8-frame clips at stride 2, 32 query points per clip, evaluated
TAP-Vid style (query mode "first", positions scaled to 256x256: the 1..16 px thresholds are
1/8..2 pixels of these frames).

Hardware: any CPU (2 cores are enough), ~4 min for 600 steps on the shared 2-core VM.
Status (measured 2026-12-01 on the 2-core VM, docs/benchmarks.md): NOT yet a working recipe. On
a 400-step synthetic_mae_tiny encoder (masked PSNR 15.0), 600 steps end at eval/average_jaccard
0.0003, average_pts_within_thresh 0.36, occlusion_accuracy 0.31: the readout does not learn the
tracks at this budget; the task's tests (streaming, metrics, frozen encoder) pass.
"""

import ml_collections

from trecvit_dist.config_base import base_config, load_sibling


def get_config(arg=None):
  del arg
  mae = load_sibling(__file__, "synthetic_mae_tiny")
  c = base_config()
  c.task = "point_tracking"
  c.init_from = ""  # a synthetic_mae_tiny workdir (or tracking.fresh_encoder=True)
  c.model = mae.model  # the pre-trained encoder's shape
  c.data = mae.data
  c.data.flip = True  # the tracks are flipped with the frames
  c.data.synthetic.kind = "tracking"
  c.data.synthetic.num_train = 1024
  c.data.synthetic.num_validation = 128
  c.tracking = ml_collections.ConfigDict(
    dict(
      num_points=32,
      eval_num_points=32,
      width=64,
      num_layers=2,
      num_heads=4,
      mlp_dim=128,
      fourier_bases=8,
      huber_weight=0.05,
      fresh_encoder=False,
      image_videos=2,
      image_points=16,
    )
  )
  c.seed = 0
  c.batch_size = 16
  c.total_steps = 600
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.0
  c.label_smoothing = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 300
  return c
