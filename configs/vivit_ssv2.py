"""ViViT (full spatio-temporal attention) supervised on Something-Something v2, TRecViT's recipe.
`:S/B/L` picks the size.

  python -m trecvit_dist.main --config configs/vivit_ssv2.py:L --workdir gs://BUCKET/runs/vivit_ssv2_l \
      --config.data.path=gs://BUCKET/data/ssv2 --config.init_from=gs://.../imagenet_vit_l16.npz

configs/vivit_k400.py's settings (peak lr 1e-4, weight decay 0.03, label smoothing 0.1, scale
jitter (0.875, 1.33), 32 frames at stride 2, 2x16x16 tubelets, eval 4 clips x 3 crops, batch
256) plus the paper's SSv2 changes, as configs/trecvit_ssv2.py: classifier dropout 0.1,
RandAugment, no horizontal flip (left/right is part of SSv2's labels), 174 classes, 35 epochs of
~169k videos. Hardware: TPU v5p-128. Expected: the TRecViT paper finds TRecViT-B better than
ViViT-B and ViViT-L on SSv2; our ViViT's accuracy and time are not measured yet (no SSv2 run).
"""

from trecvit_dist.config_base import load_sibling

NUM_TRAIN_VIDEOS = 168_913


def get_config(arg="B"):
  c = load_sibling(__file__, "vivit_k400", arg)
  c.model.num_classes = 174
  c.model.classifier_dropout = 0.1
  epochs = 35
  c.total_steps = epochs * NUM_TRAIN_VIDEOS // c.batch_size
  c.data.flip = False
  c.data.randaugment = True
  c.optimizer.warmup_steps = 2 * NUM_TRAIN_VIDEOS // c.batch_size
  return c
