"""TRecViT supervised on Kinetics-400 (paper supplementary settings). `:Ti/S/B/L` picks the size.

  launch/tpu.sh run --config configs/trecvit_k400.py:B  (or)
  python -m trecvit_dist.main --config configs/trecvit_k400.py:B --workdir gs://BUCKET/runs/k400_b \
      --config.data.path=gs://BUCKET/data/k400 --config.init_from=gs://.../imagenet_vit_b.npz

Hardware: TPU v5p-128 (64 chips) for B; global batch 256. Settings: peak lr 1e-4, weight decay
0.03, label smoothing 0.1, scale jitter (0.875, 1.33), 32 frames at stride 2, 30 epochs of the
~240k training videos, eval 4 temporal clips x 3 spatial crops. The paper initialises the ViT
blocks from ImageNet (set init_from). Expected: the paper reports TRecViT-B at ~80% top-1 on K400
(not reproduced by us yet); time on v5p-128 not measured yet.
"""

from trecvit_dist.config_base import apply_size, base_config

NUM_TRAIN_VIDEOS = 240_000


def get_config(arg="B"):
  c = apply_size(base_config(), arg)
  c.model.num_classes = 400
  c.batch_size = 256
  epochs = 30
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.num_frames = 32
  c.data.stride = 2
  c.data.image_size = 224
  c.data.scale_jitter = (0.875, 1.33)
  c.data.flip = True
  c.data.workers = 16
  c.data.eval_clips = 4
  c.data.eval_crops = 3
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.03
  c.optimizer.warmup_steps = 2 * NUM_TRAIN_VIDEOS // c.batch_size
  c.label_smoothing = 0.1
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.model.remat = "dots_saveable"
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  return c
