"""Tiny random FLUX.1 image-conditioned variant DiTs (Kontext, Fill, Canny/Depth, FLEX.2) in their real layouts.

The variants' DiTs are FLUX DiTs with another input width (and FLEX.2 fewer double blocks), so each is
the tiny FLUX.1-dev DiT of `tiny.py` with its own `img_in` (and blocks dropped); a variant folder holds
the DiT only, and the text encoders and VAE come from the tiny FLUX.1-dev folder, as the real repos are
used. Written as::

    root/flux1-kontext-dev.safetensors | flux1-fill-dev.safetensors | flux1-canny-dev.safetensors
        | flux1-depth-dev.safetensors | Flex.2-preview.safetensors          (BFL keys)
    root/transformer/                                                      (dit_format="diffusers")
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from .tiny import TINY, write_json, _write_safetensors, _write_sharded, bfl_to_diffusers_dit, tiny_dit_state_dict

# variant -> (BFL file name, input channels, double blocks kept (None: all))
VARIANTS: dict[str, tuple[str, int, int | None]] = {
    "kontext": ("flux1-kontext-dev.safetensors", 64, None),
    "fill": ("flux1-fill-dev.safetensors", 384, None),
    "canny": ("flux1-canny-dev.safetensors", 128, None),
    "depth": ("flux1-depth-dev.safetensors", 128, None),
    "flex": ("Flex.2-preview.safetensors", 196, 1),
}


def tiny_variant_dit_state_dict(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """BFL-named tensors of the tiny `variant` DiT (its own random weights, deterministic in `seed`)."""
    _, channels, n_double = VARIANTS[variant]
    sd = tiny_dit_state_dict(seed + zlib.crc32(variant.encode()) % 1000, True, dtype)
    if n_double is not None:
        sd = {k: v for k, v in sd.items()
              if not (k.startswith("double_blocks.") and int(k.split(".")[1]) >= n_double)}
    g = torch.Generator().manual_seed(seed * 7919 + channels)
    hidden = TINY["dit"]["hidden_size"]
    sd["img_in.weight"] = (torch.randn(hidden, channels, generator=g) * 0.5 / channels ** 0.5).to(dtype)
    return sd


def diffusers_variant_config(variant: str) -> dict:
    c = TINY["dit"]
    _, channels, n_double = VARIANTS[variant]
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0",
            "attention_head_dim": c["head_dim"], "axes_dims_rope": list(c["axes_dim"]), "guidance_embeds": True,
            "in_channels": channels, "out_channels": c["in_channels"], "joint_attention_dim": c["context_dim"],
            "num_attention_heads": c["num_heads"], "num_layers": n_double or c["depth"],
            "num_single_layers": c["depth_single_blocks"], "patch_size": 1, "pooled_projection_dim": c["pooled_dim"]}


def build_tiny_variant(root: str | Path, variant: str, seed: int = 0, dit_format: str = "bfl",
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny `variant` DiT under `root` (BFL single file or diffusers `transformer/` folder)."""
    root = Path(root)
    sd = tiny_variant_dit_state_dict(variant, seed, dtype)
    if dit_format == "bfl":
        _write_safetensors(root / VARIANTS[variant][0], sd)
    elif dit_format == "diffusers":
        _write_sharded(root / "transformer", "diffusion_pytorch_model", bfl_to_diffusers_dit(sd))
        write_json(root / "transformer" / "config.json", diffusers_variant_config(variant))
    else:
        raise ValueError(f"dit_format must be 'bfl' or 'diffusers', got {dit_format!r}")
    return root


def diffusers_variant_transformer(root: str | Path, variant: str):
    """diffusers' FluxTransformer2DModel holding the tiny `variant` DiT written at `root` (BFL file)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file
    config = {k: v for k, v in diffusers_variant_config(variant).items() if not k.startswith("_")}
    model = FluxTransformer2DModel(**config)
    model.load_state_dict(bfl_to_diffusers_dit(load_file(Path(root) / VARIANTS[variant][0])), strict=True)
    return model


# ----------------------------------------------------------------------------- FLUX.1-Redux

TINY_SIGLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=28, patch_size=14)


def build_tiny_redux(root: str | Path, seed: int = 0) -> Path:
    """A tiny FLUX.1-Redux-dev folder: image_encoder/ (HF SiglipVisionModel: config.json + model.safetensors),
    flux1-redux-dev.safetensors (BFL) and image_embedder/ (diffusers ReduxImageEncoder), same weights."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    root = Path(root)
    torch.manual_seed(seed)
    siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval()
    with torch.no_grad():  # the default init leaves biases at zero: make every tensor matter
        for p in siglip.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    siglip.save_pretrained(root / "image_encoder")
    t5 = TINY["t5"]["d_model"]
    redux = ReduxImageEncoder(redux_dim=TINY_SIGLIP["hidden_size"], txt_in_features=t5).eval()
    redux.save_pretrained(root / "image_embedder")
    _write_safetensors(root / "flux1-redux-dev.safetensors", {k: v.contiguous() for k, v in redux.state_dict().items()})
    return root


def record_dit_calls(monkeypatch, passthrough: bool = False) -> list:
    """Record every DiTCall the denoiser makes (the DiT then returns zeros, or runs with `passthrough`)."""
    from ..pipelines import denoise
    calls, original = [], denoise.run_dit

    def run(dit, call, cache=None):
        calls.append(call)
        return original(dit, call, cache) if passthrough else torch.zeros_like(call.latents)
    monkeypatch.setattr(denoise, "run_dit", run)
    return calls
