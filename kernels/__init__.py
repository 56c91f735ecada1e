"""Kernels for TRecViT: the gated linear recurrence (RG-LRU) and its references."""

from kernels.gated_lru import gated_lru

__all__ = ["gated_lru"]
