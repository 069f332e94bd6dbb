"""Whole-pipeline behaviour on the tiny random model: parity with diffusers' FluxPipeline and
DiffSynth-Studio's semantics."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.models.flux_dit import patchify
from diffsynth.schedulers.flow_match import flux_sigmas, shift_sigmas, SIGMA_MIN
from diffsynth.testing import TINY, bfl_to_diffusers_dit

quiet = dict(progress_bar_cmd=lambda x: x)
SMALL = dict(height=64, width=96, num_inference_steps=3, t5_sequence_length=16, seed=3, **quiet)


def diffusers_pipeline(root):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast
    d = TINY["dit"]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=d["depth"], num_single_layers=d["depth_single_blocks"],
        attention_head_dim=d["head_dim"], num_attention_heads=d["num_heads"], joint_attention_dim=d["context_dim"],
        pooled_projection_dim=d["pooled_dim"], guidance_embeds=True, axes_dims_rope=d["axes_dim"])
    transformer.load_state_dict(bfl_to_diffusers_dit(load_file(root / "flux1-dev.safetensors")), strict=True)
    v = TINY["vae"]
    vae_config = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4,
                      block_out_channels=[v["ch"] * m for m in v["ch_mult"]], layers_per_block=v["num_res_blocks"],
                      norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=0.3611, shift_factor=0.1159)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(root / "ae.safetensors"), vae_config), strict=True)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"), transformer=transformer)


@pytest.mark.parametrize("cfg", [1.0, 2.5], ids=["distilled-guidance", "true-cfg"])
def test_pipeline_matches_diffusers(tiny_root, tiny_pipe, cfg):
    ref = diffusers_pipeline(tiny_root)
    h, w, steps, seed = 64, 96, 4, 7
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
    expected = ref(prompt="a red cat on a sofa", negative_prompt="blurry dog", true_cfg_scale=cfg,
                   guidance_scale=3.5, height=h, width=w, num_inference_steps=steps,
                   sigmas=flux_sigmas(steps).numpy(), latents=patchify(noise), max_sequence_length=32,
                   output_type="np").images[0]
    ours = tiny_pipe(prompt="a red cat on a sofa", negative_prompt="blurry dog", cfg_scale=cfg,
                     embedded_guidance=3.5, height=h, width=w, num_inference_steps=steps, seed=seed,
                     t5_sequence_length=32, **quiet)
    expected = np.round(expected * 255).astype(np.int16)
    got = np.asarray(ours).astype(np.int16)
    assert got.shape == (h, w, 3)
    assert expected.std() > 5  # a real image, not a constant
    assert np.abs(got - expected).max() <= 2


def test_quick_start_runs_with_its_defaults(tiny_root, tmp_path, monkeypatch):
    """The README's Quick Start (model_id swapped for local paths, CPU for CUDA), checked for what its call
    leaves to defaults: 1024x1024, 30 steps of the shift-3 schedule, embedded guidance 3.5, 512 T5 tokens, no
    CFG, untiled decode. The DiT and the VAE decoder are stubbed (a 1024x1024 bf16 decode alone takes minutes
    on CPU); their numerics are compared with diffusers above at small sizes."""
    monkeypatch.chdir(tmp_path)
    from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.bfloat16,
        device="cpu",
        model_configs=[
            ModelConfig(path=str(tiny_root / "flux1-dev.safetensors")),
            ModelConfig(path=str(tiny_root / "text_encoder/model.safetensors")),
            ModelConfig(path=str(tiny_root / "text_encoder_2/")),
            ModelConfig(path=str(tiny_root / "ae.safetensors")),
        ],
    )
    steps, decoded = [], []

    def model_fn(dit, latents, timestep, prompt_emb, guidance, **kw):
        steps.append((tuple(latents.shape), timestep.item(), prompt_emb.shape[1], guidance.tolist()))
        return torch.zeros_like(latents)

    def decode(latents, tiled=False, **kw):
        decoded.append((tuple(latents.shape), tiled))
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)
    pipe.model_fn = model_fn
    monkeypatch.setattr(pipe.vae_decoder, "forward", decode)

    image = pipe(prompt="a cat", seed=0)
    image.save("image.jpg")
    assert Image.open("image.jpg").size == (1024, 1024)
    assert pipe.dit.dtype == torch.bfloat16
    schedule = flux_sigmas(30).to(torch.bfloat16).tolist()
    assert [s[1] for s in steps] == schedule
    assert {(s[0], s[2], tuple(s[3])) for s in steps} == {((1, 16, 128, 128), 512, (3.5,))}
    assert decoded == [((1, 16, 128, 128), False)]


def test_same_seed_same_image_and_different_seed_differs(tiny_pipe):
    a, b = tiny_pipe("a cat", **SMALL), tiny_pipe("a cat", **SMALL)
    c = tiny_pipe("a cat", **{**SMALL, "seed": 4})
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


class Recorder:
    """Stands in for model_fn: records its inputs and returns zero velocity."""

    def __init__(self):
        self.calls = []

    def __call__(self, dit, latents, timestep, **kw):
        self.calls.append((latents.clone(), timestep.clone(), kw))
        return torch.zeros_like(latents)


def test_noise_is_fp32_randn_from_rand_device_generator(tiny_pipe, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tiny_pipe, "model_fn", rec)
    tiny_pipe("a cat", rand_device="cpu", output_type="latent", **SMALL)
    expected = torch.randn((1, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(3), dtype=torch.float32)
    assert torch.equal(rec.calls[0][0], expected)
    assert len(rec.calls) == 3
    missing = "cuda" if not torch.cuda.is_available() else "meta"  # not silently replaced, and named
    with pytest.raises(ValueError, match=rf"rand_device='{missing}': this device is not available here; "
                                         r"use one of \['cpu'"):
        tiny_pipe("a cat", rand_device=missing, **SMALL)


def test_batch_image_i_uses_seed_plus_i(tiny_pipe):
    batch = tiny_pipe("a cat", num_images=2, output_type="latent", **SMALL)
    second = tiny_pipe("a cat", output_type="latent", **{**SMALL, "seed": 4})
    torch.testing.assert_close(batch[1:], second, rtol=1e-5, atol=1e-5)


def test_img2img_denoising_strength_semantics(tiny_pipe, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tiny_pipe, "model_fn", rec)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    strength = 0.6
    tiny_pipe("a cat", input_image=image, denoising_strength=strength, output_type="latent", **SMALL)
    sigma0 = shift_sigmas(torch.tensor(SIGMA_MIN + (1 - SIGMA_MIN) * strength, dtype=torch.float64), 3.0).item()
    assert len(rec.calls) == 3  # all N steps run, spread below the reduced start
    assert rec.calls[0][1].item() == pytest.approx(sigma0, rel=1e-6)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x0 = tiny_pipe.vae_encoder(x)
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(rec.calls[0][0], (1 - sigma0) * x0 + sigma0 * noise, rtol=1e-5, atol=1e-5)


def test_img2img_low_strength_stays_near_input_latents(tiny_pipe):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    x0 = tiny_pipe.vae_encoder(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    near = tiny_pipe("a cat", input_image=image, denoising_strength=0.05, output_type="latent", **SMALL)
    far = tiny_pipe("a cat", input_image=image, denoising_strength=1.0, output_type="latent", **SMALL)
    assert (near - x0).abs().mean() < 0.5 * (far - x0).abs().mean()


def test_tiled_decode_close_to_untiled(tiny_pipe):
    kw = dict(SMALL, height=256, width=256, output_type="pt")
    untiled = tiny_pipe("a cat", **kw)
    one_tile = tiny_pipe("a cat", tiled=True, tile_size=32, tile_stride=16, **kw)
    assert torch.equal(one_tile, untiled)  # the whole latent fits in one tile
    tiled = tiny_pipe("a cat", tiled=True, tile_size=24, tile_stride=16, **kw)
    err = (tiled - untiled).abs().mean().item()
    assert 0 < err < 0.05  # random-weight VAE: GroupNorm statistics differ per tile


def test_output_types_and_batch(tiny_pipe):
    images = tiny_pipe("a cat", num_images=2, **SMALL)
    assert isinstance(images, list) and len(images) == 2 and images[0].size == (96, 64)
    pt = tiny_pipe("a cat", output_type="pt", **SMALL)
    assert pt.shape == (1, 3, 64, 96) and 0 <= pt.min() and pt.max() <= 1
    assert tiny_pipe("a cat", output_type="latent", **SMALL).shape == (1, 16, 8, 12)


def test_size_not_multiple_of_16_rounds_up_with_warning(tiny_pipe):
    with pytest.warns(UserWarning, match="rounded up to 64x112"):
        image = tiny_pipe("a cat", **{**SMALL, "height": 60, "width": 100})
    assert image.size == (112, 64)


@pytest.mark.parametrize("kw, match", [
    (dict(height=0), "height must be a positive integer"),
    (dict(width=-16), "width must be a positive integer"),
    (dict(denoising_strength=0.5), "needs an input_image"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(tiled=True, tile_size=16, tile_stride=32), "tile_stride"),
])
def test_bad_generation_arguments(tiny_pipe, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe("a cat", **{**SMALL, **kw})


def test_sigma_shift_changes_schedule(tiny_pipe, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(tiny_pipe, "model_fn", rec)
    tiny_pipe("a cat", sigma_shift=1.0, output_type="latent", **SMALL)
    got = torch.stack([c[1][0] for c in rec.calls])
    torch.testing.assert_close(got, torch.linspace(1.0, SIGMA_MIN, 3), rtol=1e-6, atol=1e-7)


def test_cfg_uses_negative_prompt(tiny_pipe):
    """One Euler step is linear in the velocity: x1 = x0 + dσ * v. With true CFG, v = v_neg + s * (v_pos - v_neg),
    so the CFG latent is neg + s * (pos - neg) of the two single-prompt latents from the same noise."""
    one = dict(SMALL, num_inference_steps=1, output_type="latent")
    pos = tiny_pipe("a cat", **one)
    for negative in ("dog", "red house"):
        neg = tiny_pipe(negative, **one)
        cfg = tiny_pipe("a cat", cfg_scale=3.0, negative_prompt=negative, **one)
        torch.testing.assert_close(cfg, neg + 3.0 * (pos - neg), rtol=1e-4, atol=1e-4)
        assert (pos - neg).abs().max() > 1e-3  # the negative prompt is a different condition


@pytest.mark.parametrize("guidance, t5_length", [(1.0, 32), (3.5, 24)], ids=["guidance-1", "t5-24-tokens"])
def test_embedded_guidance_and_t5_length_match_diffusers(tiny_root, tiny_pipe, guidance, t5_length):
    """Both reach the DiT as diffusers' FluxPipeline passes them (guidance_scale, max_sequence_length): the
    final latents agree (an image comparison within 2/255 would not see the T5 length)."""
    ref = diffusers_pipeline(tiny_root)
    h, w, steps, seed = 64, 96, 4, 7
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
    args = dict(prompt="a red cat on a sofa", height=h, width=w, num_inference_steps=steps)
    expected = ref(**args, guidance_scale=guidance, sigmas=flux_sigmas(steps).numpy(), latents=patchify(noise),
                   max_sequence_length=t5_length, output_type="latent").images
    ours = tiny_pipe(**args, embedded_guidance=guidance, seed=seed, t5_sequence_length=t5_length,
                     output_type="latent", **quiet)
    torch.testing.assert_close(patchify(ours), expected, rtol=1e-4, atol=1e-4)
    default = tiny_pipe(**args, embedded_guidance=3.5, seed=seed, t5_sequence_length=32, output_type="latent", **quiet)
    assert (default - ours).abs().max() > 1e-3  # the argument changes the result


def test_progress_bar_cmd_is_used(tiny_pipe):
    seen = []
    tiny_pipe("a cat", **{**SMALL, "progress_bar_cmd": lambda it: seen.append(1) or it})
    assert seen == [1]
