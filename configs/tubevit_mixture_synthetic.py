"""Joint image + video training (data.mixture): a tiny TubeViT on generated images and videos, CPU.

  python -m trecvit_dist.main --config configs/tubevit_mixture_synthetic.py --workdir /tmp/mix

Hardware: any CPU (a shared 2-core VM is enough). Two datasets are generated into
WORKDIR/data/ on the first run: images (32x32, 4 classes: the quadrant holding a bright square;
written as PNGs and converted by `data_pipelines.convert --images` into one-frame records) and the
synthetic motion videos (4 motion directions, 16 frames of 32x32, clips of 8 frames at stride 2).
Each global batch (32) comes whole from one of them, drawn by weight (1:1); each has its own
classifier head (heads/images, heads/motion) on one shared TubeViT: 1x8x8 tubes (an image's only
tokens) and 4x8x8 tubes (motion; no tokens on an image). Expected: eval/images/top1 1.0 and
eval/motion/top1 1.0 after 300 steps (0.93 for motion at step 100), in about 2.5 minutes on a
shared 2-core VM (measured 2m26s wall, data generation and two step compiles included).

Real data: convert each dataset (`python -m data_pipelines.convert --images DIR --labels CSV ...`
for images, `--videos` for videos), then write a config on this one with the members' paths:

  from trecvit_dist import config_base
  def get_config(arg=None):
    c = config_base.load_sibling(__file__, "tubevit_mixture_synthetic")
    c.data.mixture = (
      dict(path="gs://B/data/imagenet", weight=1.0, head="imagenet"),
      dict(path="gs://B/data/k400", weight=1.0, head="k400"),
    )
    return c

Each member: path, weight (> 0), head (members with one head name share that head and need the
same classes.txt); optional train_split / eval_split (default data.train_split / eval_split) and
num_frames (default 1 for an image dataset, whose records have one frame, else data.num_frames).
A path may be left empty with a `synthetic` dict (kind "images" or "motion"), as below.
"""

import ml_collections
from ml_collections import config_dict

from trecvit_dist.config_base import base_config

# (kt, kh, kw, st, sh, sw, ot, oh, ow): 2-D patches every other frame (16 tokens per frame; an
# image's tokens), and 4x8x8 tubes every 4 frames (2 x 16 on an 8-frame clip, none on an image).
TUBES = ((1, 8, 8, 2, 8, 8, 0, 0, 0), (4, 8, 8, 4, 8, 8, 0, 0, 0))


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = ml_collections.ConfigDict()
  c.model.name = "tubevit"
  c.model.variant = ""
  c.model.num_classes = config_dict.placeholder(int)  # per head: each member's classes.txt
  c.model.width = 48
  c.model.depth = 2
  c.model.mlp_dim = 96
  c.model.num_heads = 2
  c.model.tubes = TUBES
  c.model.tube_kernels = "independent"
  c.model.rep_size = config_dict.placeholder(int)
  c.model.classifier_dropout = 0.0
  c.model.dtype = "float32"
  c.model.remat = "none"

  c.seed = 0
  c.batch_size = 32
  c.total_steps = 300
  c.data.num_frames = 8  # the video member's clips; the image member's are 1 frame
  c.data.stride = 2
  c.data.image_size = 32
  c.data.scale_jitter = (1.0, 1.0)
  c.data.flip = False  # left/right is the label of both datasets
  c.data.workers = 0
  c.data.mixture = (
    dict(
      path="",
      weight=1.0,
      head="images",
      synthetic=dict(kind="images", num_train=1024, num_validation=256, size=32, seed=0),
    ),
    dict(
      path="",
      weight=1.0,
      head="motion",
      synthetic=dict(kind="motion", num_train=1024, num_validation=256, frames=16, size=32, seed=0),
    ),
  )
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.05
  c.label_smoothing = 0.0
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  return c
