"""`Linear`: nn.Linear whose fp32/bf16 CPU inference calls oneDNN's GEMM directly on AVX-512 CPUs.

On x86 CPUs `F.linear` in fp32 calls MKL's sgemm, and in bf16 reaches oneDNN through ATen's addmm
(which adds its own copies around the call). Calling oneDNN's linear kernel directly (the one
torch.compile's CPU backend emits) computes the same products with the same fp32 accumulation
(differences ~1e-7 relative in fp32) and made the mid-size DiT step 8-10 % faster in fp32 and 2-3 %
in bf16 on an AVX-512 development machine (benchmarks/dit_step.py prints both ways). On a 2-core
AVX2-only EPYC (2026-12-04, load ~1.3) the same GEMMs (the FLUX.2 mid DiT's shapes, with and without
bias) took 1.06-1.10x MKL's time in fp32 and the FLUX.2 step 0.98x diffusers' with oneDNN vs 0.94x on
MKL, and oneDNN had no bf16 kernels there; so the redirection is on by default only where torch reports
AVX-512 (or better). Everything else stays on `F.linear`: CUDA, autograd, CPU autocast, torch.compile
tracing, tensor subclasses, fp16/fp64, non-x86 CPUs, and bf16 where oneDNN has no bf16 kernels.

`adopt_linears(model)` converts another library's model (the text encoders); `set_onednn_linear(enabled)`
turns the redirection on or off (for A/B comparisons, or on CPUs where the default is off).
"""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

_PLAIN = (torch.Tensor, nn.Parameter)


def _kernel_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def default_onednn() -> bool:
    """On by default on x86 CPUs with AVX-512 only: with AVX2 alone MKL's GEMMs were faster, and elsewhere
    oneDNN may sit on other backends (ACL on Arm), never measured here."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and _kernel_available() and torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


_state = {"onednn": default_onednn()}


def _supported_dtypes() -> tuple[torch.dtype, ...]:
    bf16 = _kernel_available() and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_DTYPES = _supported_dtypes()


def set_onednn_linear(enabled: bool) -> None:
    """Route fp32/bf16 CPU inference GEMMs of `Linear` to oneDNN directly (default on AVX-512 x86) or not."""
    if enabled and not _kernel_available():
        raise RuntimeError("this torch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")
    _state["onednn"] = bool(enabled)


def onednn_linear_enabled() -> bool:
    return _state["onednn"]


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _state["onednn"] or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    if type(x) not in _PLAIN or type(weight) not in _PLAIN or weight.dtype != x.dtype or weight.device != x.device:
        return False
    if bias is not None and (type(bias) not in _PLAIN or bias.dtype != x.dtype or bias.device != x.device):
        return False
    if x.numel() == 0 or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on oneDNN directly for fp32/bf16 CPU inference."""
    if _onednn_applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def adopt_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` (a transformers text encoder, say) a `Linear`, in place."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return model
