"""Attention backends. `attention(q, k, v, mask)` dispatches to the selected one.

* "auto" (default): exact kernels only. flash-attn (FA3, else FA2; exact attention) when installed, for
  CUDA fp16/bf16 calls without a mask; on x86 CPUs with AVX512-BF16, bf16 inference calls without a mask
  run ops/cpu_attention.py's kernel (about 2x torch's CPU kernel, same numerics); torch SDPA otherwise.
  Approximate kernels are never picked here.
* "sdpa": `torch.nn.functional.scaled_dot_product_attention` (picks its own flash/efficient/math kernel).
* "flash": flash-attn 3 (`flash_attn_interface`) or 2 (`flash_attn`); CUDA, fp16/bf16, no mask.
* "sage": SageAttention (`sageattention.sageattn`, 8-bit QK: approximate, opt-in only); CUDA, fp16/bf16,
  no mask.
* "math": plain softmax(QK^T/sqrt(d))V in the input dtype with fp32 softmax (reference, any device).

A `GroupMask` (ops/attention_mask.py, EliGen's regional mask) runs the selected backend on blocks of query
rows with their dense mask rows, so no (L x L) mask is ever built.

Inside a DiT block stack split over processes (ops/parallel.py, context parallelism) the keys and values
of every rank are all-gathered first, so the local queries attend over the whole sequence.

`set_attention_backend(name)` raises a clear error when the backend is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_attention
from .attention_mask import GroupMask, chunked_attention
from .names import ATTENTION_BACKENDS as BACKENDS
from .parallel import gather_keys_values, splitting_attention
_state = {"backend": "auto"}


_FLASH_MODULES = (("flash_attn_interface", "flash_attn_func"), ("flash_attn", "flash_attn_func"))
_kernels: dict[str, Callable | None] = {}


def _load_kernel(name: str) -> Callable | None:
    """Import flash-attn / SageAttention once (call before torch.compile traces `attention`)."""
    if name not in _kernels:
        candidates = _FLASH_MODULES if name == "flash" else (("sageattention", "sageattn"),)
        _kernels[name] = None
        for module, attr in candidates:
            if importlib.util.find_spec(module) is None:
                continue
            try:
                _kernels[name] = getattr(importlib.import_module(module), attr)
                break
            except (ImportError, AttributeError):
                continue
    return _kernels[name]


def _flash_fn() -> Callable | None:
    return _load_kernel("flash")


def _sage_fn() -> Callable | None:
    return _load_kernel("sage")


def available_backends() -> list[str]:
    """Backends usable in this environment (flash/sage additionally need CUDA half-precision tensors)."""
    out = ["auto", "sdpa", "math"]
    if _flash_fn() is not None:
        out.append("flash")
    if _sage_fn() is not None:
        out.append("sage")
    return out


def set_attention_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "flash" and _flash_fn() is None:
        raise ImportError("attention backend 'flash' needs flash-attn: `pip install flash-attn` "
                          "(or flash-attn 3 from its hopper/ build); available here: "
                          f"{available_backends()}")
    if name == "sage" and _sage_fn() is None:
        raise ImportError(f"attention backend 'sage' needs `pip install sageattention`; available here: "
                          f"{available_backends()}")
    _state["backend"] = name


def get_attention_backend() -> str:
    return _state["backend"]


def _half_cuda(q: torch.Tensor, mask) -> bool:
    return q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16)


def _check_kernel(name: str, q: torch.Tensor, mask) -> None:
    if not _half_cuda(q, mask):
        raise RuntimeError(f"attention backend {name!r} needs CUDA fp16/bf16 tensors and no mask, got "
                           f"{q.device} {q.dtype}{' with a mask' if mask is not None else ''}; "
                           "use set_attention_backend('auto') or 'sdpa'")


def _flash(q, k, v):
    out = _flash_fn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
    return out.transpose(1, 2)


def _sage(q, k, v):
    return _sage_fn()(q, k, v, tensor_layout="HND", is_causal=False)


def _math(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | GroupMask | None = None) -> torch.Tensor:
    """q, k, v: (B, heads, L, D). `mask` is additive (0 / -inf) or boolean (True = attend), or a GroupMask
    (then q may hold only the last queries of its tokens)."""
    if splitting_attention():
        if mask is not None:
            raise NotImplementedError("attention masks (EliGen regions) are not supported under context "
                                      "parallelism yet: run without --parallel / parallel=")
        k, v = gather_keys_values(k, v)
    if isinstance(mask, GroupMask):
        return chunked_attention(_dense_attention, q, k, v, mask)
    return _dense_attention(q, k, v, mask)


def _dense_attention(q, k, v, mask):
    backend = _state["backend"]
    if backend == "auto":
        if _half_cuda(q, mask) and _flash_fn() is not None:
            return _flash(q, k, v)
        if cpu_attention.applies(q, k, v, mask):
            return cpu_attention.attention_bf16(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return _math(q, k, v, mask)
    _check_kernel(backend, q, mask)
    return _flash(q, k, v) if backend == "flash" else _sage(q, k, v)
