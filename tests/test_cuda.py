"""The same behaviours on a CUDA device (skipped without one): parity, storage/streaming, caches, compile.

On a machine with a GPU: `python -m pytest -q tests/test_cuda.py` (about a minute with the tiny model).
"""
import pytest
import torch

from diffsynth import FluxImagePipeline
from diffsynth.loading.vram import is_cast

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KW = dict(height=64, width=96, num_inference_steps=3, t5_sequence_length=16, seed=3,
          progress_bar_cmd=lambda x: x, output_type="latent")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.fixture(scope="module")
def cpu_latents(tiny_configs):
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=tiny_configs())
    return pipe("a cat", **KW)


def test_dit_parity_with_diffusers_on_device():
    from test_dit import diffusers_model, inputs, ours_from
    from diffsynth.models.flux_dit import dit_from_diffusers
    ref = diffusers_model(True)
    ours = ours_from(dit_from_diffusers(ref.state_dict()), True).to(DEVICE)
    ref = ref.to(DEVICE)
    x = {k: v.to(DEVICE) for k, v in inputs(batch=2, h=6, w=10).items()}
    guid = torch.full((2,), 3.5, device=DEVICE)
    with torch.no_grad():
        expected = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                       timestep=x["timestep"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=guid,
                       return_dict=False)[0]
        got = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timestep"], x["pooled"], guid)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.05)])
def test_pipeline_on_device_matches_cpu(tiny_configs, cpu_latents, dtype, tol):
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=DEVICE, model_configs=tiny_configs())
    assert pipe.dit.x_embedder.weight.device.type == "cuda"
    assert rel(pipe("a cat", **KW), cpu_latents) < tol
    image = pipe("a cat", **dict(KW, output_type="pt"))
    assert image.device.type == "cuda" and torch.isfinite(image).all()


def test_fp8_storage_streamed_from_cpu(tiny_configs, cpu_latents):
    """fp8 weights kept in CPU RAM, nothing resident (vram_limit=0): layers stream to the GPU per call."""
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device=DEVICE, model_configs=tiny_configs(
        offload_device="cpu", offload_dtype=torch.float8_e4m3fn))
    pipe.enable_vram_management(vram_limit=0)
    layer = pipe.dit.blocks[0].attn.a_to_qkv
    assert is_cast(pipe.dit) and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float8_e4m3fn
    out = pipe("a cat", **KW)
    assert out.device.type == "cuda" and rel(out, cpu_latents) < 0.1
    assert layer.weight.device.type == "cpu"  # streamed for the call, not moved
    assert layer.weight.is_pinned()  # page-locked: DMA copies
    pipe.enable_vram_management(vram_limit=0, pin_memory=False)  # (already pinned weights stay so)
    assert rel(pipe("a cat", **KW), out) < 1e-3


def test_pin_memory_false_leaves_weights_pageable(tiny_configs):
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device=DEVICE, model_configs=tiny_configs(
        offload_device="cpu"))
    pipe.enable_vram_management(vram_limit=0, pin_memory=False)
    assert not any(p.is_pinned() for p in pipe.dit.parameters())


def test_caches_skip_steps_on_device(tiny_configs):
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device=DEVICE, model_configs=tiny_configs())
    kw = dict(KW, num_inference_steps=8, cfg_scale=2.0)
    base = pipe("a cat", **kw)
    assert torch.equal(pipe("a cat", tea_cache_l1_thresh=0.0, **kw), base)
    pipe("a cat", tea_cache_l1_thresh=10.0, **kw)
    stats = pipe.last_cache_stats["branches"]
    assert stats["posi"]["skipped"] > 0 and stats["nega"]["skipped"] > 0


def test_vae_attention_uses_a_fused_kernel_on_device():
    from diffsynth.models.flux_vae import AttnBlock
    block = AttnBlock(64, 8).to(DEVICE, torch.bfloat16).eval()
    x = torch.randn(1, 64, 32, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), torch.profiler.profile() as prof:
        block(x)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in kernels


