"""LoRA-Fusion (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev): a learned blend of hot-loaded LoRAs.

One merger per DiT linear (19 x 10 double-block + 38 x 3 single-block layers in FLUX.1). For the base output
b and the K hot-loaded LoRAs' outputs l_k of a layer (out features last):

    gate_k = sigmoid(LN_b(b) * w_base + LN_l(l_k) * w_lora + LN_b(b) * LN_l(l_k) * w_cross + bias)
    out    = b + sum_k w_out * gate_k * l_k

instead of the plain sum b + sum_k l_k. Checkpoint names (kept as ours): `model_dict.<layer with . as ___>.
{weight_base, weight_lora, weight_cross, weight_out, bias, norm_base.*, norm_lora.*}`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.files import CheckpointError
from .entry import BuildOptions, Component, Detected, Family, assign, fills, plain_tensors, shapes


class LoraMerger(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        for name in ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias"):
            setattr(self, name, nn.Parameter(torch.empty(dim)))
        self.norm_base, self.norm_lora = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)

    def forward(self, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
        """base (..., dim), loras (K, ..., dim) -> (..., dim)."""
        nb, nl = self.norm_base(base), self.norm_lora(loras)
        gate = torch.sigmoid(nb * self.weight_base + nl * self.weight_lora + nb * nl * self.weight_cross + self.bias)
        return base + (self.weight_out * gate * loras).sum(0)


class FluxLoraPatcher(nn.Module):
    def __init__(self, layers: dict[str, int]):
        """layers: internal DiT layer name -> its out features."""
        super().__init__()
        self.model_dict = nn.ModuleDict({n.replace(".", "___"): LoraMerger(d) for n, d in layers.items()})

    def mergers(self) -> dict[str, LoraMerger]:
        return {k.replace("___", "."): m for k, m in self.model_dict.items()}


def infer_patcher_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    layers = {k[len("model_dict."):-len(".weight_cross")].replace("___", "."): s[0]
              for k, s in shapes.items() if k.startswith("model_dict.") and k.endswith(".weight_cross")}
    if not layers:
        raise CheckpointError("LoRA-Fusion patcher: no model_dict.*.weight_cross entries")
    return layers


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if any(k.startswith("model_dict.") and k.endswith(".weight_cross") for k in keys) else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    layers = infer_patcher_layers(shapes(det.refs))
    return {"lora_patcher": assign(FluxLoraPatcher, layers, plain_tensors(det, options),
                                   f"LoRA-Fusion patcher from {det.source}")}


COMPONENTS = (Component("lora_patcher", "denoise", in_loop=True),)
FAMILIES = (Family("flux-lora-patcher", "FLUX LoRA-Fusion patcher", detect, fills("lora_patcher"), build, lora_named=True),)
