"""Kontext, FLEX.2, FLUX.1-Fill and FLUX.1-Canny/Depth on tiny random models: parity with diffusers'
pipelines on the same weights, FLEX's condition against an independent computation, loading, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.models.flux_dit import patchify
from diffsynth.pipelines.variants.kontext import Canvas, reference_size
from diffsynth.schedulers.flow_match import flux_sigmas
from diffsynth.testing.tiny_image import (VARIANTS, build_tiny_variant, diffusers_variant_transformer,
                                          record_dit_calls)

quiet = dict(progress_bar_cmd=lambda x: x)
ENCODERS = ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
H, W = 64, 96


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def variant_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    for v in ("kontext", "fill", "canny", "flex"):
        build_tiny_variant(root / v, v)
    return root


def make_pipe(tiny_root, dit_path, **kw):
    configs = [ModelConfig(path=str(dit_path), **kw)] + [ModelConfig(path=str(tiny_root / p)) for p in ENCODERS]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)


@pytest.fixture(scope="module")
def pipes(tiny_root, variant_root):
    return {v: make_pipe(tiny_root, variant_root / v / VARIANTS[v][0]) for v in ("kontext", "fill", "canny", "flex")}


def picture(width=W, height=H, seed=0):
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    rgb = np.stack([(x * 5 + seed * 40) % 256, (y * 7) % 256, ((x + y) * 3) % 256], -1)
    rgb = rgb + rng.integers(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def box_mask(width=W, height=H, box=(16, 8, 64, 40), mode="L"):
    mask = Image.new("L", (width, height))
    mask.paste(255, box)
    return mask.convert(mode)


@pytest.fixture(scope="module")
def diffusers_base(tiny_root):
    from test_pipeline import diffusers_pipeline
    return diffusers_pipeline(tiny_root)


def reference_pipeline(cls, base, variant_root, variant):
    import inspect
    accepted = inspect.signature(cls.__init__).parameters
    transformer = diffusers_variant_transformer(variant_root / variant, variant)
    return cls(**{k: v for k, v in {**base.components, "transformer": transformer}.items() if k in accepted})


def compare(expected: np.ndarray, ours: Image.Image) -> int:
    expected = np.round(expected * 255).astype(np.int16)
    got = np.asarray(ours).astype(np.int16)
    assert got.shape == expected.shape and expected.std() > 5
    worst = int(np.abs(got - expected).max())
    print(f"max |pixel diff| vs diffusers: {worst}/255, mean {np.abs(got - expected).mean():.3f}")
    return worst


def same_noise(steps=3, seed=5):
    noise = torch.randn((1, 16, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(seed))
    return dict(height=H, width=W, num_inference_steps=steps, sigmas=flux_sigmas(steps).numpy(),
                latents=patchify(noise), max_sequence_length=32, output_type="np"), dict(
        height=H, width=W, num_inference_steps=steps, seed=seed, t5_sequence_length=32, **quiet)


@pytest.fixture
def vae_mode(monkeypatch):
    """diffusers' Fill/Control pipelines sample the VAE posterior; ours (and Kontext's) take its mode."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


# ----------------------------------------------------------------------------- parity with diffusers

def test_kontext_matches_diffusers(diffusers_base, variant_root, pipes):
    from diffusers import FluxKontextPipeline
    ref = reference_pipeline(FluxKontextPipeline, diffusers_base, variant_root, "kontext")
    theirs, ours = same_noise()
    image = picture(80, 48, seed=1)  # another size than the output: encoded at its own resolution
    expected = ref(prompt="make it blue", image=image, guidance_scale=2.5, _auto_resize=False, max_area=H * W,
                   **theirs).images[0]
    got = pipes["kontext"]("make it blue", kontext_images=image, embedded_guidance=2.5, **ours)
    assert compare(expected, got) <= 2


def test_fill_matches_diffusers(diffusers_base, variant_root, pipes, vae_mode):
    from diffusers import FluxFillPipeline
    ref = reference_pipeline(FluxFillPipeline, diffusers_base, variant_root, "fill")
    theirs, ours = same_noise()
    image, mask = picture(seed=2), box_mask()
    expected = ref(prompt="a white cup", image=image, mask_image=mask, guidance_scale=30.0, **theirs).images[0]
    got = pipes["fill"]("a white cup", flux_fill_image=image, flux_fill_mask=mask, embedded_guidance=30.0, **ours)
    assert compare(expected, got) <= 2


def test_canny_matches_diffusers(diffusers_base, variant_root, pipes, vae_mode):
    from diffusers import FluxControlPipeline
    ref = reference_pipeline(FluxControlPipeline, diffusers_base, variant_root, "canny")
    theirs, ours = same_noise()
    control = picture(seed=3)
    expected = ref(prompt="a robot", control_image=control, guidance_scale=10.0, **theirs).images[0]
    got = pipes["canny"]("a robot", flux_control_image=control, embedded_guidance=10.0, **ours)
    assert compare(expected, got) <= 2


# ----------------------------------------------------------------------------- Kontext semantics

