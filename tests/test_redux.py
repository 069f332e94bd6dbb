"""FLUX.1-Redux on tiny random models: SigLIP + Redux embedder loading (every layout), parity with diffusers'
FluxPriorReduxPipeline + FluxPipeline, and what the tokens do to the prompt embedding."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.models.flux_dit import patchify
from diffsynth.schedulers.flow_match import flux_sigmas
from diffsynth.testing.tiny_image import TINY_SIGLIP, build_tiny_redux, record_dit_calls

MODEL_FILES = ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
quiet = dict(progress_bar_cmd=lambda x: x)
H, W = 64, 64


@pytest.fixture(scope="module")
def redux_root(tmp_path_factory):
    return build_tiny_redux(tmp_path_factory.mktemp("redux") / "FLUX.1-Redux-dev")


def make_pipe(tiny_root, *extra):
    configs = [ModelConfig(path=str(tiny_root / f)) for f in MODEL_FILES] + [ModelConfig(path=str(p)) for p in extra]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)


@pytest.fixture(scope="module")
def pipe(tiny_root, redux_root):
    return make_pipe(tiny_root, redux_root / "image_encoder", redux_root / "flux1-redux-dev.safetensors")


def picture(size=28, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_redux_matches_diffusers_prior_plus_flux(tiny_root, redux_root, pipe):
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionModel
    from test_pipeline import diffusers_pipeline
    flux = diffusers_pipeline(tiny_root)
    prior = FluxPriorReduxPipeline(
        image_encoder=SiglipVisionModel.from_pretrained(redux_root / "image_encoder"),
        feature_extractor=SiglipImageProcessor(size={"height": 28, "width": 28}),
        image_embedder=ReduxImageEncoder.from_pretrained(redux_root / "image_embedder"),
        text_encoder=flux.text_encoder, tokenizer=flux.tokenizer, text_encoder_2=flux.text_encoder_2,
        tokenizer_2=flux.tokenizer_2)
    image, steps, seed = picture(), 3, 2
    embeds = prior(image=image, prompt="a cat")
    noise = torch.randn((1, 16, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(seed))
    expected = flux(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                    guidance_scale=2.5, height=H, width=W, num_inference_steps=steps, sigmas=flux_sigmas(steps).numpy(),
                    latents=patchify(noise), output_type="np").images[0]
    got = pipe(prompt="a cat", flux_redux_image=image, embedded_guidance=2.5, height=H, width=W,
               num_inference_steps=steps, seed=seed, t5_sequence_length=512, **quiet)
    expected = np.round(expected * 255).astype(np.int16)
    assert expected.std() > 5
    worst = np.abs(np.asarray(got).astype(np.int16) - expected).max()
    print(f"max |pixel diff| vs diffusers: {worst}/255")
    assert worst <= 2


def test_redux_tokens_go_to_the_positive_prompt_only(pipe, monkeypatch):
    seen = record_dit_calls(monkeypatch)
    kw = dict(height=H, width=W, num_inference_steps=1, seed=0, t5_sequence_length=16, output_type="latent", **quiet)
    pipe("a cat", flux_redux_image=[picture(), picture(seed=1)], cfg_scale=2.0, negative_prompt="blurry", **kw)
    posi, nega = seen  # the two branches differ in length: two DiT calls
    patches = (TINY_SIGLIP["image_size"] // TINY_SIGLIP["patch_size"]) ** 2
    assert posi.prompt_emb.shape[1] == 16 + 2 * patches and nega.prompt_emb.shape[1] == 16
    assert torch.equal(posi.text_ids, torch.zeros_like(posi.text_ids))
    seen.clear()
    pipe(flux_redux_image=picture(), **kw)  # the prompt may be left out, as in the seed system's example
    assert seen[0].prompt_emb.shape[1] == 16 + patches


@pytest.mark.parametrize("layout", ["vision_model-single-file", "whole-siglip-model", "fp8"])
def test_siglip_layouts_load_the_same_encoder(tiny_root, redux_root, pipe, tmp_path, layout):
    sd = load_file(redux_root / "image_encoder/model.safetensors")
    if layout == "vision_model-single-file":  # older transformers' layout, no config.json: read from shapes
        sd = {f"vision_model.{k}": v for k, v in sd.items()}
    elif layout == "whole-siglip-model":  # SiglipModel: the text tower is dropped
        sd = {**{f"vision_model.{k}": v for k, v in sd.items()}, "text_model.embeddings.token_embedding.weight":
              torch.zeros(10, 32), "logit_scale": torch.zeros(1)}
    else:
        sd = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(sd, tmp_path / "siglip.safetensors")
    other = make_pipe(tiny_root, tmp_path / "siglip.safetensors", redux_root / "image_embedder")
    x = torch.randn(1, 3, 28, 28)
    atol = 0.5 if layout == "fp8" else 1e-5
    torch.testing.assert_close(other.image_encoder.model(pixel_values=x).last_hidden_state,
                               pipe.image_encoder.model(pixel_values=x).last_hidden_state, rtol=0, atol=atol)


def test_redux_without_its_models_is_a_clear_error(tiny_pipe):
    with pytest.raises(RuntimeError, match="flux_redux_image needs the SigLIP image encoder"):
        tiny_pipe("a", flux_redux_image=picture(), height=H, width=W, num_inference_steps=1, **quiet)


def test_redux_example_runs(tiny_root, redux_root, tmp_path, monkeypatch):
    from example_harness import run_example
    (tmp_path / "FLUX.1-Redux-dev").mkdir()
    picture(48).save(tmp_path / "FLUX.1-Redux-dev/robot.png")
    run_example("model_inference/FLUX.1-Redux-dev.py", tmp_path, monkeypatch,
                {"black-forest-labs/FLUX.1-dev": tiny_root, "black-forest-labs/FLUX.1-Redux-dev": redux_root})
    names = {p.name for p in tmp_path.glob("*.jpg")}
    assert names == {"image_FLUX.1-Redux-dev.jpg", "image_FLUX.1-Redux-dev_prompt.jpg"}


def managed_pipe(tiny_root, redux_root, encoder_dtype, redux_dtype):
    """Image encoder and Redux stored on the CPU in the given dtypes, streamed per layer (vram_limit=0)."""
    configs = [ModelConfig(path=str(tiny_root / f)) for f in MODEL_FILES] + [
        ModelConfig(path=str(redux_root / "image_encoder"), offload_device="cpu", offload_dtype=encoder_dtype),
        ModelConfig(path=str(redux_root / "flux1-redux-dev.safetensors"), offload_device="cpu",
                    offload_dtype=redux_dtype)]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    plans = pipe.vram_plan(8)
    assert any("image_encoder" in group and "redux" in group for group in plans)
    pipe.enable_vram_management(vram_limit=0)
    assert {"image_encoder", "redux"} <= set(pipe.vram_models)
    return pipe


def through_fp8(reference, stored_model, model: str) -> None:
    """The oracle's weights: those `stored_model` keeps in fp8, rounded to fp8 once, computed in fp32."""
    stored = dict(stored_model.named_parameters())
    with torch.no_grad():
        for name, p in getattr(reference, model).named_parameters():
            if stored[name].dtype == torch.float8_e4m3fn:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    assert any(p.dtype == torch.float8_e4m3fn for p in stored.values())


