"""Tiny random FLUX.1 model folders in the real on-disk layout, for fast CPU tests.

Every tensor is drawn from its own generator seeded by ``(seed, component, key)``, so
the same seed gives byte-identical files, and the same tensor in every layout
(BFL folder, diffusers shards, ComfyUI all-in-one file).

Layout written by :func:`build_tiny_flux`::

    root/flux1-dev.safetensors            BFL DiT keys   (dit_format="bfl")
    root/transformer/...                  diffusers DiT  (dit_format="diffusers", 2 shards + index + config)
    root/ae.safetensors                   BFL autoencoder keys
    root/text_encoder/                    HF CLIPTextModel: model.safetensors + config.json
    root/text_encoder_2/                  HF T5EncoderModel: 2 shards + index + config.json
    root/tokenizer/                       CLIP BPE: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    root/tokenizer_2/                     T5 sentencepiece: spiece.model, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.flux_text_encoders import CLIP_MAX_LENGTH
from ..nano.text import (T5_EXTRA_IDS, T5_MAX_LENGTH, T5_SP_VOCAB, TEXT_SIZES, Spec, conv_spec, fill_spec,
                         linear_spec, norm_spec, tiny_clip_config, tiny_clip_state_dict, tiny_t5_config,
                         tiny_t5_state_dict, write_bytes, write_clip_tokenizer, write_json, write_t5_tokenizer)
from ..ops.files import save_safetensors

__all__ = [
    "write_clip_tokenizer",
    "write_t5_tokenizer",
    "write_json",
    "write_bytes",
    "TINY",
    "build_tiny_flux",
    "build_tiny_comfy_checkpoint",
    "tiny_dit_state_dict",
    "tiny_ae_state_dict",
    "tiny_clip_state_dict",
    "tiny_t5_state_dict",
    "tiny_clip_config",
    "tiny_t5_config",
    "bfl_to_diffusers_dit",
    "COMFY_PREFIXES",
]

# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

TINY: dict[str, dict] = {
    "clip": TEXT_SIZES["clip"],
    "t5": TEXT_SIZES["t5"],
    "dit": dict(
        hidden_size=32,
        num_heads=2,
        head_dim=16,
        axes_dim=(4, 6, 6),
        depth=2,
        depth_single_blocks=2,
        in_channels=64,
        context_dim=32,
        pooled_dim=32,
        mlp_ratio=4.0,
        time_dim=256,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        z_channels=16,
    ),
    "tokenizer": dict(clip_max_length=CLIP_MAX_LENGTH, t5_max_length=T5_MAX_LENGTH, t5_sp_vocab=T5_SP_VOCAB,
                      t5_extra_ids=T5_EXTRA_IDS),
}

# --------------------------------------------------------------------------------------
# Shape tables -> deterministic random tensors
# --------------------------------------------------------------------------------------

def _dit_spec(guidance: bool) -> Spec:
    c = TINY["dit"]
    h, d, ctx, pooled, t = c["hidden_size"], c["head_dim"], c["context_dim"], c["pooled_dim"], c["time_dim"]
    m = int(h * c["mlp_ratio"])
    spec: Spec = []
    spec += linear_spec("img_in", h, c["in_channels"])
    spec += linear_spec("txt_in", h, ctx)
    spec += linear_spec("time_in.in_layer", h, t) + linear_spec("time_in.out_layer", h, h)
    spec += linear_spec("vector_in.in_layer", h, pooled) + linear_spec("vector_in.out_layer", h, h)
    if guidance:
        spec += linear_spec("guidance_in.in_layer", h, t) + linear_spec("guidance_in.out_layer", h, h)
    for i in range(c["depth"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            spec += linear_spec(f"{p}_mod.lin", 6 * h, h)
            spec += linear_spec(f"{p}_attn.qkv", 3 * h, h)
            spec += [(f"{p}_attn.norm.query_norm.scale", (d,), "norm"), (f"{p}_attn.norm.key_norm.scale", (d,), "norm")]
            spec += linear_spec(f"{p}_attn.proj", h, h)
            spec += linear_spec(f"{p}_mlp.0", m, h) + linear_spec(f"{p}_mlp.2", h, m)
    for i in range(c["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        spec += linear_spec(f"{p}.linear1", 3 * h + m, h) + linear_spec(f"{p}.linear2", h, h + m)
        spec += [(f"{p}.norm.query_norm.scale", (d,), "norm"), (f"{p}.norm.key_norm.scale", (d,), "norm")]
        spec += linear_spec(f"{p}.modulation.lin", 3 * h, h)
    spec += linear_spec("final_layer.linear", c["in_channels"], h)
    spec += linear_spec("final_layer.adaLN_modulation.1", 2 * h, h)
    return spec


def _resnet(name: str, c_in: int, c_out: int) -> Spec:
    spec = norm_spec(f"{name}.norm1", c_in) + conv_spec(f"{name}.conv1", c_out, c_in, 3)
    spec += norm_spec(f"{name}.norm2", c_out) + conv_spec(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        spec += conv_spec(f"{name}.nin_shortcut", c_out, c_in, 1)
    return spec


def _mid(name: str, c: int) -> Spec:
    spec = _resnet(f"{name}.block_1", c, c) + norm_spec(f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        spec += conv_spec(f"{name}.attn_1.{proj}", c, c, 1)
    return spec + _resnet(f"{name}.block_2", c, c)


def _ae_spec() -> Spec:
    c = TINY["vae"]
    ch, mult, nrb, z = c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"]
    levels = len(mult)
    spec: Spec = conv_spec("encoder.conv_in", ch, c["in_channels"], 3)
    block_in = ch
    for i in range(levels):
        block_out = ch * mult[i]
        for j in range(nrb):
            spec += _resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != levels - 1:
            spec += conv_spec(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    spec += _mid("encoder.mid", block_in)
    spec += norm_spec("encoder.norm_out", block_in) + conv_spec("encoder.conv_out", 2 * z, block_in, 3)

    block_in = ch * mult[-1]
    spec += conv_spec("decoder.conv_in", block_in, z, 3)
    spec += _mid("decoder.mid", block_in)
    for i in reversed(range(levels)):
        block_out = ch * mult[i]
        for j in range(nrb + 1):
            spec += _resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            spec += conv_spec(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    spec += norm_spec("decoder.norm_out", block_in) + conv_spec("decoder.conv_out", c["out_channels"], block_in, 3)
    return spec


def tiny_dit_state_dict(seed: int = 0, guidance: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tiny FLUX DiT weights with BFL key names."""
    return fill_spec(_dit_spec(guidance), seed, "dit", dtype)


