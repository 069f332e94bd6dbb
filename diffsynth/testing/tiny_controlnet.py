"""Tiny random FLUX ControlNets in their real on-disk layout (diffusers FluxControlNetModel folders).

    folder/diffusion_pytorch_model.safetensors + config.json

Kinds: "union" (InstantX Union-alpha: mode embedder with 10 entries), "inpaint" (alimama Inpainting-Beta:
`controlnet_x_embedder` takes 64 + 4 channels), "plain" (jasperai Upscaler / generic). The weights are
written by diffusers' own class (every tensor redrawn at random, the zero-initialised outputs included), so
parity tests can load the same folder into diffusers.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch

from ..ops.files import save_safetensors
from .tiny import TINY

KINDS = ("union", "inpaint", "plain")


def diffusers_controlnet_config(kind: str = "plain", num_double: int = 2, num_single: int = 1,
                                guidance: bool = True) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    d = TINY["dit"]
    return dict(patch_size=1, in_channels=d["in_channels"], num_layers=num_double, num_single_layers=num_single,
                attention_head_dim=d["head_dim"], num_attention_heads=d["num_heads"],
                joint_attention_dim=d["context_dim"], pooled_projection_dim=d["pooled_dim"],
                guidance_embeds=guidance, axes_dims_rope=list(d["axes_dim"]),
                num_mode=10 if kind == "union" else None)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter redrawn from its own generator (seed, name): weights 0.5/sqrt(fan_in), biases 0.01,
    norm scales 1 + 0.01 N, embeddings 0.1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
            x = torch.randn(p.shape, generator=g)
            if "embedder.weight" in name and p.ndim == 2 and "mode" in name:
                x = x * 0.1
            elif p.ndim >= 2:
                x = x * (0.5 / (p[0].numel() ** 0.5))
            elif "norm" in name:
                x = 1.0 + 0.01 * x
            else:
                x = x * 0.01
            p.copy_(x)


def tiny_diffusers_controlnet(kind: str = "plain", num_double: int = 2, num_single: int = 1, seed: int = 0,
                              guidance: bool = True):
    """A diffusers FluxControlNetModel of TINY size with random weights (inpaint: 68-channel condition)."""
    from diffusers import FluxControlNetModel
    model = FluxControlNetModel(**diffusers_controlnet_config(kind, num_double, num_single, guidance))
    if kind == "inpaint":
        d = TINY["dit"]
        model.controlnet_x_embedder = torch.nn.Linear(d["in_channels"] + 4, model.inner_dim)
    _randomize(model, seed)
    return model.eval()


def build_tiny_controlnet(folder: str | Path, kind: str = "plain", num_double: int = 2, num_single: int = 1,
                          seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny ControlNet folder (diffusion_pytorch_model.safetensors + config.json); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_diffusers_controlnet(kind, num_double, num_single, seed, guidance)
    config = {"_class_name": "FluxControlNetModel", "_diffusers_version": "0.30.0",
              **diffusers_controlnet_config(kind, num_double, num_single, guidance)}
    if kind == "inpaint":
        config["extra_condition_channels"] = 4
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                     folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "config.json")
    return folder
