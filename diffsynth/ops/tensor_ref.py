"""What checkpoint readers return: a lazy reference to one stored tensor, and the error they raise."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

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
    # `read_range(ref, buf, start)` fills uint8 `buf` with the stored bytes from `start` on: lets a dtype
    # conversion read in chunks into the destination instead of holding the whole tensor twice
    read_range: Callable[["TensorRef", torch.Tensor, int], None] | None = None

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """The tensor, converted. NaN/Inf is refused here, as each tensor is read: kernels do not reliably
        propagate NaN (a CPU attention kernel can turn a NaN query finite), so a damaged weight could
        otherwise give a plausible but wrong image instead of an error."""
        convert = dtype is not None and self.dtype.is_floating_point and self.dtype != dtype
        if convert and self.read_range is not None:
            t = self._read_converted(dtype)
        else:
            t = self._checked(self.reader(self))
            if convert:
                t = t.to(dtype)
        return t if device is None else t.to(device)

    def _checked(self, t: torch.Tensor) -> torch.Tensor:
        if not all_finite(t):
            raise CheckpointError(f"{self.path}: tensor {self.key!r} holds NaN/Inf values (a damaged file, or one "
                                  "saved from a diverged training run): refused")
        return t

    def _read_converted(self, dtype: torch.dtype) -> torch.Tensor:
        """Read in chunks of CONVERT_CHUNK_BYTES, each checked in the stored dtype and converted into its slice
        of the destination: one pass, no full-size copy in the stored dtype."""
        out = torch.empty(self.shape, dtype=dtype)
        flat, step = out.view(-1), max(1, CONVERT_CHUNK_BYTES // self.dtype.itemsize)
        buf = torch.empty(min(step, self.numel), dtype=self.dtype)
        for start in range(0, self.numel, step):
            chunk = buf[:min(step, self.numel - start)]
            self.read_range(self, chunk.view(torch.uint8), start * self.dtype.itemsize)
            flat[start:start + chunk.numel()].copy_(self._checked(chunk))
        return out

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_exactly(fd: int, view: memoryview, offset: int, truncated: str) -> None:
    """Positional reads (no shared file position: threads may read one file at once) until `view` is full;
    CheckpointError(`truncated`) when the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(truncated)
        done += got


CONVERT_CHUNK_BYTES = 16 << 20
# Reads (and the finite check, the conversion) release the GIL: a few threads keep the disk or page cache busy.
LOAD_THREADS = min(4, os.cpu_count() or 1)


def load_all(requests: Mapping[str, tuple[TensorRef, torch.dtype | None]],
             device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """{key: ref.load(dtype, device)} for every {key: (ref, dtype)}, read by a small thread pool; the first
    failure in key order is raised, as a one-at-a-time loop would."""
    items = list(requests.items())
    if len(items) <= 1 or LOAD_THREADS == 1:
        return {k: r.load(d, device) for k, (r, d) in items}
    with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="load") as pool:
        tensors = list(pool.map(lambda item: item[1][0].load(item[1][1], device), items))
    return {k: t for (k, _), t in zip(items, tensors)}


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
