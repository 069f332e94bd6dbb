"""Attention backends. torch SDPA is the default; others plug in by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND = "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, heads, L, D). `mask` is additive (0 / -inf) or boolean (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