def tiny_ae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tiny FLUX autoencoder weights with BFL (``encoder.*``/``decoder.*``) key names."""
    return fill_spec(_ae_spec(), seed, "ae", dtype)


def bfl_to_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split BFL FLUX DiT weights into diffusers ``FluxTransformer2DModel`` names."""
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd[f"{src}.{suffix}"]

    def split(dsts: list[str], src: str, sizes: list[int]) -> None:
        for suffix in ("weight", "bias"):
            for dst, part in zip(dsts, torch.split(sd[f"{src}.{suffix}"], sizes, dim=0)):
                out[f"{dst}.{suffix}"] = part.contiguous()

    h = sd["img_in.weight"].shape[0]
    put("x_embedder", "img_in")
    put("context_embedder", "txt_in")
    put("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    put("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    put("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    put("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    put("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    put("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")})
    for i in blocks:
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        put(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        put(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.img_attn.qkv", [h, h, h])
        split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{s}.txt_attn.qkv", [h, h, h])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{s}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{s}.txt_attn.norm.key_norm.scale"]
        put(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        put(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
        put(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        put(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        put(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        put(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for i in singles:
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m = sd[f"{s}.linear1.weight"].shape[0] - 3 * h
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{s}.linear1", [h, h, h, m])
        put(f"{d}.proj_out", f"{s}.linear2")
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.norm.key_norm.scale"]
        put(f"{d}.norm.linear", f"{s}.modulation.lin")
    put("proj_out", "final_layer.linear")
    # BFL chunks the final modulation as (shift, scale); diffusers as (scale, shift).
    for suffix in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{suffix}"].chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)
    return out


def _diffusers_dit_config(guidance: bool) -> dict:
    c = TINY["dit"]
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0",
        "attention_head_dim": c["head_dim"],
        "axes_dims_rope": list(c["axes_dim"]),
        "guidance_embeds": guidance,
        "in_channels": c["in_channels"],
        "joint_attention_dim": c["context_dim"],
        "num_attention_heads": c["num_heads"],
        "num_layers": c["depth"],
        "num_single_layers": c["depth_single_blocks"],
        "patch_size": 1,
        "pooled_projection_dim": c["pooled_dim"],
    }


# --------------------------------------------------------------------------------------
# Atomic file writing
# --------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors(tensors, path, metadata={"format": "pt"})


def _write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """HF-style sharding: ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``."""
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        _write_safetensors(folder / name, part)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# --------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------


def build_tiny_flux(
    root: str | Path,
    seed: int = 0,
    guidance: bool = True,
    dit_format: str = "bfl",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random FLUX.1-dev folder (see module docstring) under ``root`` and return it.

    ``guidance=False`` drops the guidance embedder (schnell-like); ``dit_format`` is ``"bfl"``
    (``root/flux1-dev.safetensors``) or ``"diffusers"`` (``root/transformer/``, 2 shards).
    """
    if dit_format not in ("bfl", "diffusers"):
        raise ValueError(f"dit_format must be 'bfl' or 'diffusers', got {dit_format!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    dit = tiny_dit_state_dict(seed, guidance, dtype)
    if dit_format == "bfl":
        _write_safetensors(root / "flux1-dev.safetensors", dit)
    else:
        _write_sharded(root / "transformer", "diffusion_pytorch_model", bfl_to_diffusers_dit(dit))
        write_json(root / "transformer" / "config.json", _diffusers_dit_config(guidance))
    _write_safetensors(root / "ae.safetensors", tiny_ae_state_dict(seed, dtype))

    _write_safetensors(root / "text_encoder" / "model.safetensors", tiny_clip_state_dict(seed, dtype))
    write_json(root / "text_encoder" / "config.json", tiny_clip_config())
    _write_sharded(root / "text_encoder_2", "model", tiny_t5_state_dict(seed, dtype))
    write_json(root / "text_encoder_2" / "config.json", tiny_t5_config())

    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    return root


COMFY_PREFIXES: dict[str, str] = {
    "dit": "model.diffusion_model.",
    "clip": "text_encoders.clip_l.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
    "vae": "vae.",
}


def build_tiny_comfy_checkpoint(
    path: str | Path, seed: int = 0, guidance: bool = True, dtype: torch.dtype = torch.float32
) -> Path:
    """Write ONE ComfyUI-style all-in-one safetensors file (same tensors as :func:`build_tiny_flux`)."""
    path = Path(path)
    parts = {
        "dit": tiny_dit_state_dict(seed, guidance, dtype),
        "clip": tiny_clip_state_dict(seed, dtype),
        "t5": tiny_t5_state_dict(seed, dtype),
        "vae": tiny_ae_state_dict(seed, dtype),
    }
    tensors = {COMFY_PREFIXES[name] + k: v for name, sd in parts.items() for k, v in sd.items()}
    _write_safetensors(path, tensors)
    return path
