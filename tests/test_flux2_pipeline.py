"""Flux2ImagePipeline: parity with diffusers' Flux2KleinPipeline on tiny random FLUX.2 [klein] folders (fp32,
<= 2/255 per pixel): distilled text-to-image, klein-base with true CFG, editing with one and two reference
images, image-to-image; the schedule; argument errors; FLUX.1/FLUX.2 files kept in their own pipeline."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import Flux2ImagePipeline as TopLevel
from diffsynth.ops.files import CheckpointError
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig, auto_resize
from diffsynth.schedulers.flow_match import flux2_empirical_mu, flux2_sigmas
from diffsynth.testing.tiny_flux2 import build_tiny_flux2

TOLERANCE = 2 / 255
SIZE = (48, 64)  # height, width: 3 x 4 latent tokens


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("klein") / "FLUX.2-klein-4B")


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("klein_base") / "FLUX.2-klein-base-4B", seed=1, distilled=False)


@pytest.fixture(scope="module")
def klein_pipe(klein):
    return ours(klein)


def configs(root) -> list[ModelConfig]:
    return [ModelConfig(path=str(root / "text_encoder")), ModelConfig(path=str(root / "transformer")),
            ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors"))]


def ours(root) -> Flux2ImagePipeline:
    return Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs(root))


def reference(root):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.Flux2KleinPipeline.from_pretrained(str(root), dtype=torch.float32)


def noise(seed: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 128, height // 16, width // 16, generator=torch.Generator("cpu").manual_seed(seed))


def pictures(seed: int, *sizes: tuple[int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def compare(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    inside = ((expected > 0.02) & (expected < 0.98)).float().mean().item()
    assert inside > 0.5 and expected.std() > 0.02, "a saturated or flat image would make the comparison vacuous"
    err = (got - expected).abs().max().item()
    assert err <= TOLERANCE, f"max pixel difference {err * 255:.2f}/255"
    return err


@torch.no_grad()
@pytest.mark.parametrize("edits", [0, 1, 2])
def test_distilled_matches_diffusers(klein, edits, one_thread):
    """Text-to-image, and editing with one and with two reference images of different sizes."""
    h, w = SIZE
    refs = pictures(3, (64, 96), (96, 64))[:edits] or None
    got = ours(klein)("a red cat", edit_image=refs, edit_image_auto_resize=False, height=h, width=w, seed=7,
                      num_inference_steps=3, output_type="pt")
    expected = reference(klein)(prompt="a red cat", image=refs, height=h, width=w, num_inference_steps=3,
                                guidance_scale=1.0, latents=noise(7, h, w), output_type="pt").images
    print(f"klein, {edits} reference image(s): max diff {compare(got, expected) * 255:.3f}/255")


@torch.no_grad()
def test_base_model_true_cfg_matches_diffusers(klein_base, one_thread):
    h, w = SIZE
    pipe = ours(klein_base)
    got = pipe("a blue house", negative_prompt="", cfg_scale=4.0, height=h, width=w, seed=3, num_inference_steps=3,
               output_type="pt")
    expected = reference(klein_base)(prompt="a blue house", guidance_scale=4.0, height=h, width=w,
                                     num_inference_steps=3, latents=noise(3, h, w), output_type="pt").images
    print(f"klein-base CFG 4: max diff {compare(got, expected) * 255:.3f}/255")
    unbatched = pipe("a blue house", cfg_scale=4.0, height=h, width=w, seed=3, num_inference_steps=3,
                     output_type="pt", batch_cfg=False)
    assert (unbatched - got).abs().max() < 1e-5


@torch.no_grad()
def test_img2img_matches_diffusers_from_the_same_noised_latents(klein, one_thread):
    """diffusers' klein pipeline has no img2img: it gets the input image encoded by its own VAE, noised to the
    first sigma of the shortened schedule, and that schedule."""
    h, w = SIZE
    steps, strength = 4, 0.6
    (image,) = pictures(5, (h, w))
    got = ours(klein)("a green tree", input_image=image, denoising_strength=strength, seed=2,
                      num_inference_steps=steps, output_type="pt")
    ref = reference(klein)
    pixels = ref.image_processor.preprocess(image, height=h, width=w)
    x0 = ref._encode_vae_image(pixels, generator=None)
    low = 1 / steps
    unshifted = np.linspace(low + (1 - low) * strength, low, steps).tolist()
    ref.scheduler.set_timesteps(sigmas=unshifted, mu=flux2_empirical_mu(h // 16 * w // 16, steps))
    s0 = ref.scheduler.sigmas[0].item()
    start = (1 - s0) * x0 + s0 * noise(2, h, w)
    expected = ref(prompt="a green tree", height=h, width=w, num_inference_steps=steps, sigmas=unshifted,
                   latents=start, guidance_scale=1.0, output_type="pt").images
    print(f"klein img2img: max diff {compare(got, expected) * 255:.3f}/255")


def test_schedule_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    for steps, tokens in ((4, 4096), (50, 1024), (28, 9000), (1, 16)):
        assert flux2_empirical_mu(tokens, steps) == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-9)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(),
                                mu=compute_empirical_mu(tokens, steps))
        assert torch.allclose(flux2_sigmas(steps, tokens), scheduler.sigmas[:-1], atol=1e-6)
    sigmas = flux2_sigmas(10, 4096, denoising_strength=0.5)
    shift = math.exp(flux2_empirical_mu(4096, 10))
    start = 0.1 + 0.9 * 0.5
    assert sigmas[0].item() == pytest.approx(shift / (shift + 1 / start - 1), rel=1e-6)
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_noise_is_drawn_as_diffsynth_studio_draws_it(klein_pipe, one_thread):
    from diffsynth.pipelines.units import run_units
    latents = klein_pipe("a cat", height=32, width=64, seed=11, num_inference_steps=1, output_type="latent")
    assert latents.shape == (1, 128, 2, 4)
    shared = {"height": 32, "width": 64, "seed": 11, "num_images": 2}
    run_units(klein_pipe, [u for u in klein_pipe.units if u.name in ("check_shape", "init_noise")], shared, {}, {},
              False)
    assert torch.equal(shared["noise"][0:1], noise(11, 32, 64)) and torch.equal(shared["noise"][1:], noise(12, 32, 64))


def test_editing_keeps_the_default_size_as_diffsynth_studio(klein_pipe, one_thread):
    """An edit image does not set the output size (2.0 and diffusers default to 1024 x 1024); an input image does."""
    small = Image.new("RGB", (48, 32), (200, 30, 30))
    out = klein_pipe("red", edit_image=[small], edit_image_auto_resize=False, seed=0, num_inference_steps=1,
                     output_type="latent")
    assert out.shape == (1, 128, 64, 64)
    out = klein_pipe("red", input_image=small, denoising_strength=0.5, seed=0, num_inference_steps=1,
                     output_type="latent")
    assert out.shape == (1, 128, 2, 3)


def test_auto_resize_targets_a_megapixel_in_multiples_of_32():
    image = Image.new("RGB", (300, 200))
    resized = auto_resize(image)
    assert resized.size == (1248, 832)
    assert auto_resize(Image.new("RGB", (1024, 1024))).size == (1024, 1024)


def test_argument_errors(klein_pipe, one_thread):
    pipe = klein_pipe
    with pytest.raises(TypeError, match="edit_image must be a PIL image or a non-empty list"):
        pipe("a cat", edit_image=[])
    with pytest.raises(TypeError, match=r"edit_image\[1\] must be a PIL image"):
        pipe("a cat", edit_image=[Image.new("RGB", (32, 32)), "x.png"])
    with pytest.raises(ValueError, match="smaller than one 16x16 latent patch"):
        pipe("a cat", edit_image=[Image.new("RGB", (8, 40))], edit_image_auto_resize=False, height=32, width=32,
             num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="np")
    with pytest.raises(ValueError, match="denoising_strength"):
        pipe("a cat", denoising_strength=0.0)
    with pytest.raises(RuntimeError, match="no FLUX.2 DiT loaded"):
        Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)("a cat")
    assert not pipe.uses_embedded_guidance
    small = dict(height=16, width=16, num_inference_steps=1, output_type="latent")
    with pytest.warns(UserWarning, match=r"embedded_guidance=2.5 does nothing: this DiT has no guidance embedder "
                                         r"\(FLUX.2 \[klein\]; its base models take cfg_scale\)"):
        guided = pipe("a cat", embedded_guidance=2.5, seed=0, **small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default value is silent
        assert torch.equal(pipe("a cat", seed=0, **small), guided)  # (and it really does nothing)


def test_each_family_loads_in_its_own_pipeline(klein, tiny_root):
    from diffsynth import FluxImagePipeline
    with pytest.raises(CheckpointError, match="FLUX.2 VAE: it belongs to Flux2ImagePipeline"):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(klein / "vae" / "diffusion_pytorch_model.safetensors"))])
    with pytest.raises(CheckpointError, match="belongs to FluxImagePipeline"):
        Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(tiny_root / "flux1-dev.safetensors"))])


def test_top_level_import_and_num_images(klein_pipe, one_thread):
    assert TopLevel is Flux2ImagePipeline
    images = klein_pipe("a cat", height=32, width=32, seed=0, num_inference_steps=1, num_images=2)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].tobytes() != images[1].tobytes()


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_from_klein_folder(klein, klein_pipe, tmp_path, one_thread):
    from diffsynth.cli import main
    out = tmp_path / "klein.png"
    assert main(["generate", "--model-dir", str(klein), "--prompt", "a cat", "--height", "32", "--width", "48",
                 "--steps", "2", "--seed", "4", "--device", "cpu", "--dtype", "fp32", "--output", str(out)]) == 0
    expected = klein_pipe("a cat", height=32, width=48, num_inference_steps=2, seed=4)
    with Image.open(out) as image:
        assert image.size == (48, 32) and image.convert("RGB").tobytes() == expected.tobytes()
    cached = tmp_path / "cached.png"  # --fbcache reaches FLUX.2 (0: never skips, the same image)
    assert main(["generate", "--model-dir", str(klein), "--prompt", "a cat", "--height", "32", "--width", "48",
                 "--steps", "2", "--seed", "4", "--device", "cpu", "--dtype", "fp32", "--fbcache", "0",
                 "--output", str(cached)]) == 0
    with Image.open(cached) as image:
        assert image.convert("RGB").tobytes() == expected.tobytes()
        assert json.loads(image.info["diffsynth"])["fbcache_thresh"] == 0


def test_cli_edit_image_and_option_errors(klein, tmp_path, capsys, one_thread):
    from diffsynth.cli import main
    ref = tmp_path / "ref.png"
    Image.new("RGB", (48, 32), (200, 30, 30)).save(ref)
    edited = tmp_path / "edited.png"
    assert main(["generate", "--model-dir", str(klein), "--prompt", "make it red", "--edit-image", str(ref),
                 "--no-edit-image-auto-resize", "--height", "32", "--width", "48", "--steps", "1", "--seed", "1",
                 "--device", "cpu", "--dtype", "fp32", "--output", str(edited)]) == 0
    with Image.open(edited) as image:
        assert image.size == (48, 32) and "edit_image" in image.info["diffsynth"]
        assert json.loads(image.info["diffsynth"])["embedded_guidance"] == 4.0  # Flux2ImagePipeline's default
    assert main(["generate", "--model-dir", str(klein), "--prompt", "x", "--tea-cache", "0.3", "--device", "cpu",
                 "--output", str(tmp_path / "no.png")]) == 1
    assert "Flux2ImagePipeline has no --tea-cache\n" in capsys.readouterr().err  # the option's own name


def test_cli_inspect_names_the_vae_and_the_text_encoder(klein, capsys):
    import json
    from diffsynth.cli import main
    assert main(["inspect", "--json", str(klein / "vae"), str(klein / "text_encoder")]) == 0
    reports = [json.loads(r) for r in capsys.readouterr().out.replace("}\n{", "}\n\x00{").split("\x00")]
    assert [m["family"] for r in reports for m in r["models"]] == ["flux2-vae", "qwen3"]
    assert reports[0]["models"][0]["components"] == ["vae_encoder", "vae_decoder"]
    assert main(["inspect", str(klein / "text_encoder")]) == 0
    assert "qwen3 (hf layout) -> text_encoder_qwen3" in capsys.readouterr().out


@torch.no_grad()
def test_first_block_cache(klein_pipe, klein_base, one_thread):
    """fbcache_thresh: 0 never skips (the same image bit for bit, also editing and under CFG); a large threshold
    skips every step but the first and last, per CFG branch; with the negative prompt equal to the positive one
    each branch makes the no-CFG run's decisions (one state per branch)."""
    kw = dict(height=32, width=48, num_inference_steps=6, seed=4, output_type="latent")
    edit = dict(edit_image=pictures(6, (32, 32)), edit_image_auto_resize=False)
    for extra in ({}, edit):
        plain = klein_pipe("a cat", **kw, **extra)
        assert klein_pipe.last_cache_stats is None
        assert torch.equal(klein_pipe("a cat", **kw, **extra, fbcache_thresh=0.0), plain)
        stats = klein_pipe.last_cache_stats
        assert stats["policy"] == "fbcache" and stats["skipped"] == 0
        fast = klein_pipe("a cat", **kw, **extra, fbcache_thresh=1e9)
        assert klein_pipe.last_cache_stats["branches"]["posi"]["skipped_steps"] == [1, 2, 3, 4]
        assert not torch.equal(fast, plain) and rel_l2(fast, plain) < 1.0
    base = ours(klein_base)
    alone = base("a cat", **kw, fbcache_thresh=1.0)
    solo = base.last_cache_stats["branches"]["posi"]["skipped_steps"]
    assert 0 < len(solo) < 4
    for batch_cfg in (True, False):
        both = base("a cat", negative_prompt="a cat", cfg_scale=4.0, batch_cfg=batch_cfg, **kw, fbcache_thresh=1.0)
        branches = base.last_cache_stats["branches"]
        assert branches["posi"]["skipped_steps"] == branches["nega"]["skipped_steps"] == solo
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)
    plain = base("a cat", negative_prompt="blurry", cfg_scale=4.0, **kw)
    assert torch.equal(base("a cat", negative_prompt="blurry", cfg_scale=4.0, **kw, fbcache_thresh=0.0), plain)
    with pytest.raises(TypeError, match="tea_cache_l1_thresh"):
        base("a cat", **kw, tea_cache_l1_thresh=0.1)


@torch.no_grad()
def test_first_block_cache_computes_the_double_block_modulations_once_per_step(klein_pipe, one_thread):
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in
             (klein_pipe.dit.double_stream_modulation_img, klein_pipe.dit.double_stream_modulation_txt)]
    try:
        klein_pipe("a cat", height=32, width=32, num_inference_steps=3, seed=1, output_type="latent",
                   fbcache_thresh=0.0)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 2 * 3


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
