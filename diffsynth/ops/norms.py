"""Fused normalisation helpers of the DiT blocks (fewer passes over the activations, same numbers).

* `norm_modulate(x, shift, scale)`: LayerNorm without affine followed by (1 + scale) * x + shift, the adaptive
  LayerNorm of every FLUX block. When the modulation is shared by the batch (always for batch 1) it is one
  LayerNorm call whose affine weight is 1 + scale and bias is shift: one pass instead of a normalised
  temporary and a second addcmul pass.
* `rms_norm(x, weight)`: RMSNorm over the last dim with fp32 statistics, the result cast back before the weight
  (the reference order). In inference the sum of squares is one reduction (no squared temporary) and the
  weight is applied in place; with autograd, plain ops (in-place ones would clobber saved tensors).
* `swiglu(x)`: SiLU of the first half of the last dim times the second half; in inference it is computed in
  place in the gate half of `x` (no temporaries), and can write straight into a caller's buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x (B, L, D), shift/scale (B|1, D)."""
    if shift.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], 1 + scale[0], shift[0], eps)
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale[:, None])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dim (fp32 statistics), cast to x's dtype, times `weight`. The last dim of x
    should be contiguous (head views (B, L, H, D) of a projection are); other strides are fine."""
    x32 = x.float()
    if not _in_place_ok(x):
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    ms = torch.linalg.vector_norm(x32, 2, -1, keepdim=True).square_().div_(x.shape[-1])
    out = (x32 * ms.add_(eps).rsqrt_()).to(x.dtype)
    return out.mul_(weight) if out.dtype == weight.dtype else out * weight


def _in_place_ok(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


def swiglu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * value of x = [gate, value] (last dim). In inference x's gate half is overwritten and the
    product is written there (returned as a view of x) or into `out` when given; with autograd, plain ops."""
    gate, value = x.chunk(2, dim=-1)
    if not _in_place_ok(x):
        y = F.silu(gate) * value
        return y if out is None else out.copy_(y)
    return torch.mul(F.silu(gate, inplace=True), value, out=gate if out is None else out)