def test_regional_compile_matches_eager_on_device(tiny_configs):
    import torch._dynamo
    torch._dynamo.reset()
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device=DEVICE, model_configs=tiny_configs())
    eager = pipe("a cat", **KW)
    pipe.compile()
    assert rel(pipe("a cat", **KW), eager) < 0.02


# FLUX.2 [klein] on the device: the tiny random folder of tests/test_flux2_pipeline.py
F2 = dict(height=48, width=64, num_inference_steps=3, seed=7, progress_bar_cmd=lambda x: x, output_type="pt")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    return build_tiny_flux2(tmp_path_factory.mktemp("klein") / "FLUX.2-klein-4B")


def klein_pipe(root, device, dtype, **kw):
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig
    return Flux2ImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=[
        ModelConfig(path=str(root / "text_encoder"), **kw), ModelConfig(path=str(root / "transformer"), **kw),
        ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors"), **kw)])


def reference_image():
    g = torch.Generator().manual_seed(3)
    from PIL import Image
    return Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def klein_cpu(klein):
    """Ours on the CPU, fp32, noise drawn on the CPU: text-to-image and editing with one reference image."""
    pipe = klein_pipe(klein, "cpu", torch.float32)
    return {edit: pipe("a red cat", edit_image=[reference_image()] if edit else None, edit_image_auto_resize=False,
                       **F2) for edit in (False, True)}


@pytest.mark.parametrize("edit", [False, True])
def test_flux2_matches_diffusers_on_device(klein, edit):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.Flux2KleinPipeline.from_pretrained(str(klein), dtype=torch.float32).to(DEVICE)
    noise = torch.randn(1, 128, 3, 4, generator=torch.Generator("cpu").manual_seed(7))
    refs = [reference_image()] if edit else None
    expected = ref(prompt="a red cat", image=refs, height=48, width=64, num_inference_steps=3, guidance_scale=1.0,
                   latents=noise.to(DEVICE), output_type="pt").images
    got = klein_pipe(klein, DEVICE, torch.float32)("a red cat", edit_image=refs, edit_image_auto_resize=False, **F2)
    assert got.device.type == "cuda"
    assert (got.float().cpu() - expected.float().cpu()).abs().max() <= 2 / 255


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2 / 255), (torch.bfloat16, 0.1)])
def test_flux2_on_device_matches_cpu(klein, klein_cpu, dtype, tol):
    pipe = klein_pipe(klein, DEVICE, dtype)
    for edit, expected in klein_cpu.items():
        got = pipe("a red cat", edit_image=[reference_image()] if edit else None, edit_image_auto_resize=False, **F2)
        assert got.device.type == "cuda" and (got.float().cpu() - expected).abs().max() <= tol, (dtype, edit)


def test_flux2_fp8_storage_streamed_from_cpu(klein, klein_cpu):
    pipe = klein_pipe(klein, DEVICE, torch.bfloat16, offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
    pipe.enable_vram_management(vram_limit=0)
    weights = [p for p in pipe.dit.parameters() if p.ndim == 2]
    assert is_cast(pipe.dit) and all(p.device.type == "cpu" and p.dtype == torch.float8_e4m3fn for p in weights)
    got = pipe("a red cat", **F2)
    assert got.device.type == "cuda" and (got.float().cpu() - klein_cpu[False]).abs().mean() < 0.05
    assert all(p.device.type == "cpu" for p in weights)  # streamed for the call, not moved


def test_flux2_regional_compile_matches_eager_on_device(klein):
    import torch._dynamo
    torch._dynamo.reset()
    pipe = klein_pipe(klein, DEVICE, torch.bfloat16)
    eager = pipe("a red cat", **F2)
    pipe.compile()
    assert (pipe("a red cat", **F2) - eager).abs().max() < 0.05
