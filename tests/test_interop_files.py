"""Files written by the library versions we depend on load through our registry and compute the same.

Each case builds a tiny model with the installed transformers, saves it with `save_pretrained` (the
layout that version writes), loads the folder with `detect` + `build` and compares outputs. A new
family (SigLIP, Qwen2.5-VL) is one more entry in SAVED_BY_TRANSFORMERS once its loader exists.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffsynth.loading.registry import build, detect


def _clip() -> torch.nn.Module:
    # heads = hidden / 8 and the default quick_gelu: what our config inference assumes without config.json
    return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=97, eos_token_id=98))


def _t5() -> torch.nn.Module:
    return T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu"))


# family -> (tiny model builder, pipeline attribute the loaded model fills)
SAVED_BY_TRANSFORMERS: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "clip": (_clip, "text_encoder_1"),
    "t5": (_t5, "text_encoder_2"),
}


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def save_load_compare(family: str, folder, keep_config: bool = True) -> list[str]:
    """Save a tiny `family` model with the installed transformers, load it with our registry, compare
    hidden states; returns the saved key names (so a test can say which layout it covered)."""
    make, attribute = SAVED_BY_TRANSFORMERS[family]
    torch.manual_seed(0)
    reference = make().eval()
    reference.save_pretrained(folder)
    if not keep_config:
        (folder / "config.json").unlink()
    (det,) = detect(str(folder))
    assert det.family == family
    ours = build(det, torch.float32)[attribute]
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_hidden(ours, ids), _hidden(reference, ids), rtol=1e-5, atol=1e-5)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family", sorted(SAVED_BY_TRANSFORMERS))
def test_file_saved_by_installed_transformers_loads_and_matches(family, tmp_path):
    save_load_compare(family, tmp_path)


def test_clip_without_text_model_level_and_without_config(tmp_path):
    """transformers 5 writes CLIP keys without `text_model.`; the architecture is then read from shapes."""
    keys = save_load_compare("clip", tmp_path, keep_config=False)
    assert "embeddings.position_embedding.weight" in keys and not any(k.startswith("text_model.") for k in keys)


def test_clip_with_text_model_level_still_loads(tmp_path):
    """The transformers 4 layout (`text_model.*`, what FLUX.1-dev's text_encoder/ holds) keeps loading."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    reference = _clip().eval()
    save_file({"text_model." + k: v.contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (det,) = detect(str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_hidden(build(det, torch.float32)["text_encoder_1"], ids), _hidden(reference, ids),
                               rtol=1e-5, atol=1e-5)
