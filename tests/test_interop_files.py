"""Files written by the library versions we depend on load through our registry and compute the same.

Each case builds a tiny random model with the installed library, saves it with `save_pretrained` (the
layout that version writes), loads the folder with `detect` + `build` and compares outputs on the same
inputs. A new family (SigLIP, Qwen2.5-VL) is one more entry in SAVED once its loader exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffsynth.loading.registry import build, detect
from diffsynth.models.flux_dit import image_ids

Inputs = dict[str, torch.Tensor]


@dataclass
class Saved:
    family: str                                    # what our registry must call it
    attribute: str                                 # the pipeline attribute the loaded model fills
    make: Callable[[], nn.Module]                  # a tiny model of the installed library
    inputs: Callable[[], Inputs]
    run_reference: Callable[[nn.Module, Inputs], torch.Tensor]
    run_ours: Callable[[nn.Module, Inputs], torch.Tensor]


def _ids() -> Inputs:
    return {"ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))}


def _hidden(model: nn.Module, x: Inputs) -> torch.Tensor:
    return model(input_ids=x["ids"]).last_hidden_state


def _our_hidden(model: nn.Module, x: Inputs) -> torch.Tensor:
    return model(x["ids"])


def _clip() -> nn.Module:
    # heads = hidden / 8 and the default quick_gelu: what our config inference assumes without config.json
    return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=97, eos_token_id=98))


def _t5() -> nn.Module:
    return T5EncoderModel(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu"))


def _diffusers_dit() -> nn.Module:
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # diffusers zero-initialises some layers: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _dit_inputs() -> Inputs:
    g = torch.Generator().manual_seed(1)
    return dict(img=torch.randn(1, 12, 64, generator=g), txt=torch.randn(1, 5, 24, generator=g),
                pooled=torch.randn(1, 20, generator=g), t=torch.rand(1, generator=g),
                img_ids=image_ids(6, 8, 1), txt_ids=torch.zeros(1, 5, 3), guidance=torch.full((1,), 3.5))


def _run_diffusers_dit(model: nn.Module, x: Inputs) -> torch.Tensor:
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                 timestep=x["t"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


def _run_our_dit(model: nn.Module, x: Inputs) -> torch.Tensor:
    return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["pooled"], x["guidance"])


VAE_SCALE, VAE_SHIFT = 0.3611, 0.1159


def _diffusers_vae() -> nn.Module:
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                         norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)


def _latents() -> Inputs:
    return {"z": torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(1))}


SAVED: dict[str, Saved] = {s.family: s for s in (
    Saved("clip", "text_encoder_1", _clip, _ids, _hidden, _our_hidden),
    Saved("t5", "text_encoder_2", _t5, _ids, _hidden, _our_hidden),
    Saved("flux-dit", "dit", _diffusers_dit, _dit_inputs, _run_diffusers_dit, _run_our_dit),
    # our decoder takes scaled latents (it undoes FLUX's scale and shift itself)
    Saved("flux-vae", "vae_decoder", _diffusers_vae, _latents,
          lambda m, x: m.decode(x["z"] / VAE_SCALE + VAE_SHIFT).sample, lambda m, x: m(x["z"])),
)}


def save_load_compare(family: str, folder, keep_config: bool = True) -> list[str]:
    """Save a tiny `family` model with the installed library, load the folder with our registry and compare
    outputs; returns the key names written (so a test can say which layout it covered)."""
    case = SAVED[family]
    torch.manual_seed(0)
    reference = case.make().eval()
    reference.save_pretrained(folder)
    if not keep_config:
        (folder / "config.json").unlink()
    (det,) = detect(str(folder))
    assert det.family == family
    ours = build(det, torch.float32)[case.attribute]
    x = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(case.run_ours(ours, x), case.run_reference(reference, x), rtol=1e-5, atol=1e-5)
    (weights,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    with safe_open(str(weights), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("family", sorted(SAVED))
def test_file_saved_by_installed_library_loads_and_matches(family, tmp_path):
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
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_our_hidden(build(det, torch.float32)["text_encoder_1"], x), _hidden(reference, x),
                                   rtol=1e-5, atol=1e-5)
