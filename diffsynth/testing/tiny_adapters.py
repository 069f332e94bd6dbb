"""Tiny random IP-Adapter files and image encoders in the real on-disk layouts, sized for the tiny DiT.

* `build_tiny_siglip(folder)`: a full SiglipModel folder (config.json + model.safetensors, vision and text
  towers), as google/siglip-so400m-patch14-384 ships it, written with transformers.
* `build_tiny_clip_vision(folder)`: CLIPVisionModelWithProjection folder (XLabs' image encoder).
* `write_tiny_instantx_ipadapter(path)`: InstantX `ip-adapter.bin` (nested `image_proj` / `ip_adapter` dicts,
  torch.save) or, for a `.safetensors` path, its flat form.
* `write_tiny_xlabs_ipadapter(path)`: XLabs `ip_adapter.safetensors` (`ip_adapter_proj_model.*`,
  `double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..ops.files import save_safetensors
from .tiny import TINY

IMAGE_SIZE, PATCH = 28, 14
ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=PATCH)


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * (0.5 / s[-1] ** 0.5 if len(s) > 1 else 0.05)
                + (1.0 if k.endswith("norm.weight") else 0.0)) for k, s in shapes.items()}


def build_tiny_siglip(folder: str | Path, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    config = SiglipConfig(vision_config=ENCODER, text_config=dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    SiglipModel(config).save_pretrained(folder)
    return Path(folder)


def build_tiny_clip_vision(folder: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER, projection_dim=24)).save_pretrained(folder)
    return Path(folder)


def instantx_ipadapter_state_dict(seed: int = 0, image_dim: int = 32, num_tokens: int = 4) -> dict[str, dict]:
    d = TINY["dit"]
    ctx, hidden = d["context_dim"], d["hidden_size"]
    proj = {"proj.0.weight": (2 * image_dim, image_dim), "proj.0.bias": (2 * image_dim,),
            "proj.2.weight": (num_tokens * ctx, 2 * image_dim), "proj.2.bias": (num_tokens * ctx,),
            "norm.weight": (ctx,), "norm.bias": (ctx,)}
    kv = {f"{i}.to_{x}_ip.weight": (hidden, ctx) for i in range(d["depth"] + d["depth_single_blocks"]) for x in "kv"}
    return {"image_proj": _random(proj, seed), "ip_adapter": _random(kv, seed + 1)}


def write_tiny_instantx_ipadapter(path: str | Path, seed: int = 0, image_dim: int = 32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = instantx_ipadapter_state_dict(seed, image_dim)
    if path.suffix == ".safetensors":
        save_safetensors({f"{group}.{k}": v for group, part in sd.items() for k, v in part.items()}, path)
    else:
        torch.save(sd, path)
    return path


def xlabs_ipadapter_state_dict(seed: int = 0, image_dim: int = 24, num_tokens: int = 4) -> dict[str, torch.Tensor]:
    d = TINY["dit"]
    ctx, hidden = d["context_dim"], d["hidden_size"]
    shapes = {"ip_adapter_proj_model.proj.weight": (num_tokens * ctx, image_dim),
              "ip_adapter_proj_model.proj.bias": (num_tokens * ctx,),
              "ip_adapter_proj_model.norm.weight": (ctx,), "ip_adapter_proj_model.norm.bias": (ctx,)}
    for i in range(d["depth"]):
        for x in "kv":
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{x}_proj"
            shapes.update({f"{p}.weight": (hidden, ctx), f"{p}.bias": (hidden,)})
    return _random(shapes, seed)


def write_tiny_xlabs_ipadapter(path: str | Path, seed: int = 0) -> Path:
    save_safetensors(xlabs_ipadapter_state_dict(seed), path)
    return Path(path)


def tiny_lora_encoder_layers() -> list[tuple[str, int, int]]:
    """(internal layer, in, out) of every linear of the tiny DiT, in DiffSynth's LoRA-Encoder order."""
    d = TINY["dit"]
    h, m = d["hidden_size"], int(d["hidden_size"] * d["mlp_ratio"])
    double = {"attn.a_to_qkv": (h, 3 * h), "attn.a_to_out": (h, h), "ff_a.0": (h, m), "ff_a.2": (m, h),
              "norm1_a.linear": (h, 6 * h), "attn.b_to_qkv": (h, 3 * h), "attn.b_to_out": (h, h), "ff_b.0": (h, m),
              "ff_b.2": (m, h), "norm1_b.linear": (h, 6 * h)}
    single = {"to_qkv_mlp": (h, 3 * h + m), "proj_out": (h + m, h), "norm.linear": (h, 3 * h)}
    return [(f"blocks.{i}.{k}", *v) for i in range(d["depth"]) for k, v in double.items()] + \
        [(f"single_blocks.{i}.{k}", *v) for i in range(d["depth_single_blocks"]) for k, v in single.items()]