REDUX_KW = dict(height=H, width=W, num_inference_steps=1, t5_sequence_length=16, seed=0, output_type="latent", **quiet)


def test_vram_management_plans_redux_models(tiny_root, redux_root, pipe):
    managed = managed_pipe(tiny_root, redux_root, torch.float32, torch.float8_e4m3fn)
    out = managed(flux_redux_image=picture(), **REDUX_KW)
    reference = make_pipe(tiny_root, redux_root / "image_encoder", redux_root / "flux1-redux-dev.safetensors")
    through_fp8(reference, managed.redux, "redux")
    torch.testing.assert_close(out, reference(flux_redux_image=picture(), **REDUX_KW), rtol=1e-5, atol=1e-5)
    assert (out - pipe(flux_redux_image=picture(), **REDUX_KW)).abs().max() > 0  # the rounding is visible


def test_fp8_stored_image_encoder_sees_full_precision_pixels(tiny_root, redux_root):
    """The SigLIP embeddings cast pixel_values to the patch kernel's dtype (as transformers' do): fp8 storage keeps
    convolution kernels in the compute dtype, so the image is not rounded to fp8 (the matrices still are)."""
    managed = managed_pipe(tiny_root, redux_root, torch.float8_e4m3fn, torch.float32)
    out = managed(flux_redux_image=picture(), **REDUX_KW)
    reference = make_pipe(tiny_root, redux_root / "image_encoder", redux_root / "flux1-redux-dev.safetensors")
    through_fp8(reference, managed.image_encoder, "image_encoder")
    torch.testing.assert_close(out, reference(flux_redux_image=picture(), **REDUX_KW), rtol=1e-5, atol=1e-5)
