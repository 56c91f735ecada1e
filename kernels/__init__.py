"""Kernels for TRecViT: the gated linear recurrence (RG-LRU), its references and sharded entry."""

from kernels.gated_lru import gated_lru
from kernels.sharded import gated_lru_sharded

__all__ = ["gated_lru", "gated_lru_sharded"]
