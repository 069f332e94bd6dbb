"""Our SigLIP vision tower (diffsynth/models/siglip.py) against transformers' SiglipVisionModel as the oracle."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth.models.siglip import (SiglipImageEncoder, SiglipVisionConfig, SiglipVisionTower, infer_siglip_config,
                                     load_siglip_vision, siglip_pixels)
from diffsynth.ops.files import CheckpointError

TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)


def oracle(use_head: bool = True, seed: int = 0, **overrides):
    """transformers' SiglipVisionModel with every tensor perturbed (norm scales away from 1, biases nonzero)."""
    from transformers import SiglipVisionConfig as HFConfig, SiglipVisionModel
    torch.manual_seed(seed)
    model = SiglipVisionModel(HFConfig(**{**TINY, **overrides}, vision_use_head=use_head)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))
    return model


def file_state_dict(model, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """The oracle's weights as a file names them (`vision_model.` level as transformers 4 writes it)."""
    return {prefix + k.removeprefix("vision_model."): v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def pixels(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("use_head", [True, False])
def test_fp32_matches_transformers(use_head):
    ref = oracle(use_head)
    ours = load_siglip_vision(file_state_dict(ref))
    assert isinstance(ours, SiglipVisionTower) and ours.config.vision_use_head is use_head
    assert ours.config.num_attention_heads == 4  # width 32 < 64: head_dim 8
    x = pixels()
    with torch.no_grad():
        expected, got = ref(pixel_values=x), ours(pixel_values=x)
    assert got.last_hidden_state.shape == (2, 16, 32)
    assert relative_error(got.last_hidden_state, expected.last_hidden_state) <= 1e-5
    if use_head:
        assert got.pooler_output.shape == (2, 32)
        assert relative_error(got.pooler_output, expected.pooler_output) <= 1e-5
    else:
        assert got.pooler_output is None and not any(k.startswith("vision_model.head") for k in ours.state_dict())


def test_bf16_close_to_fp32_oracle():
    ref = oracle()
    ours = load_siglip_vision(file_state_dict(ref), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    x = pixels()
    with torch.no_grad():
        expected, got = ref(pixel_values=x), ours(pixel_values=x.bfloat16())
    assert got.last_hidden_state.dtype == torch.bfloat16
    assert relative_error(got.last_hidden_state, expected.last_hidden_state) < 5e-2
    assert relative_error(got.pooler_output, expected.pooler_output) < 5e-2


def test_config_json_plain_and_nested_give_the_configs_heads(tmp_path):
    """A config.json decides what shapes cannot (2 heads here, 4 from the width); `vision_config` nests it."""
    ref = oracle(num_attention_heads=2)
    plain = json.loads(ref.config.to_json_string())
    x = pixels(1)
    with torch.no_grad():
        expected = ref(pixel_values=x)
    for config in (plain, {"model_type": "siglip", "vision_config": plain}):
        ours = load_siglip_vision(file_state_dict(ref, prefix=""), config)
        assert ours.config.num_attention_heads == 2 and ours.config.image_size == 32
        with torch.no_grad():
            got = ours(pixel_values=x)
        assert relative_error(got.pooler_output, expected.pooler_output) <= 1e-5
    wrong = load_siglip_vision(file_state_dict(ref))  # shapes alone: 4 heads, a different function
    with torch.no_grad():
        assert relative_error(wrong(pixel_values=x).pooler_output, expected.pooler_output) > 1e-3


def test_config_inference_and_from_dict():
    sd = {k.removeprefix("vision_model."): v for k, v in file_state_dict(oracle(use_head=False)).items()}
    assert infer_siglip_config(sd) == SiglipVisionConfig(**TINY, vision_use_head=False)
    assert SiglipVisionConfig(hidden_size=1152, num_attention_heads=16).num_attention_heads == 16
    so400m = {"embeddings.patch_embedding.weight": torch.empty(1152, 3, 14, 14, device="meta"),
              "embeddings.position_embedding.weight": torch.empty(729, 1152, device="meta"),
              "encoder.layers.0.mlp.fc1.weight": torch.empty(4304, 1152, device="meta"), "head.probe": None}
    c = infer_siglip_config(so400m)
    assert (c.num_attention_heads, c.image_size, c.patch_size, c.intermediate_size, c.vision_use_head) == \
        (16, 378, 14, 4304, True)
    assert SiglipVisionConfig.from_dict({"vision_config": {"image_size": [64, 64], "hidden_size": 64,
                                                           "num_attention_heads": 2, "unknown": 1}}).image_size == 64
    with pytest.raises(ValueError, match="not a multiple"):
        SiglipVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="missing key"):
        infer_siglip_config({})


def test_mismatched_weights_name_what_is_wrong():
    sd = file_state_dict(oracle())
    sd["vision_model.extra.weight"] = torch.zeros(1)
    del sd["vision_model.post_layernorm.bias"]
    with pytest.raises(CheckpointError, match="post_layernorm.bias.*extra.weight"):
        load_siglip_vision(sd)
    sd = file_state_dict(oracle())
    with pytest.raises(CheckpointError, match="wrong shapes.*encoder.layers.0"):
        load_siglip_vision(sd, {**TINY, "intermediate_size": 48})


def test_image_encoder_api_and_wrong_image_size():
    ref = oracle()
    encoder = SiglipImageEncoder(load_siglip_vision(file_state_dict(ref)))
    images = [Image.new("RGB", (40, 24), (200, 30, 90)), Image.new("RGB", (32, 32), (0, 255, 10))]
    with torch.no_grad():
        expected = ref(pixel_values=siglip_pixels(images, 32))
        pooled = encoder(images, "cpu", torch.float32)
        patches = encoder.patch_features(images, "cpu", torch.float32)
    assert relative_error(pooled, expected.pooler_output) <= 1e-5
    assert relative_error(patches, expected.last_hidden_state) <= 1e-5
    with pytest.raises(ValueError, match="32x32"):
        encoder.model(pixels(1, 40))
    headless = SiglipImageEncoder(load_siglip_vision(file_state_dict(oracle(use_head=False))))
    with pytest.raises(ValueError, match="no attention-pooling head"):
        headless(images, "cpu", torch.float32)


def test_loading_and_encoding_import_neither_transformers_nor_dynamo(tmp_path):
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in file_state_dict(oracle()).items()}, path)
    code = f"""
import sys, torch
from PIL import Image
from diffsynth.loading.registry import build, detect
[det] = detect({str(path)!r})
assert det.family == "siglip", det.family
encoder = build(det, compute_dtype=torch.float32)["image_encoder"]
out = encoder([Image.new("RGB", (32, 32), (10, 20, 30))], "cpu", torch.float32)
assert out.shape == (1, 32), out.shape
bad = [m for m in ("transformers", "torch._dynamo") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