def test_kontext_references_get_distinct_positions(pipes, monkeypatch):
    seen = record_dit_calls(monkeypatch)
    a, b, c = picture(64, 32), picture(32, 48, seed=1), picture(48, 48, seed=2)
    pipes["kontext"]("a", kontext_images=[a, b, c], output_type="latent", **same_noise(1)[1])
    (tokens, ids), = seen[0].ref
    assert tokens.shape == (1, 4 * 2 + 2 * 3 + 3 * 3, 64)
    assert torch.all(ids[0, :, 0] == 1)
    positions = {tuple(p) for p in ids[0, :, 1:].tolist()}
    assert len(positions) == ids.shape[1]  # no two reference tokens share a position
    first = ids[0, :8, 1:]
    assert first[:, 0].min() == 0 and first[:, 1].min() == 0  # the first sits at the origin
    # the second (3x2 tokens) goes below the first (2x4): the canvas stays squarer
    assert ids[0, 8:14, 1].min() == 2 and ids[0, 8:14, 2].min() == 0
    assert Canvas(2, 4).place(3, 2) == (2, 0) and Canvas(5, 4).place(3, 3) == (0, 4)


def test_kontext_auto_resize_picks_trained_resolution():
    assert reference_size(picture(80, 48), auto_resize=False) == (80, 48)
    assert reference_size(picture(90, 50), auto_resize=False) == (80, 48)
    assert reference_size(picture(300, 200), auto_resize=True) == (1248, 832)
    assert reference_size(picture(64, 64), auto_resize=True) == (1024, 1024)


def test_kontext_reference_changes_output_and_batches_with_cfg(pipes):
    kw = dict(same_noise(2)[1], output_type="latent")
    plain = pipes["kontext"]("a cat", **kw)
    with_ref = pipes["kontext"]("a cat", kontext_images=picture(), **kw)
    assert not torch.allclose(plain, with_ref)
    batched = pipes["kontext"]("a cat", kontext_images=picture(), cfg_scale=2.0, **kw)
    separate = pipes["kontext"]("a cat", kontext_images=picture(), cfg_scale=2.0, batch_cfg=False, **kw)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- FLEX.2

