"""SigLIP vision encoder (google/siglip-so400m-patch14-384 for the InstantX IP-Adapter), through transformers.

Reads an HF folder (config.json + model.safetensors) or the weight file alone, with or without the
`vision_model.` level; a full SiglipModel file (vision + text towers) keeps only the vision tower. Without a
config the architecture comes from the shapes (heads: 16 for the 1152-wide so400m, else width / 64).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


def siglip_vision_config(sd: dict[str, torch.Tensor], config: dict | None):
    """SiglipVisionConfig from config.json (a SiglipModel's `vision_config` or a vision model's own) or shapes."""
    from transformers import SiglipVisionConfig
    if config:
        d = dict(config.get("vision_config", config))
        d.pop("model_type", None)
        return SiglipVisionConfig.from_dict(d)
    hidden, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    return SiglipVisionConfig(
        hidden_size=hidden, patch_size=patch, image_size=int(round(positions ** 0.5)) * patch,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=16 if hidden == 1152 else max(1, hidden // 64),
        vision_use_head="vision_model.head.probe" in sd)


class SiglipImageEncoder(nn.Module):
    """Images -> pooled SigLIP embeddings (N, hidden): resized to the model's square size (bicubic), in [-1, 1]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def embed_dim(self) -> int:
        return self.model.config.hidden_size

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = self.model.config.image_size
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0

    def forward(self, images: list[Image.Image], device, dtype) -> torch.Tensor:
        pixels = self.preprocess(images).to(device, dtype)
        return self.model(pixel_values=pixels).pooler_output


def adopt_hf_model(model_cls, config, sd: dict[str, torch.Tensor], name: str, device) -> nn.Module:
    """Build a transformers model on the meta device and adopt `sd` (file names with or without the
    `vision_model.` level, which transformers 5 drops in some classes); non-persistent buffers rebuilt."""
    from ..ops.files import CheckpointError
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict())
    if not any(k.startswith("vision_model.") for k in expected):
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{name}: weights do not fit the architecture; missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(sd, assign=True)
    for module in model.modules():  # position ids are not stored in the files
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            module.position_ids = torch.arange(buf.shape[-1]).expand(1, -1)
    return model.to(device).eval().requires_grad_(False)


def load_siglip(sd: dict[str, torch.Tensor], config: dict | None, device) -> SiglipImageEncoder:
    from transformers import SiglipVisionModel
    if not any(k.startswith("vision_model.") for k in sd):  # transformers 5 vision-model files: no prefix
        sd = {f"vision_model.{k}": v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    model = adopt_hf_model(SiglipVisionModel, siglip_vision_config(sd, config), sd, "SigLIP vision encoder", device)
    return SiglipImageEncoder(model)
