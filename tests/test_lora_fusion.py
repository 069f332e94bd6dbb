"""LoRA-Fusion: the patcher's learned blend of hot-loaded LoRAs, against the formula written out."""
import pytest
import torch
import torch.nn.functional as F

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import detect
from diffsynth.ops.files import load_state_dict, save_safetensors
from diffsynth.testing.tiny_adapters import tiny_lora_encoder_layers, write_tiny_lora_patcher

KW = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, t5_sequence_length=16, seed=0,
          output_type="latent", progress_bar_cmd=lambda x: x)
LAYER = "blocks.0.attn.a_to_qkv"


def _lora(path, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, i, o in tiny_lora_encoder_layers()[:6]:
        sd[f"{name}.lora_A.weight"] = torch.randn(2, i, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(o, 2, generator=g) * 0.3
    save_safetensors(sd, path)
    return sd


@pytest.fixture(scope="module")
def setup(tiny_configs, tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion")
    patcher = write_tiny_lora_patcher(d / "model.safetensors")
    loras = [_lora(d / "a.safetensors", 1), _lora(d / "b.safetensors", 2)]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=tiny_configs() + [ModelConfig(path=str(patcher))])
    return pipe, patcher, loras, [d / "a.safetensors", d / "b.safetensors"]


def test_detected(setup):
    assert detect(str(setup[1]))[0].family == "flux-lora-patcher"


def test_blend_matches_the_formula_and_clears(setup):
    pipe, patcher, loras, paths = setup
    layer = pipe.dit.get_submodule(LAYER)
    x = torch.randn(3, layer.in_features)
    base = layer(x)
    pipe.enable_lora_magic()
    for p in paths:
        pipe.load_lora(pipe.dit, str(p), hotload=True)
    got = layer(x)
    p = load_state_dict(str(patcher))
    m = f"model_dict.{LAYER.replace('.', '___')}."
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], p[m + n + ".weight"], p[m + n + ".bias"])  # noqa: E731
    expected = base.clone()
    for sd in loras:
        out = x @ sd[f"{LAYER}.lora_A.weight"].T @ sd[f"{LAYER}.lora_B.weight"].T
        gate = torch.sigmoid(ln(base, "norm_base") * p[m + "weight_base"] + ln(out, "norm_lora") * p[m + "weight_lora"]
                             + ln(base, "norm_base") * ln(out, "norm_lora") * p[m + "weight_cross"] + p[m + "bias"])
        expected = expected + p[m + "weight_out"] * gate * out
    assert torch.allclose(got, expected, atol=1e-5)
    plain_sum = base + sum(x @ sd[f"{LAYER}.lora_A.weight"].T @ sd[f"{LAYER}.lora_B.weight"].T for sd in loras)
    assert (got - plain_sum).abs().max() > 1e-3
    fused = pipe(**KW)
    pipe.clear_lora()
    assert torch.allclose(layer(x), base) and (pipe(**KW) - fused).abs().max() > 1e-5
    assert "model_dict" not in str(list(pipe.dit.state_dict())[:3])  # mergers are not DiT weights
