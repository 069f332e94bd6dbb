"""XLabs' CLIP image encoder, our own network, against transformers' CLIPVisionModelWithProjection (the oracle) on
random weights; loading from files with and without config.json; no transformers import."""
import subprocess
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from diffsynth.models.clip_vision import ClipVisionConfig, load_clip_vision
from diffsynth.ops.files import CheckpointError

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=24)


def oracle(seed: int = 0, **overrides) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**CONFIG, **overrides})).eval()
    with torch.no_grad():  # every tensor random (transformers initialises norms to one, biases to zero)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers(act):
    ref = oracle(hidden_act=act)
    ours = load_clip_vision(ref.state_dict(), {**CONFIG, "hidden_act": act}, "cpu").model
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(pixel_values=x).image_embeds
        assert rel(ours(x), expected) < 1e-5
        assert rel(ours.to(torch.bfloat16)(x), expected) < 5e-2
    with pytest.raises(ValueError, match=r"images of \(16, 16\) px, the model takes 32x32"):
        ours(torch.zeros(1, 3, 16, 16))


def test_config_from_files_and_shapes():
    ref = oracle(num_attention_heads=2)
    sd = ref.state_dict()
    full = {"model_type": "clip", "projection_dim": 24, "vision_config": {**CONFIG, "num_attention_heads": 2,
                                                                          "projection_dim": None}}
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(pixel_values=x).image_embeds
        assert rel(load_clip_vision(sd, full, "cpu").model(x), expected) < 1e-5  # a full CLIPConfig
        inferred = load_clip_vision(sd, None, "cpu").model  # without config.json: heads = width / 64 -> 1
        assert inferred.config.num_attention_heads == 1 and inferred.config.image_size == 32
        assert rel(inferred(x), expected) > 1e-3
    assert ClipVisionConfig.from_dict(full).projection_dim == 24


def test_weights_that_do_not_fit_are_refused():
    sd = oracle().state_dict()
    with pytest.raises(CheckpointError, match="missing .*visual_projection.weight"):
        load_clip_vision({k: v for k, v in sd.items() if not k.startswith("visual_projection")}, CONFIG, "cpu")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_clip_vision(sd, {**CONFIG, "intermediate_size": 40}, "cpu")


def test_loading_and_encoding_import_neither_transformers_nor_dynamo(tmp_path):
    from diffsynth.testing.tiny_adapters import build_tiny_clip_vision
    folder = build_tiny_clip_vision(tmp_path / "clip")
    code = f"""
import sys, torch
from PIL import Image
from diffsynth.loading.registry import build, detect
(det,) = detect({str(folder)!r})
encoder = build(det, torch.float32, "cpu")["image_encoder"]
assert encoder([Image.new("RGB", (40, 30), (200, 10, 10))], "cpu", torch.float32).ndim == 2
bad = [m for m in ("transformers", "torch._dynamo") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