def studio_mask(mask, size=(W // 8, H // 8)):
    """DiffSynth-Studio's FLEX.2 mask: the RGB mask resized to the latent grid with PIL's default filter
    (bicubic), channel 0 mapped from [-1, 1] back to [0, 1]."""
    x = np.asarray(mask.convert("RGB").resize(size), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy((x[..., 0] + 1) / 2)[None, None]


def expected_flex(pipe, inpaint, mask, control, strength):
    """The 33-channel condition, computed here independently of the pipeline's units."""
    def encode(image):
        x = torch.from_numpy(np.asarray(image.convert("RGB").resize((W, H)), dtype=np.float32) / 127.5 - 1)
        return pipe.vae_encoder(x.permute(2, 0, 1)[None])
    m = studio_mask(mask)
    return torch.cat([encode(inpaint) * (1 - m), m, encode(control) * strength], 1)


@pytest.mark.parametrize("stop, steps, control_steps", [(0.5, 5, 3), (1.0, 4, 4), (0.0, 4, 1), (0.4, 6, 3)])
def test_flex_condition_and_control_stop(pipes, monkeypatch, stop, steps, control_steps):
    seen = record_dit_calls(monkeypatch)
    pipe = pipes["flex"]
    inpaint, mask, control = picture(seed=4), box_mask(mode="RGB"), picture(seed=5)
    pipe("a", flex_inpaint_image=inpaint, flex_inpaint_mask=mask, flex_control_image=control,
         flex_control_strength=0.7, flex_control_stop=stop, output_type="latent", **same_noise(steps)[1])
    expected = expected_flex(pipe, inpaint, mask, control, 0.7)
    assert len(seen) == steps
    for i, call in enumerate(seen):
        (channels,) = call.channels
        assert channels.shape == (1, 33, H // 8, W // 8)
        want = expected if i < control_steps else torch.cat([expected[:, :17], torch.zeros_like(expected[:, 17:])], 1)
        torch.testing.assert_close(channels, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_size, mode", [((W, H), "RGB"), ((W, H), "L"), ((40, 40), "RGB"), ((128, 128), "L")])
def test_flex_mask_is_resampled_like_diffsynth_studio(pipes, monkeypatch, mask_size, mode):
    """Bicubic on the RGB mask, any mask size (the scripts pass 1024x1024 with any image); the masks of
    the box's edge cells differ from a bilinear resize by several hundredths, far above the tolerance."""
    seen = record_dit_calls(monkeypatch)
    mask = box_mask(mode=mode).resize(mask_size, Image.NEAREST)
    pipes["flex"]("a", flex_inpaint_image=picture(seed=4), flex_inpaint_mask=mask, output_type="latent",
                  **same_noise(1)[1])
    got, want = seen[0].channels[0][:, 16:17], studio_mask(mask)
    bilinear = torch.from_numpy(np.asarray(mask.convert("L").resize((W // 8, H // 8), Image.BILINEAR),
                                           dtype=np.float32) / 255)
    assert (want - bilinear).abs().max() > 0.02  # the check below tells the two filters apart
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_flex_defaults_without_inputs(pipes, monkeypatch):
    seen = record_dit_calls(monkeypatch)
    pipes["flex"]("a", output_type="latent", **same_noise(2)[1])
    (channels,) = seen[0].channels
    assert torch.equal(channels[:, :16], torch.zeros_like(channels[:, :16]))
    assert torch.equal(channels[:, 16], torch.ones_like(channels[:, 16]))
    assert torch.equal(channels[:, 17:], torch.zeros_like(channels[:, 17:]))


def test_flex_runs_with_batched_cfg(pipes):
    kw = dict(same_noise(2)[1], output_type="latent", flex_control_image=picture(), cfg_scale=2.0)
    batched, separate = pipes["flex"]("a", **kw), pipes["flex"]("a", batch_cfg=False, **kw)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- loading

def dit_only(path):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(path))]).dit


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "fp8"])
def test_variant_dits_load_from_every_layout(variant_root, pipes, tmp_path, layout):
    from safetensors.torch import load_file, save_file
    for variant, channels in (("fill", 384), ("flex", 196)):
        bfl = variant_root / variant / VARIANTS[variant][0]
        if layout == "diffusers":
            path = build_tiny_variant(tmp_path / variant, variant, dit_format="diffusers") / "transformer"
        elif layout == "comfyui":
            path = tmp_path / f"{variant}_comfy.safetensors"
            save_file({f"model.diffusion_model.{k}": v for k, v in load_file(bfl).items()}, path)
        else:
            path = tmp_path / f"{variant}_fp8.safetensors"
            save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in load_file(bfl).items()}, path)
        dit, reference = dit_only(path), pipes[variant].dit
        assert dit.config == reference.config and dit.config.in_channels == channels
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(1, 12, channels, generator=g), torch.zeros(1, 12, 3), torch.randn(1, 5, 32, generator=g),
                torch.zeros(1, 5, 3), torch.tensor([0.5]), torch.randn(1, 32, generator=g), torch.tensor([3.5]))
        got, want = dit(*args), reference(*args)
        if layout == "fp8":  # e4m3 weights: a few % of relative error
            assert 0 < ((got - want).norm() / want.norm()).item() < 0.1
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_vram_management_plans_variant_dit(tiny_root, variant_root):
    pipe = make_pipe(tiny_root, variant_root / "flex" / VARIANTS["flex"][0], offload_device="cpu",
                     offload_dtype=torch.float8_e4m3fn)
    pipe.enable_vram_management(vram_limit=0)
    out = pipe("a", flex_control_image=picture(), output_type="latent", **same_noise(1)[1])
    # oracle: the plain fp32 pipeline whose DiT weights went through fp8 once (what the streamed layers compute with)
    reference = make_pipe(tiny_root, variant_root / "flex" / VARIANTS["flex"][0])
    stored = dict(pipe.dit.named_parameters())
    with torch.no_grad():
        for name, p in reference.dit.named_parameters():
            if stored[name].dtype == torch.float8_e4m3fn:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    assert any(p.dtype == torch.float8_e4m3fn for p in stored.values())
    expected = reference("a", flex_control_image=picture(), output_type="latent", **same_noise(1)[1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("variant, kw, match", [
    ("fill", dict(kontext_images=picture(), flux_fill_image=picture(), flux_fill_mask=box_mask()),
     "kontext_images needs the FLUX.1-Kontext"),
    ("kontext", dict(flex_control_image=picture()), "flex_control_image needs the FLEX.2 DiT"),
    ("kontext", dict(flex_control_strength=0.3), "flex_control_strength needs the FLEX.2 DiT"),
    ("kontext", dict(flux_fill_image=picture(), flux_fill_mask=box_mask()), "needs the FLUX.1-Fill DiT"),
    ("kontext", dict(flux_control_image=picture()), "needs the FLUX.1-Canny/Depth DiT"),
    ("fill", dict(), "needs flux_fill_image and flux_fill_mask"),
    ("fill", dict(flux_fill_image=picture()), "flux_fill_mask is missing"),
    ("fill", dict(flux_fill_image=picture(), flux_fill_mask=box_mask(mode="RGB")), "mode 'L'"),
    ("fill", dict(flux_fill_image=picture(), flux_fill_mask=box_mask(48, 32)), "48x32 but the image it masks is 96x64"),
    ("flex", dict(flex_inpaint_mask=box_mask(mode="P")), "flex_inpaint_mask must be a mask image of mode"),
    ("flex", dict(flex_control_stop=1.5), r"flex_control_stop must be in \[0, 1\]"),
    ("canny", dict(), "needs flux_control_image"),
])
def test_bad_inputs_are_clear_errors(pipes, variant, kw, match):
    with pytest.raises(ValueError, match=match):
        pipes[variant]("a", output_type="latent", **same_noise(1)[1], **kw)


def test_non_image_reference_is_a_type_error(pipes):
    with pytest.raises(TypeError, match="kontext_images must be a PIL image"):
        pipes["kontext"]("a", kontext_images="cat.png", output_type="latent", **same_noise(1)[1])