def lora_encoder_state_dict(seed: int = 0, queries: int = 4, ff: int = 64) -> dict[str, torch.Tensor]:
    width = TINY["dit"]["context_dim"]
    shapes: dict[str, tuple[int, ...]] = {"special_embeds": (1, 1, width), "final_layer_norm.weight": (width,),
                                          "final_layer_norm.bias": (width,), "final_linear.weight": (width, width),
                                          "final_linear.bias": (width,)}
    kinds = {}
    for name, i, o in tiny_lora_encoder_layers():
        key = name.replace(".", "___")
        shapes.update({f"embedder.model_dict.{key}.x": (1, queries, i),
                       f"embedder.model_dict.{key}.layer_norm.weight": (o,),
                       f"embedder.model_dict.{key}.layer_norm.bias": (o,)})
        kinds[name.split(".", 2)[2].replace(".", "___")] = o
    for kind, o in kinds.items():
        shapes.update({f"embedder.proj_dict.{kind}.weight": (width, o), f"embedder.proj_dict.{kind}.bias": (width,)})
    for n in ("to_q", "to_k", "to_v", "to_out"):
        shapes.update({f"encoders.0.attn.{n}.weight": (width, width), f"encoders.0.attn.{n}.bias": (width,)})
    for n in ("layer_norm1", "layer_norm2"):
        shapes.update({f"encoders.0.{n}.weight": (width,), f"encoders.0.{n}.bias": (width,)})
    shapes.update({"encoders.0.fc1.weight": (ff, width), "encoders.0.fc1.bias": (ff,),
                   "encoders.0.fc2.weight": (width, ff), "encoders.0.fc2.bias": (width,)})
    sd = _random(shapes, seed)
    for k in sd:  # LayerNorm scales around 1
        if k.endswith("norm.weight") or ".layer_norm" in k and k.endswith(".weight") or k.endswith("norm1.weight") \
                or k.endswith("norm2.weight"):
            sd[k] = 1 + 0.05 * torch.randn(sd[k].shape, generator=torch.Generator().manual_seed(seed + 7))
    return sd


def write_tiny_lora_encoder(path: str | Path, seed: int = 0) -> Path:
    save_safetensors(lora_encoder_state_dict(seed), path)
    return Path(path)


def write_tiny_value_controller(path: str | Path, seed: int = 0, tokens: int = 4) -> Path:
    width = TINY["dit"]["context_dim"]
    save_safetensors(_random({"prefer_value_embedder.0.weight": (width, 256), "prefer_value_embedder.0.bias": (width,),
                              "prefer_value_embedder.2.weight": (width, width),
                              "prefer_value_embedder.2.bias": (width,), "positional_embedding": (tokens, width)},
                             seed), path)
    return Path(path)


def write_tiny_lora_patcher(path: str | Path, seed: int = 0) -> Path:
    """LoRAFusion-preview layout: `model_dict.<layer>.{weight_*, bias, norm_base.*, norm_lora.*}`."""
    shapes = {}
    for name, _, out in tiny_lora_encoder_layers():
        p = f"model_dict.{name.replace('.', '___')}."
        names = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias", "norm_base.weight",
                 "norm_base.bias", "norm_lora.weight", "norm_lora.bias")
        shapes.update({p + n: (out,) for n in names})
    g = torch.Generator().manual_seed(seed)
    sd = {k: (1.0 if k.endswith(("norm_base.weight", "norm_lora.weight", "weight_out")) else 0.0)
          + 0.3 * torch.randn(s, generator=g) for k, s in shapes.items()}
    save_safetensors(sd, path)
    return Path(path)
