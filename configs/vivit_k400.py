"""ViViT (full spatio-temporal attention) supervised on Kinetics-400, TRecViT's recipe. `:S/B/L`.

  python -m trecvit_dist.main --config configs/vivit_k400.py:L --workdir gs://BUCKET/runs/vivit_l \
      --config.data.path=gs://BUCKET/data/k400 --config.init_from=gs://.../imagenet_vit_l16.npz

The TRecViT paper's baseline, trained with the paper's supervised K400 settings so that only the
model differs from configs/trecvit_k400.py: peak lr 1e-4, weight decay 0.03, label smoothing 0.1,
scale jitter (0.875, 1.33), 32 frames at stride 2, 224x224, 30 epochs of ~240k videos, global
batch 256, eval 4 temporal clips x 3 spatial crops, ViT blocks from ImageNet (init_from an
ImageNet ViT .npz: blocks as they are, the patch kernel on the tubelet's central frame, the
position grid tiled over time). ViViT's own tubelets of 2x16x16 (16 x 196 = 3136 tokens plus a
CLS); `--config.model.patch_size=1,16,16` gives one token per frame and patch (4x the attention
cost). Sizes: B 768 wide, 12 deep, MLP 3072, 12 heads (88.95M parameters at 32 frames, 400
classes); L 1024, 24, 4096, 16 (307.5M). bfloat16 compute, each block rematerialised
(dots_saveable). Hardware: TPU v5p-128 (64 chips), 4 clips per chip. Expected: the TRecViT
paper finds TRecViT-B on par with ViViT-L on K400; our ViViT's accuracy is not measured yet (no
K400 run), nor its time on v5p-128.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import base_config

NUM_TRAIN_VIDEOS = 240_000


def get_config(arg="B"):
  c = base_config()
  # Exactly ViViT's fields (models/vivit.py; model.num_frames follows data.num_frames); unset
  # sizes take the variant's value.
  c.model = ml_collections.ConfigDict()
  c.model.name = "vivit"
  c.model.variant = arg or "B"
  c.model.num_classes = 400
  for name, kind in (("width", int), ("depth", int), ("mlp_dim", int), ("num_heads", int)):
    c.model[name] = config_dict.placeholder(kind)
  c.model.patch_size = (2, 16, 16)
  c.model.pooling = "cls"
  c.model.rep_size = config_dict.placeholder(int)  # no pre-logits layer (ViViT's default)
  c.model.classifier_dropout = 0.0
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_saveable"

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
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 100
  return c
