"""CLIP ViT image encoder (openai/clip-vit-large-patch14 for XLabs' FLUX IP-Adapter), through transformers.

Reads `CLIPVisionModelWithProjection` weights (`vision_model.*` + `visual_projection.weight`), also out of a
full CLIPModel file (the text tower is ignored). The embedding is the projected `image_embeds`, from images
resized (shortest side, bicubic) and centre-cropped to the model's size, normalised with CLIP's statistics.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..ops.files import CheckpointError
from ..ops.images import convert_image
from ..ops.linear import adopt_linears
from .entry import BuildOptions, Detected, Family, fills, has_key, plain_tensors
from .flux_text_encoders import rebuild_position_ids
from .siglip import VISION_PREFIX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def clip_vision_config(sd: dict[str, torch.Tensor], config: dict | None):
    from transformers import CLIPVisionConfig
    if config:
        d = dict(config.get("vision_config", config))
        d.setdefault("projection_dim", config.get("projection_dim", d.get("projection_dim", 512)))
        d.pop("model_type", None)
        return CLIPVisionConfig.from_dict(d)
    hidden, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    return CLIPVisionConfig(
        hidden_size=hidden, patch_size=patch, image_size=int(round((positions - 1) ** 0.5)) * patch,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), projection_dim=sd["visual_projection.weight"].shape[0],
        hidden_act="quick_gelu")


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
        return self.model(pixel_values=self.preprocess(images).to(device, dtype)).image_embeds


def load_clip_vision(sd: dict[str, torch.Tensor], config: dict | None, device) -> ClipImageEncoder:
    from transformers import CLIPVisionModelWithProjection
    sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    model = adopt_hf_model(CLIPVisionModelWithProjection, clip_vision_config(sd, config), sd,
                           "CLIP vision encoder").to(device)
    return ClipImageEncoder(model)


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """CLIPVisionModelWithProjection weights (alone or inside a full CLIPModel file)."""
    keys = refs.keys()
    return "hf" if has_key(keys, "vision_model.embeddings.class_embedding") and \
        has_key(keys, "visual_projection.weight") else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    return {"image_encoder": load_clip_vision(plain_tensors(det, options), det.config, options.device)}


FAMILIES = (Family("clip-vision", "CLIP vision encoder", detect, fills("image_encoder"), build),)
