"""SigLIP vision encoder (transformers' SiglipVisionModel), from an HF folder or a single file.

Files seen in the wild: a `SiglipVisionModel` (`vision_model.*` keys, FLUX.1-Redux's image_encoder/), a
whole `SiglipModel` (text + vision, e.g. google/siglip-so400m-patch14-384: only the vision half is
built), and the same without the `vision_model.` level (transformers 5 saves SiglipVisionModel so).
With a config.json (plain or nesting `vision_config`) that config is used; otherwise the architecture is
read from the shapes (heads: 16 for the so400m width 1152, else head_dim 64).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

if TYPE_CHECKING:  # imported where used: the component table imports this file, transformers is slow to import
    from transformers import SiglipVisionConfig, SiglipVisionModel

from ..ops.files import CheckpointError
from .flux_text_encoders import layer_count, rebuild_position_ids
from ..ops.linear import adopt_linears
from ..ops.images import convert_image
from .entry import BuildOptions, Component, Detected, Family, fills, has_key, has_prefix, plain_tensors

VISION_PREFIX = "vision_model."
HEADS_BY_WIDTH = {1152: 16}  # so400m: head_dim 72


def vision_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, named without the `vision_model.` level (text tower dropped)."""
    if any(k.startswith(VISION_PREFIX) for k in state_dict):
        return {k[len(VISION_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)}
    return {k: v for k, v in state_dict.items() if not k.startswith(("text_model.", "logit_"))}


def infer_siglip_config(sd: Mapping[str, torch.Tensor]) -> SiglipVisionConfig:
    """SiglipVisionConfig from the vision tower's shapes (keys without `vision_model.`)."""
    try:
        patch = sd["embeddings.patch_embedding.weight"]
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        fc1 = sd["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"SigLIP vision encoder: missing key {e.args[0]!r}") from None
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    side = round(positions ** 0.5)
    heads = HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64) if hidden >= 64 else max(1, hidden // 8))
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=fc1.shape[0], num_channels=channels,
                              num_hidden_layers=layer_count(sd, "encoder.layers."), num_attention_heads=heads,
                              image_size=side * patch_size, patch_size=patch_size, layer_norm_eps=1e-6,
                              vision_use_head="head.probe" in sd)


def siglip_config(config_dict: Mapping | None, sd: Mapping) -> SiglipVisionConfig:
    if config_dict is None:
        return infer_siglip_config(sd)
    d = dict(config_dict.get("vision_config", config_dict))
    d.pop("model_type", None)
    d.setdefault("vision_use_head", "head.probe" in sd)
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig.from_dict(d)


def adopt_hf_model(model_cls, config, sd: Mapping[str, torch.Tensor], name: str) -> nn.Module:
    """Build a transformers vision model on the meta device and adopt `sd` (keys with the `vision_model.`
    level, which transformers 5 drops in some classes); non-persistent position ids are rebuilt."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    if not any(k.startswith(VISION_PREFIX) for k in expected):
        sd = {k.removeprefix(VISION_PREFIX): v for k, v in sd.items()}
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    bad = [k for k in sd.keys() & expected.keys() if sd[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{name}: weights do not fit the config; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shapes {bad[:5]}")
    model.load_state_dict(sd, strict=True, assign=True)
    rebuild_position_ids(model)
    return adopt_linears(model).eval().requires_grad_(False)


def load_siglip_vision(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping | None = None,
                       dtype: torch.dtype | None = None) -> SiglipVisionModel:
    """Build transformers' SiglipVisionModel from SigLIP weights (any of the layouts above)."""
    sd = vision_keys(state_dict)
    config = siglip_config(config_dict, sd)
    sd = {VISION_PREFIX + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    from transformers import SiglipVisionModel
    return adopt_hf_model(SiglipVisionModel, config, sd, "SigLIP vision encoder")


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

    def __init__(self, model: SiglipVisionModel):
        super().__init__()
        self.model = model

    def _run(self, images: list[Image.Image], device, dtype):
        return self.model(pixel_values=siglip_pixels(images, self.model.config.image_size).to(device, dtype))

    def forward(self, images: list[Image.Image], device, dtype) -> torch.Tensor:
        """(B, hidden): the attention-pooled embedding of each image."""
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
