"""Embedded default: a tiny TRecViT on the synthetic motion dataset, on CPU.

  python -m trecvit_dist.main --config configs/synthetic_tiny.py --workdir /tmp/trecvit_tiny

Hardware: any CPU (2 cores are enough). The dataset (4 motion-direction classes, 16 frames of
32x32; one frame alone carries no class information) is generated into WORKDIR/data on the first
run. Expected: >= 90% eval/top1 after 300 steps, in a few minutes on 2 CPU cores (see
docs/benchmarks.md for the measured time). Removing the temporal blocks
(--config.model.temporal_blocks=False) stays near chance (25%).

`configs/synthetic_tiny.py:realistic`: the same task on the realistic variant of the generator
(bright textured backgrounds, sensor noise, distractors, H.264), with normalised input and 2-frame
tubelets, 600 steps: 90.2% / 91.0% held-out top-1 (seeds 0 / 1) in about 2-3 minutes on 2 CPU
cores. Its tubelets see motion themselves (without the temporal blocks it still reaches 82% at
step 400), so it does not show what the recurrence adds; docs/benchmarks.md has the ablation.
"""

from trecvit_dist.config_base import base_config


def get_config(arg=None):
  if arg not in (None, "", "realistic"):
    raise ValueError(f"configs/synthetic_tiny.py takes no argument or :realistic, got {arg!r}.")
  c = base_config()
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 300
  c.model.variant = ""
  c.model.width = 64
  c.model.depth = 2
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.patch_size = (1, 8, 8)
  c.model.rep_size = 64
  c.model.dtype = "float32"
  c.data.num_frames = 8
  c.data.stride = 2
  c.data.image_size = 32
  c.data.scale_jitter = (1.0, 1.0)  # the shapes are small; keep them whole
  c.data.flip = False  # left/right motion is the label
  c.data.workers = 0
  c.data.synthetic.num_train = 2048
  c.data.synthetic.num_validation = 256
  c.data.synthetic.frames = 16
  c.data.synthetic.size = 32
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.05
  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  if arg == "realistic":
    c.data.synthetic.variant = "realistic"
    c.data.mean = (0.5, 0.5, 0.5)  # of the realistic frames (measured: 0.51-0.53 / 0.28-0.29)
    c.data.std = (0.28, 0.28, 0.28)
    c.model.patch_size = (2, 8, 8)  # per-frame patches plateau for ~450 steps on this data
    c.total_steps = 600
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
  return c
