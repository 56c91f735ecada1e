"""Frozen-feature attentive readout on Something-Something v2 of an MAE-pre-trained TRecViT.

  python -m trecvit_dist.main --config configs/trecvit_readout_ssv2.py:B \
      --workdir gs://BUCKET/runs/readout_ssv2_b --config.data.path=gs://BUCKET/data/ssv2 \
      --config.init_from=gs://BUCKET/runs/mae_k400_b     (or .../trecvit_B_mae.npz)

init_from (required): the pre-training workdir (configs/trecvit_mae_k400.py) or an official-layout
.npz, as in configs/trecvit_readout_k400.py. The encoder is frozen (stop_gradient, no optimizer
state); only the attentive readout trains. Hardware: TPU v5p-32 for B; global batch 256. Paper
settings: lr 3e-4, scale jitter (0.9, 1.33), 16 frames at stride 2, 6 epochs of ~169k videos. No
horizontal flip (left/right is part of SSv2's labels); weight decay, label smoothing and the 4
clips x 3 crops evaluation follow our supervised SSv2 config. Expected time and top-1: not
measured yet.
"""

from trecvit_dist.config_base import load_sibling

NUM_TRAIN_VIDEOS = 168_913


def get_config(arg="B"):
  c = load_sibling(__file__, "trecvit_readout_k400", arg)  # the readout; the SSv2 data below
  c.model.num_classes = 174
  c.total_steps = 6 * NUM_TRAIN_VIDEOS // c.batch_size  # 6 epochs
  c.optimizer.warmup_steps = NUM_TRAIN_VIDEOS // c.batch_size  # one epoch
  c.data.flip = False
  c.eval_every_steps = 1000
  return c
