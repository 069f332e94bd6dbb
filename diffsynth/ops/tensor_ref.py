"""What checkpoint readers return: a lazy reference to one stored tensor, and the error they raise."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not what it claims to be."""


@dataclass
class TensorRef:
    """Where one tensor lives. `reader(ref)` returns it as stored; `load` converts dtype/device."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: str
    reader: Callable[["TensorRef"], torch.Tensor]
    offset: int = 0
    nbytes: int = 0
    extra: object = None  # format-specific payload (a preloaded tensor, a GGUF quant type, ...)

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The tensor, converted. NaN/Inf is refused here, as each tensor is read: kernels do not reliably
        propagate NaN (a CPU attention kernel can turn a NaN query finite), so a damaged weight could
        otherwise give a plausible but wrong image instead of an error."""
        t = self.reader(self)
        if not all_finite(t):
            raise CheckpointError(f"{self.path}: tensor {self.key!r} holds NaN/Inf values (a damaged file, or one "
                                  "saved from a diverged training run): refused")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t if device is None else t.to(device)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# fp8 codes of NaN/Inf are the top of the byte range: (first code in the int8 view, in the uint8 view) for
# the positive and the negative ones (e4m3fn: 0x7F/0xFF are NaN; e5m2: 0x7C-0x7F/0xFC-0xFF are Inf/NaN).
_FP8_NONFINITE = {torch.float8_e4m3fn: (0x7F, 0xFF), torch.float8_e5m2: (0x7C, 0xFC)}


def all_finite(t: torch.Tensor) -> bool:
    """No element is NaN/Inf (True for integer tensors), at memory speed.

    A finite sum proves it: NaN and Inf survive any sum. Only a non-finite sum (which an fp16 overflow can
    also cause) pays for the exact element-wise check, which is 20-70x slower on CPU."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.dtype in _FP8_NONFINITE:
        pos, neg = _FP8_NONFINITE[t.dtype]
        return bool(t.view(torch.int8).max() < pos) and bool(t.view(torch.uint8).max() < neg)
    if t.dtype.itemsize == 1:  # other 8-bit float formats: no fast path
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
