"""SigLIP vision encoder, from an HF folder or a single file, as the FLUX.1-Redux and InstantX IP-Adapter use it.

Files seen in the wild: a `SiglipVisionModel` (`vision_model.*` keys, FLUX.1-Redux's image_encoder/), a
whole `SiglipModel` (text + vision, e.g. google/siglip-so400m-patch14-384: only the vision half is
built), and the same without the `vision_model.` level (transformers 5 saves SiglipVisionModel so).
With a config.json (plain or nesting `vision_config`) that config is used; otherwise the architecture is
read from the shapes (heads: 16 for the so400m width 1152, else head_dim 64).

The network is written here (parameter names as transformers 4 writes `SiglipVisionModel`: `vision_model.*`,
the pooling head under `vision_model.head.*` with nn.MultiheadAttention's names) rather than taken from
transformers, whose model code costs about 2 s of every fresh process to import:

    pixels (B, C, S, S) -> patch conv (stride = patch) + position table, no class token -> (B, P, D)
    -> N x [x + attn(ln1(x)), x + mlp(ln2(x))] (bidirectional, tanh-GELU MLP) -> post LN -> last_hidden_state
    head: one learned probe attends over the P states -> y; y + mlp(ln(y)) -> pooler_output (B, D)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .clip_text import ClipEncoder, ClipMLP, check_layer_config, zero_embedding
from .flux_text_encoders import layer_count
from ..ops.linear import Linear, linear
from ..ops.images import convert_image
from .hf_adopt import adopt_weights
from .entry import BuildOptions, Component, Detected, Family, fills, has_key, has_prefix, plain_tensors

VISION_PREFIX = "vision_model."
HEADS_BY_WIDTH = {1152: 16}  # so400m: head_dim 72


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        check_layer_config(self, "SigLIP vision")
        for name in ("image_size", "patch_size"):  # config.json may write a square size as [n, n]
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"SigLIP vision config: only square {name}s are supported, got {value}")
                object.__setattr__(self, name, int(value[0]))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, config: Mapping) -> "SiglipVisionConfig":
        """From a config.json (SiglipVisionConfig, or a full SiglipConfig whose `vision_config` holds it); other
        keys are ignored."""
        d = config.get("vision_config", config)
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


# ----------------------------------------------------------------------------- network

class SiglipVisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor      # (B, patches, hidden), after the post-layernorm
    pooler_output: torch.Tensor | None   # (B, hidden) from the attention-pooling head; None without one


class SiglipEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = zero_embedding(c.num_patches, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), patches row by row
        # the table through its module (not `.weight`): VRAM management's cast layers convert it there
        return x + self.position_embedding(torch.arange(x.shape[1], device=x.device))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D/H)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class PoolingAttention(nn.Module):
    """Cross-attention with nn.MultiheadAttention's parameter names: q/k/v projections packed in one
    (3D, D) `in_proj_weight` (rows q, then k, then v), and `out_proj`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = split_heads(linear(query, wq, bq), self.heads)  # (B, H, Q, d)
        k, v = (split_heads(linear(x, w, b), self.heads) for w, b in ((wk, bk), (wv, bv)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, Q, D)


class SiglipPoolingHead(nn.Module):
    """Multihead attention pooling: a learned probe token reads the patch states, then a residual MLP."""

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.attention = PoolingAttention(c.hidden_size, c.num_attention_heads)
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = ClipMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, D)."""
        y = self.attention(self.probe.expand(x.shape[0], -1, -1), x)
        return (y + self.mlp(self.layernorm(y)))[:, 0]


class SiglipTransformer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = ClipEncoder(c, causal=False)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.head = SiglipPoolingHead(c) if c.vision_use_head else None


class SiglipVisionTower(nn.Module):
    """The vision tower; parameters under `vision_model.` as transformers 4 names SiglipVisionModel's."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> SiglipVisionOutput:
        """(B, C, S, S) pixels in [-1, 1] at the config's image size -> (last_hidden_state, pooler_output)."""
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"SigLIP vision encoder: images of {size}x{size} expected (its position table), "
                             f"got {tuple(pixel_values.shape[-2:])}")
        m = self.vision_model
        x = m.embeddings(pixel_values)
        for layer in m.encoder.layers:
            x = layer(x)
        x = m.post_layernorm(x)
        return SiglipVisionOutput(x, m.head(x) if m.head is not None else None)


