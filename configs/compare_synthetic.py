"""The paper's Fig. 4 at toy scale: one model family on the synthetic motion data, CPU.
`:MODEL` is trecvit, vivit, vivit_factorised, pure_lru, tubevit or motionformer.

  python -m trecvit_dist.main --config configs/compare_synthetic.py:vivit --workdir /tmp/cmp_vivit_s0 \
      --config.seed=0

Everything but the model is configs/synthetic_tiny.py's (4 motion-direction classes, 8 frames of
32x32 at stride 2, batch 32, AdamW lr 1e-3, 300 steps, eval on 256 clips), so every family gets
the same data, optimiser and step budget. The models are matched in width (64), MLP (128), heads
(4), tokenisation (1x8x8 patches: 16 tokens per frame, 128 per clip) and size (0.15-0.17M
parameters, 4 blocks that mix tokens): TRecViT 2 x (gated-LRU block + ViT block); ViViT 4 ViT
blocks over all 128 tokens (plus a CLS); the factorised encoder 2 spatial + 2 temporal blocks;
PureLRU 3 x (gated-LRU block + MLP) over the 128 tokens in frame order (no attention), the class
read from the last position; Motionformer 4 trajectory-attention blocks (0.20M); TubeViT (width
72, a multiple of 6 for its sin-cos position; 0.27M) 4 ViT blocks over 1x8x8 patches plus offset
4x8x8 tubes. Hardware: 2 CPU cores; 4-14 minutes per run on the shared, loaded VM. Measured
(seed 0, eval top-1 after 300 steps, docs/benchmarks.md): TRecViT 98.4%, ViViT 49.2%, ViViT
factorised 25.0% and PureLRU 27.0% (both still at chance).
"""

import ml_collections

from trecvit_dist.config_base import load_sibling

# Shared by every family: the sizes of synthetic_tiny's TRecViT.
WIDTH, MLP_DIM, HEADS, PATCH, REP = 64, 128, 4, (1, 8, 8), 64

# Per family: its own config.model fields (besides name, variant, num_classes).
MODELS = {
  "vivit": dict(depth=4, patch_size=PATCH, pooling="cls"),
  "vivit_factorised": dict(depth=2, temporal_depth=2, patch_size=PATCH, pooling="cls"),
  "pure_lru": dict(depth=3, patch_size=PATCH, pooling="last", state_multiplier=2, min_rad=0.5),
  "motionformer": dict(depth=4, patch_size=PATCH, attention="exact"),
  "tubevit": dict(
    width=72,
    depth=4,
    # (kt, kh, kw, st, sh, sw, ot, oh, ow): the 1x8x8 patches, and 4x8x8 tubes every 4 frames
    # from a 4-pixel offset (straddling the patches' borders).
    tubes=((1, 8, 8, 1, 8, 8, 0, 0, 0), (4, 8, 8, 4, 8, 8, 0, 4, 4)),
    tube_kernels="independent",
  ),
}


def get_config(arg="trecvit"):
  c = load_sibling(__file__, "synthetic_tiny")
  name = arg or "trecvit"
  if name == "trecvit":
    return c  # synthetic_tiny's model as it is
  if name not in MODELS:
    raise ValueError(
      f"configs/compare_synthetic.py:{name}: unknown model; choose one of {['trecvit', *MODELS]}."
    )
  model = ml_collections.ConfigDict()
  model.name = name
  model.variant = ""
  model.num_classes = c.model.num_classes
  model.update(dict(width=WIDTH, mlp_dim=MLP_DIM, num_heads=HEADS, rep_size=REP, dtype="float32"))
  model.update(MODELS[name])
  c.model = model
  return c
