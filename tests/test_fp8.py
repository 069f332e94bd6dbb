"""fp8 storage with higher-precision compute: fp8 files, ComfyUI "scaled fp8" files, and offload_dtype=fp8."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.ops.quant import add_to_weight, effective_weight
from diffsynth.loading.registry import build, describe, detect

OTHERS = ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
KW = dict(height=64, width=96, num_inference_steps=3, t5_sequence_length=16, seed=3,
          progress_bar_cmd=lambda x: x, output_type="latent")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pipe_with_dit(tiny_root, dit_path, **dit_kw):
    configs = [ModelConfig(path=str(dit_path), **dit_kw)] + [ModelConfig(path=str(tiny_root / p)) for p in OTHERS]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)


def scaled_fp8(sd: dict, prefix: str = "model.diffusion_model.") -> dict:
    """ComfyUI-style scaled fp8: matrices as e4m3fn with a per-tensor `.scale_weight`, a `scaled_fp8` marker."""
    out = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.ndim == 2:
            scale = v.abs().max().float() / 448
            out[prefix + k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[prefix + k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[prefix + k] = v
    return out


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    return tiny_pipe("a cat", **KW)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_storage_fp32_compute_close_to_unquantized(tiny_root, reference, dtype):
    pipe = pipe_with_dit(tiny_root, tiny_root / "flux1-dev.safetensors", offload_dtype=dtype)
    qkv = pipe.dit.blocks[0].attn.a_to_qkv
    assert qkv.weight.dtype == dtype and qkv.bias.dtype == torch.float32  # 1-D tensors keep compute precision
    out = pipe("a cat", **KW)
    assert qkv.weight.dtype == dtype  # computing did not change the storage
    assert 0 < rel(out, reference) < (0.05 if dtype == torch.float8_e4m3fn else 0.1)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_files_load(tiny_root, tmp_path, reference, dtype):
    sd = {k: v.to(dtype) if v.ndim == 2 else v for k, v in load_file(tiny_root / "flux1-dev.safetensors").items()}
    path = tmp_path / f"flux1-dev-{dtype}.safetensors"
    save_file(sd, path)
    (det,) = detect(str(path))
    assert det.family == "flux-dit" and str(dtype).replace("torch.", "") in describe(det)["dtypes"]
    fp32 = pipe_with_dit(tiny_root, path)  # upcast once at load
    kept = pipe_with_dit(tiny_root, path, offload_dtype=dtype)  # stays fp8, upcast per layer
    assert fp32.dit.blocks[0].attn.a_to_qkv.weight.dtype == torch.float32
    assert kept.dit.blocks[0].attn.a_to_qkv.weight.dtype == dtype
    a, b = fp32("a cat", **KW), kept("a cat", **KW)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert rel(a, reference) < 0.1


def test_scaled_fp8_file(tiny_root, tmp_path, reference):
    path = tmp_path / "flux1-dev-fp8-scaled.safetensors"
    save_file(scaled_fp8(load_file(tiny_root / "flux1-dev.safetensors")), path)
    (det,) = detect(str(path))
    assert describe(det)["architecture"]["hidden_size"] == 32
    unfolded = build(det, torch.float32, "cpu")["dit"]  # scales folded in at load
    assert getattr(unfolded.blocks[0].attn.a_to_qkv, "scale_weight", None) is None
    kept = pipe_with_dit(tiny_root, path, offload_dtype=torch.float8_e4m3fn)
    qkv = kept.dit.blocks[0].attn.a_to_qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.scale_weight.numel() == 1
    torch.testing.assert_close(effective_weight(qkv), unfolded.blocks[0].attn.a_to_qkv.weight)
    assert 0 < rel(kept("a cat", **KW), reference) < 0.05
    folded = pipe_with_dit(tiny_root, path)  # fp32 storage: the scales are folded into the weights at load
    assert 0 < rel(folded("a cat", **KW), reference) < 0.05


def test_merging_into_fp8_and_scaled_weights():
    layer = torch.nn.Linear(64, 32)
    delta = torch.randn(32, 64) * 0.01
    expected = layer.weight.detach() + delta
    plain = torch.nn.Linear(64, 32)
    plain.weight.data = layer.weight.detach().to(torch.float8_e4m3fn)
    add_to_weight(plain, delta)
    assert plain.weight.dtype == torch.float8_e4m3fn
    assert rel(effective_weight(plain), expected) < 0.05
    from diffsynth.ops.quant import install_weight_scale
    scaled = torch.nn.Linear(64, 32)
    scale = layer.weight.detach().abs().max() / 448
    scaled.weight.data = (layer.weight.detach() / scale).to(torch.float8_e4m3fn)
    install_weight_scale(scaled, scale)
    add_to_weight(scaled, delta)
    assert rel(effective_weight(scaled), expected) < 0.05


def test_fp8_storage_of_text_encoders_keeps_norms_precise(tiny_root, reference):
    configs = [ModelConfig(path=str(tiny_root / p), offload_dtype=torch.float8_e4m3fn)
               for p in ("flux1-dev.safetensors",) + OTHERS]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    t5 = pipe.text_encoder_2
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert t5.encoder.final_layer_norm.weight.dtype == torch.float32
    clip = pipe.text_encoder_1
    assert getattr(clip, "text_model", clip).final_layer_norm.weight.dtype == torch.float32
    assert 0 < rel(pipe("a cat", **KW), reference) < 0.1