# ----------------------------------------------------------------------------- loading

def vision_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, named without the `vision_model.` level (text tower dropped)."""
    if any(k.startswith(VISION_PREFIX) for k in state_dict):
        return {k[len(VISION_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)}
    return {k: v for k, v in state_dict.items() if not k.startswith(("text_model.", "logit_"))}


def infer_siglip_config(sd: Mapping[str, torch.Tensor]) -> SiglipVisionConfig:
    """The config from the vision tower's shapes (keys without `vision_model.`)."""
    try:
        patch = sd["embeddings.patch_embedding.weight"]
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        fc1 = sd["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"SigLIP vision encoder: missing key {e.args[0]!r}") from None
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    side = round(positions ** 0.5)
    heads = HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64) if hidden >= 64 else max(1, hidden // 8))
    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=fc1.shape[0], num_channels=channels,
                              num_hidden_layers=layer_count(sd, "encoder.layers."), num_attention_heads=heads,
                              image_size=side * patch_size, patch_size=patch_size, layer_norm_eps=1e-6,
                              vision_use_head="head.probe" in sd)


def siglip_config(config_dict: Mapping | None, sd: Mapping) -> SiglipVisionConfig:
    if config_dict is None:
        return infer_siglip_config(sd)
    d = dict(config_dict.get("vision_config", config_dict))
    d.setdefault("vision_use_head", "head.probe" in sd)
    return SiglipVisionConfig.from_dict(d)


def load_siglip_vision(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping | None = None,
                       dtype: torch.dtype | None = None) -> SiglipVisionTower:
    """Build the vision tower on the meta device and adopt SigLIP weights (any of the layouts above), cast to
    `dtype` (floating tensors; None keeps the file's)."""
    sd = vision_keys(state_dict)
    config = siglip_config(config_dict, sd)
    sd = {VISION_PREFIX + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    with torch.device("meta"):
        model = SiglipVisionTower(config)
    return adopt_weights(model, sd, "SigLIP vision encoder", "the config")


def siglip_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size): bicubic resize, then [0, 1] mapped to [-1, 1] (SigLIP's mean = std = 0.5)."""
    arrays = []
    for image in images:
        image = convert_image(image)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy((np.stack(arrays) - 0.5) / 0.5).permute(0, 3, 1, 2)


class SiglipImageEncoder(nn.Module):
    """The `image_encoder` component: PIL images -> SigLIP features (pooled for the IP-Adapter, patch
    features for Redux), resized to the model's square size (bicubic) and mapped to [-1, 1]."""

    def __init__(self, model: SiglipVisionTower):
        super().__init__()
        self.model = model

    def _run(self, images: list[Image.Image], device, dtype):
        return self.model(pixel_values=siglip_pixels(images, self.model.config.image_size).to(device, dtype))

    def forward(self, images: list[Image.Image], device, dtype) -> torch.Tensor:
        """(B, hidden): the attention-pooled embedding of each image."""
        if not self.model.config.vision_use_head:
            raise ValueError("this SigLIP vision encoder has no attention-pooling head (`head.*` weights): it gives "
                             "patch features (Redux), not pooled embeddings (IP-Adapter)")
        return self._run(images, device, dtype).pooler_output

    def patch_features(self, images: list[Image.Image], device, dtype) -> torch.Tensor:
        """(B, patches, hidden): the last hidden state (after the post-layernorm) of each image."""
        return self._run(images, device, dtype).last_hidden_state


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """A SigLIP vision tower: alone (`vision_model.*`, or unnested as transformers 5 saves it) or inside a
    whole SiglipModel (text tower beside it). CLIP's vision tower has a class token; SigLIP's has none."""
    keys = refs.keys()
    for p in ("vision_model.", ""):
        if has_key(keys, f"{p}embeddings.patch_embedding.weight") and \
                has_prefix(keys, f"{p}encoder.layers.0.self_attn.q_proj.") and \
                not has_key(keys, f"{p}embeddings.class_embedding"):
            return "hf"
    return None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = plain_tensors(det, options)  # storage dtype already (small tensors precise under fp8)
    return {"image_encoder": SiglipImageEncoder(load_siglip_vision(sd, det.config)).to(options.device)}


COMPONENTS = (Component("image_encoder", "image_encoder", activation="text", aliases=("siglip",)),)
FAMILIES = (Family("siglip", "SigLIP vision encoder", detect, fills("image_encoder"), build),)
