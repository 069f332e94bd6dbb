"""CLIP ViT image encoder (openai/clip-vit-large-patch14 for XLabs' FLUX IP-Adapter).

Reads `CLIPVisionModelWithProjection` weights (`vision_model.*` + `visual_projection.weight`), also out of a
full CLIPModel file (the text tower is ignored). The embedding is the projected `image_embeds`, from images
resized (shortest side, bicubic) and centre-cropped to the model's size, normalised with CLIP's statistics.

The network is written here with transformers' parameter names (its model code costs about 2 s of a fresh process
to import), on the pre-LN layer CLIP's text tower uses, bidirectional:

    pixels (B, 3, S, S) -> [class token; patch conv (stride = patch)] + positions -> pre LN
    -> N x ClipLayer -> class token's state -> post LN -> visual_projection -> image_embeds (B, projection_dim)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..ops.images import convert_image
from ..ops.linear import Linear
from .clip_text import ClipEncoder, check_layer_config, zero_embedding
from .flux_text_encoders import layer_count
from .hf_adopt import adopt_weights
from .entry import BuildOptions, Detected, Family, fills, has_key, plain_tensors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768  # (transformers' CLIPVisionConfig defaults)
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_layer_config(self, "CLIP vision")

    @classmethod
    def from_dict(cls, config: dict) -> "ClipVisionConfig":
        """From a config.json: CLIPVisionConfig, or a full CLIPConfig (`vision_config` + top-level
        `projection_dim`); other keys are ignored."""
        d = {**config.get("vision_config", config)}
        if d.get("projection_dim") is None:
            d["projection_dim"] = config.get("projection_dim")
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


def clip_vision_config(sd: dict[str, torch.Tensor], config: dict | None) -> ClipVisionConfig:
    """config.json's, else read from the shapes (heads: width / 64; CLIP's quick GELU)."""
    if config:
        return ClipVisionConfig.from_dict(config)
    hidden, channels, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = layer_count(sd, "vision_model.encoder.layers.")
    return ClipVisionConfig(
        hidden_size=hidden, patch_size=patch, image_size=int(round((positions - 1) ** 0.5)) * patch,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), projection_dim=sd["visual_projection.weight"].shape[0],
        num_channels=channels)


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.image_size = c.image_size
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = zero_embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP vision encoder: images of {tuple(pixels.shape[-2:])} px, the model takes "
                             f"{self.image_size}x{self.image_size}")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + P, D)
        # the table through its module: VRAM management's cast layers convert it there
        return x + self.position_embedding(torch.arange(x.shape[1], device=x.device))


class ClipVisionTransformer(nn.Module):
    def __init__(self, c: ClipVisionConfig):
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # (transformers' spelling)
        self.encoder = ClipEncoder(c, causal=False)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, hidden): the class token's final state after the post-layernorm."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class ClipVisionModel(nn.Module):
    """CLIPVisionModelWithProjection's image embedding: the pooled class token projected (no bias)."""

    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = ClipVisionTransformer(config)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> image_embeds (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixel_values))


class ClipImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = self.model.config.image_size
        out = []
        for im in images:
            im = convert_image(im)
            s = size / min(im.size)
            im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

    def forward(self, images: list[Image.Image], device, dtype) -> torch.Tensor:
        return self.model(self.preprocess(images).to(device, dtype))


def load_clip_vision(sd: dict[str, torch.Tensor], config: dict | None, device) -> ClipImageEncoder:
    """The image encoder from `CLIPVisionModelWithProjection` weights (a full CLIPModel's text tower dropped);
    keys and shapes are checked against the config."""
    sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))
          and not k.endswith("position_ids")}
    with torch.device("meta"):
        model = ClipVisionModel(clip_vision_config(sd, config))
    return ClipImageEncoder(adopt_weights(model, sd, "CLIP vision encoder", "the config").to(device))


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """CLIPVisionModelWithProjection weights (alone or inside a full CLIPModel file)."""
    keys = refs.keys()
    return "hf" if has_key(keys, "vision_model.embeddings.class_embedding") and \
        has_key(keys, "visual_projection.weight") else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    return {"image_encoder": load_clip_vision(plain_tensors(det, options), det.config, options.device)}


FAMILIES = (Family("clip-vision", "CLIP vision encoder", detect, fills("image_encoder"), build),)
