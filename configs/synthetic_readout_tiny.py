"""Tiny attentive readout on frozen features of configs/synthetic_mae_tiny.py's encoder, on CPU.

  python -m trecvit_dist.main --config configs/synthetic_readout_tiny.py \
      --workdir workdirs/readout_tiny --config.init_from=workdirs/mae_tiny

init_from (required): the synthetic_mae_tiny workdir (its newest checkpoint's tokenizer/ and
encoder/; the model fields here are that config's). The encoder is frozen; only the readout (a
learned query cross-attending to all tokens of all frames) trains, on the 4 motion classes of the
same synthetic dataset (regenerated into WORKDIR/data: the same seeds give the same videos).
Expected (measured on the 2-core CPU VM, docs/benchmarks.md): after 300 steps, 52-54% eval/top1
(3 readout seeds) on the encoder of the 400-step MAE run, 25-38% (chance: 25%) on the same encoder
at initialisation; ~20 s per readout. Random features do catch up with longer readouts (47% vs
58% after 600 steps at lr 3e-3): MAE features are the easier ones to read, not the only usable.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import base_config, load_sibling


def get_config(arg=None):
  del arg
  mae = load_sibling(__file__, "synthetic_mae_tiny")
  c = base_config()
  c.task = "readout"
  c.readout = ml_collections.ConfigDict(dict(num_heads=config_dict.placeholder(int)))
  c.init_from = ""  # required: a synthetic_mae_tiny workdir
  c.model = mae.model  # the pre-trained encoder's shape
  c.data = mae.data
  c.data.flip = False  # left/right motion is the label
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 300
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.0
  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.eval_every_steps = 300
  c.checkpoint_every_steps = 300
  return c
