"""Quantized weight storage: fp8 (e4m3fn / e5m2), "scaled fp8", and GGUF blocks, decoded per layer.

A Linear layer's stored `weight` may be:
  * a float tensor in any dtype (bf16, fp8, ...): computation casts it;
  * fp8 plus a `scale_weight` buffer (ComfyUI "scaled fp8" files: `<layer>.scale_weight`, or
    `<layer>.weight_scale` in other exporters): the real weight is `weight.float() * scale`;
  * raw GGUF blocks (uint8 rows) with the module attribute `quant_type` ("Q4_K", ...).
`weight_for_compute` turns any of these into a plain tensor on the compute device and dtype, moving
the compact form first (so streaming a Q4_K layer moves ~0.56 bytes per weight, not 2).
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from .files import CheckpointError
from .gguf import dequantize, is_quantized

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def stored_low_precision(shape) -> bool:
    """Whether a tensor of this shape takes a reduced-precision storage dtype (fp8): matrices (Linear and
    embedding weights, ~all of a transformer's bytes) do; vectors and convolution kernels keep the compute
    dtype: transformers' vision embeddings cast their *input* to the kernel's dtype, so an fp8 patch kernel
    would round the image itself to fp8."""
    return len(shape) == 2
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Keys of scaled-fp8 files that carry no weight: the file marker and input scales (used only by fp8 matmuls).
IGNORED_SUFFIXES = (".scale_input", ".input_scale")
IGNORED_KEYS = ("scaled_fp8",)
# ComfyUI's per-layer marker (its "mixed" files: `<layer>.comfy_quant`, JSON bytes naming the layer's format beside
# `<layer>.weight_scale`): the fp8 formats are scaled fp8 as above; the others (nvfp4, mxfp8, int8) have no decoder.
COMFY_QUANT_SUFFIX = ".comfy_quant"
COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def split_scale_keys(keys) -> tuple[dict[str, str], list[str]]:
    """({weight key: its scale key}, keys to drop) of a scaled-fp8 state dict."""
    scales, drop = {}, []
    for k in keys:
        if k in IGNORED_KEYS or k.endswith((*IGNORED_SUFFIXES, COMFY_QUANT_SUFFIX)) or \
                k.rsplit(".", 1)[-1] in IGNORED_KEYS:
            drop.append(k)
            continue
        for suffix in SCALE_SUFFIXES:
            if k.endswith(suffix):
                scales[k[: -len(suffix)] + ".weight"] = k
    return scales, drop


def scale_rows(scale: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """A per-tensor () / (1,) or per-output-row (out,) / (out, 1) scale, shaped to broadcast over the weight."""
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight_shape[0]:
        return scale.reshape(weight_shape[0], *([1] * (len(weight_shape) - 1)))
    raise ValueError(f"weight scale of shape {tuple(scale.shape)} does not fit a weight of shape {weight_shape}")


def quant_type(module: nn.Module) -> str | None:
    """GGUF type name of a module whose weight holds raw blocks, else None."""
    return getattr(module, "quant_type", None)


def to_compute(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` on `device`, cast to `dtype` if it is floating point (no copy when it already is both)."""
    if t is None:
        return None
    if t.device != device:
        t = t.to(device, non_blocking=True)
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def weight_for_compute(module: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The module's effective weight as a plain `dtype` tensor on `device` (a copy unless already there)."""
    qtype = quant_type(module)
    if qtype is not None:  # raw GGUF blocks (uint8): moved as they are, dequantized on the device
        return dequantize(to_compute(module.weight, device, dtype), qtype, dtype).reshape(module.weight_shape)
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        return (to_compute(module.weight, device, torch.float32) * to_compute(scale, device, torch.float32)).to(dtype)
    return to_compute(module.weight, device, dtype)


def effective_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as real numbers where it is stored (for inspection, export and tests)."""
    return weight_for_compute(module, module.weight.device, dtype)


def install_gguf_weight(module: nn.Module, raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> None:
    """Make `module.weight` the raw GGUF blocks of a `shape` weight (stays quantized in memory)."""
    if not is_quantized(type_name):
        raise ValueError(f"{type_name} is not a GGML quantized type")
    module.weight = nn.Parameter(raw, requires_grad=False)
    module.quant_type = type_name
    module.weight_shape = tuple(shape)


def install_weight_scale(module: nn.Module, scale: torch.Tensor) -> None:
    """Attach a scaled-fp8 scale: the effective weight becomes weight * scale."""
    module.register_buffer("scale_weight", scale_rows(scale.float(), tuple(module.weight.shape)), persistent=True)


@torch.no_grad()
def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """weight += delta in real numbers, whatever the storage (plain, fp8, scaled fp8). For LoRA merging.

    GGUF-quantized weights cannot absorb a delta without re-quantizing: use hot-loading there.
    """
    if quant_type(module) is not None:
        raise NotImplementedError(f"cannot merge into a GGUF {quant_type(module)} weight; "
                                  "load the LoRA with hotload=True instead")
    w = module.weight
    delta = delta.to(w.device, torch.float32)
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        s = scale.to(w.device, torch.float32)
        w.copy_(((w.float() * s + delta) / s).to(w.dtype))
    elif w.dtype in FP8_DTYPES or w.dtype in (torch.float16, torch.bfloat16):
        w.copy_((w.float() + delta).to(w.dtype))
    else:
        w.add_(delta.to(w.dtype))


# ----------------------------------------------------------------------------- loading helpers

def split_scales(refs: dict) -> tuple[dict, dict]:
    """(refs without scale and marker keys, {weight key: its scale ref}) of a possibly scaled-fp8 model."""
    scale_of, drop = split_scale_keys(refs.keys())
    scale_keys = set(scale_of.values())
    weights = {k: r for k, r in refs.items() if k not in scale_keys and k not in drop}
    markers = [k for k in drop if k.rsplit(".", 1)[-1] in IGNORED_KEYS]
    if markers and not scale_of and any(r.dtype in FP8_DTYPES for r in weights.values()):
        raise CheckpointError(f"{refs[markers[0]].path}: marked as ComfyUI scaled fp8 ({markers[0]!r}) but holds no "
                              f"scale tensors (*{SCALE_SUFFIXES[0]}): its fp8 weights would be used unscaled, "
                              "giving wrong images. The file is incomplete: download or export it again")
    _check_comfy_formats({k: refs[k] for k in drop if k.endswith(COMFY_QUANT_SUFFIX)})
    return weights, {w: refs[s] for w, s in scale_of.items() if w in weights}


def _check_comfy_formats(markers: dict) -> None:
    """Refuse layers whose ComfyUI marker names a format other than scaled fp8 (their weights are packed)."""
    for key, ref in markers.items():
        try:
            fmt = json.loads(ref.load(None, "cpu").numpy().tobytes()).get("format")
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{ref.path}: {key} is not a ComfyUI quantization marker (JSON): {e}") from None
        if fmt not in COMFY_FP8_FORMATS:
            raise CheckpointError(f"{ref.path}: layer {key[:-len(COMFY_QUANT_SUFFIX)]} is stored in ComfyUI's {fmt!r} "
                                  f"format, which diffsynth cannot decode (it reads {', '.join(COMFY_FP8_FORMATS)}, "
                                  "bf16 and GGUF): use the fp8 or bf16 file of this model")


def apply_scales(sd: dict[str, torch.Tensor], scales: dict, dtype: torch.dtype | None,
                 keep: Callable[[str, torch.Tensor], bool]) -> dict[str, torch.Tensor]:
    """Scaled fp8 weights in `sd` (loaded as stored): where `keep(key, scale)` stay fp8 (converted to the fp8
    `dtype`) and their scales are returned; elsewhere the scale is folded in and the weight cast to `dtype`."""
    kept = {}
    for key, ref in scales.items():
        w, s = sd[key], ref.load(torch.float32, sd[key].device)
        if dtype in FP8_DTYPES and keep(key, s):
            sd[key] = w if w.dtype == dtype else w.to(dtype)
            kept[key] = s
        else:
            sd[key] = (w.to(torch.float32) * scale_rows(s, tuple(w.shape))).to(dtype or torch.float32)
    return kept
