"""Tiny random FLUX.2 models in the real on-disk layouts, for fast CPU tests.

Tensors come from `tiny._fill` (one generator per key), so a seed gives byte-identical files and the
same weights in every layout.

DiT (this section):
    folder/transformer/    diffusers layout: 2 shards + index + config.json (`write_tiny_flux2_transformer`)
    file.safetensors       BFL single file, optionally under ComfyUI's prefix (`write_tiny_flux2_bfl`)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.flux2_dit import dit_to_bfl
from .tiny import _fill, _linear, _norm, _Spec, _write_safetensors, _write_sharded, write_json

# diffusers' Flux2Transformer2DModel config names. The context width is 3 stacked text-encoder layers.
TINY_FLUX2_DIT: dict = dict(
    in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=96, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
)


def tiny_flux2_dit_config(guidance: bool = False, **overrides) -> dict:
    """The tiny DiT's config.json as diffusers writes it (`overrides` in diffusers' names)."""
    c = {**TINY_FLUX2_DIT, **overrides}
    return {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.42.0", "patch_size": 1,
            "out_channels": None, "eps": 1e-6, "guidance_embeds": guidance,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}}


def _flux2_dit_spec(c: dict, guidance: bool) -> _Spec:
    h = c["num_attention_heads"] * c["attention_head_dim"]
    d, m, t = c["attention_head_dim"], round(h * c["mlp_ratio"]), c["timestep_guidance_channels"]
    lin = lambda name, n_out, n_in: _linear(name, n_out, n_in, bias=False)  # noqa: E731  FLUX.2 has no biases
    spec: _Spec = lin("x_embedder", h, c["in_channels"]) + lin("context_embedder", h, c["joint_attention_dim"])
    for emb in ("timestep_embedder",) + (("guidance_embedder",) if guidance else ()):
        spec += lin(f"time_guidance_embed.{emb}.linear_1", h, t) + lin(f"time_guidance_embed.{emb}.linear_2", h, h)
    spec += lin("double_stream_modulation_img.linear", 6 * h, h) + lin("double_stream_modulation_txt.linear", 6 * h, h)
    spec += lin("single_stream_modulation.linear", 3 * h, h)
    for i in range(c["num_layers"]):
        p = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            spec += lin(f"{p}.attn.{name}", h, h)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            spec += _norm(f"{p}.attn.{name}", d, bias=False)
        for ff in ("ff", "ff_context"):
            spec += lin(f"{p}.{ff}.linear_in", 2 * m, h) + lin(f"{p}.{ff}.linear_out", h, m)
    for i in range(c["num_single_layers"]):
        p = f"single_transformer_blocks.{i}.attn"
        spec += lin(f"{p}.to_qkv_mlp_proj", 3 * h + 2 * m, h) + lin(f"{p}.to_out", h, h + m)
        spec += _norm(f"{p}.norm_q", d, bias=False) + _norm(f"{p}.norm_k", d, bias=False)
    spec += lin("norm_out.linear", 2 * h, h) + lin("proj_out", c["in_channels"], h)
    return spec


def tiny_flux2_dit_state_dict(seed: int = 0, guidance: bool = False, dtype: torch.dtype = torch.float32,
                              **overrides) -> dict[str, torch.Tensor]:
    """Random tiny FLUX.2 DiT weights in diffusers' (= our internal) names."""
    return _fill(_flux2_dit_spec({**TINY_FLUX2_DIT, **overrides}, guidance), seed, "flux2-dit", dtype)


def write_tiny_flux2_transformer(folder: str | Path, seed: int = 0, guidance: bool = False,
                                 dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """`folder/transformer/` as diffusers saves it (2 shards + index + config.json); returns that folder."""
    out = Path(folder) / "transformer"
    _write_sharded(out, "diffusion_pytorch_model", tiny_flux2_dit_state_dict(seed, guidance, dtype, **overrides))
    write_json(out / "config.json", tiny_flux2_dit_config(guidance, **overrides))
    return out


def write_tiny_flux2_bfl(path: str | Path, seed: int = 0, guidance: bool = False, dtype: torch.dtype = torch.float32,
                         prefix: str = "", **overrides) -> Path:
    """The same weights as one BFL-named file (`prefix="model.diffusion_model."`: ComfyUI's layout)."""
    path = Path(path)
    sd = dit_to_bfl(tiny_flux2_dit_state_dict(seed, guidance, dtype, **overrides))
    _write_safetensors(path, {prefix + k: v.contiguous() for k, v in sd.items()})
    return path
