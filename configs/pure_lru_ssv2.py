"""PureLRU, the TRecViT paper's attention-free baseline, supervised on Something-Something v2.
`:Ti/S/B/L` picks the size.

  python -m trecvit_dist.main --config configs/pure_lru_ssv2.py:B --workdir gs://BUCKET/runs/purelru_b \
      --config.data.path=gs://BUCKET/data/ssv2

The paper's SSv2 settings, as configs/trecvit_ssv2.py, so that only the model differs: peak lr
1e-4, weight decay 0.03, label smoothing 0.1, classifier dropout 0.1, scale jitter (0.875,
1.33), RandAugment, no horizontal flip, 32 frames at stride 2, 224x224, 35 epochs of ~169k
videos, global batch 256, eval 4 temporal clips x 3 spatial crops. The model (models/pure_lru.py):
(1, 16, 16) patches flattened frame after frame into one sequence of 32 x 196 = 6272 tokens,
learned spatial + temporal position embeddings, depth residual blocks of the gated-LRU recurrent
block (c = 8, eigenvalue ring min_rad 0.5, conv1d width 4, LRU width 2x the model's) and an MLP,
the class read from the last position (the model is causal). No attention, hence no ImageNet-ViT
initialisation: it starts from scratch. Hardware: TPU v5p-128. Expected: the paper finds PureLRU
far below TRecViT on SSv2; not reproduced by us (no SSv2 run), time not measured yet.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import base_config

NUM_TRAIN_VIDEOS = 168_913


def get_config(arg="B"):
  c = base_config()
  # Exactly PureLRU's fields (models/pure_lru.py; model.num_frames follows data.num_frames);
  # unset sizes take the variant's value.
  c.model = ml_collections.ConfigDict()
  c.model.name = "pure_lru"
  c.model.variant = arg or "B"
  c.model.num_classes = 174
  for name, kind in (("width", int), ("depth", int), ("mlp_dim", int), ("num_heads", int)):
    c.model[name] = config_dict.placeholder(kind)
  c.model.patch_size = (1, 16, 16)
  c.model.rep_size = config_dict.placeholder(int)  # no pre-logits layer
  c.model.pooling = "last"
  c.model.classifier_dropout = 0.1
  c.model.conv1d_temporal_width = 4
  c.model.state_multiplier = 2
  c.model.min_rad = 0.5
  c.model.lru_impl = "auto"
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_saveable"

  c.batch_size = 256
  epochs = 35
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.num_frames = 32
  c.data.stride = 2
  c.data.image_size = 224
  c.data.scale_jitter = (0.875, 1.33)
  c.data.flip = False  # left/right is part of SSv2's labels
  c.data.randaugment = True
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
