"""Tiny random FLUX ControlNets in their real on-disk layout (diffusers FluxControlNetModel folders).

    folder/diffusion_pytorch_model.safetensors + config.json

Kinds: "union" (InstantX Union-alpha: mode embedder with 10 entries), "inpaint" (alimama Inpainting-Beta:
`controlnet_x_embedder` takes 64 + 4 channels), "plain" (jasperai Upscaler / generic), "xlabs" (XLabs layout:
one `flux-*-controlnet.safetensors` with BFL-named double blocks, `pos_embed_input`, `input_hint_block.N`;
its diffusers twin has `conditioning_embedding_channels=16`, patch size 2). The weights are
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

KINDS = ("union", "inpaint", "plain", "xlabs")
XLABS_FILE = "flux-canny-controlnet-v3.safetensors"


def diffusers_controlnet_config(kind: str = "plain", num_double: int = 2, num_single: int = 1,
                                guidance: bool = True) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    d = TINY["dit"]
    xlabs = kind == "xlabs"
    return dict(patch_size=2 if xlabs else 1, in_channels=d["in_channels"], num_layers=num_double,
                num_single_layers=0 if xlabs else num_single, conditioning_embedding_channels=16 if xlabs else None,
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
    if kind == "xlabs":
        save_safetensors(_to_xlabs(model.state_dict()), folder / XLABS_FILE, metadata={"format": "pt"})
        return folder
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


def _to_xlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers XLabs-style ControlNet weights -> the XLabs file's key names."""
    from ..models.flux_controlnet import controlnet_from_diffusers
    from ..models.flux_dit import internal_key_to_bfl
    out = {}
    for k, v in controlnet_from_diffusers(sd).items():
        if k.startswith(("controlnet_blocks.", "input_hint_block.")):
            out[k] = v
        elif k.startswith("controlnet_x_embedder."):
            out["pos_embed_input." + k.split(".", 1)[1]] = v
        else:
            out[internal_key_to_bfl(k)] = v
    return {k: v.contiguous() for k, v in out.items()}
