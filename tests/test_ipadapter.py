"""IP-Adapter: InstantX (.bin / safetensors, SigLIP) and XLabs (CLIP) files, parity with diffusers, CFG, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import CheckpointError, FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import detect
from diffsynth.models.flux_dit import patchify
from diffsynth.schedulers.flow_match import flux_sigmas
from diffsynth.testing.tiny_adapters import (build_tiny_clip_vision, build_tiny_siglip, write_tiny_instantx_ipadapter,
                                             write_tiny_xlabs_ipadapter)

quiet = dict(progress_bar_cmd=lambda x: x)
KW = dict(prompt="a red cat", height=64, width=64, num_inference_steps=2, t5_sequence_length=16, seed=1,
          output_type="latent", **quiet)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ipadapter")
    return dict(siglip=build_tiny_siglip(d / "siglip"), clip=build_tiny_clip_vision(d / "clip"),
                bin=write_tiny_instantx_ipadapter(d / "ip-adapter.bin"),
                st=write_tiny_instantx_ipadapter(d / "ip-adapter.safetensors"),
                xlabs=write_tiny_xlabs_ipadapter(d / "xlabs" / "ip_adapter.safetensors"))


def _pipe(tiny_configs, *paths):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=tiny_configs() + [ModelConfig(path=str(p)) for p in paths])


@pytest.fixture(scope="module")
def instantx(tiny_configs, files):
    return _pipe(tiny_configs, files["bin"], files["siglip"] / "model.safetensors")


@pytest.fixture(scope="module")
def xlabs(tiny_configs, files):
    return _pipe(tiny_configs, files["xlabs"], files["clip"])


REF = Image.fromarray((np.indices((28, 28)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")


def test_detection_by_keys_and_shapes(files):
    assert [(d.family, d.format) for d in detect(str(files["bin"]))] == [("flux-ipadapter", "instantx")]
    assert [(d.family, d.format) for d in detect(str(files["st"]))] == [("flux-ipadapter", "instantx")]
    assert [(d.family, d.format) for d in detect(str(files["xlabs"]))] == [("flux-ipadapter", "xlabs")]
    assert detect(str(files["siglip"]))[0].family == "siglip"
    assert detect(str(files["clip"]))[0].family == "clip-vision"


def test_bin_and_safetensors_forms_are_the_same_model(instantx, tiny_configs, files):
    other = _pipe(tiny_configs, files["st"], files["siglip"])
    for (k, a), b in zip(instantx.ipadapter.state_dict().items(), other.ipadapter.state_dict().values()):
        assert torch.equal(a, b), k


def test_instantx_steers_and_scale_zero_is_the_base_model(instantx):
    base = instantx(**KW)
    steered = instantx(**KW, ipadapter_images=REF, ipadapter_scale=0.8)
    assert (steered - base).abs().max() > 1e-3
    assert torch.allclose(instantx(**KW, ipadapter_images=REF, ipadapter_scale=0.0), base, atol=1e-6)


def test_negative_side_uses_the_users_scale(instantx):
    """With scale 0 on both sides CFG equals the adapter-free run; a negative side at a fixed 1.0 would not."""
    cfg = dict(KW, negative_prompt="blurry", cfg_scale=2.0)
    assert torch.allclose(instantx(**cfg, ipadapter_images=REF, ipadapter_scale=0.0), instantx(**cfg), atol=1e-6)
    batched = instantx(**cfg, ipadapter_images=[REF, REF.rotate(90)], ipadapter_scale=0.6)
    separate = instantx(**cfg, ipadapter_images=[REF, REF.rotate(90)], ipadapter_scale=0.6, batch_cfg=False)
    assert torch.allclose(batched, separate, atol=1e-5)


def test_several_reference_images_differ_from_one(instantx):
    one = instantx(**KW, ipadapter_images=[REF])
    two = instantx(**KW, ipadapter_images=[REF, REF.rotate(90)])
    assert (one - two).abs().max() > 1e-4


def test_xlabs_matches_diffusers_load_ip_adapter(tiny_root, xlabs, files):
    from test_pipeline import diffusers_pipeline
    ref = diffusers_pipeline(tiny_root)
    ref.load_ip_adapter(str(files["xlabs"].parent), weight_name="ip_adapter.safetensors",
                        image_encoder_pretrained_model_name_or_path=str(files["clip"]))
    ref.set_ip_adapter_scale(0.7)
    h, w, steps, seed = 64, 64, 3, 5
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
    expected = ref(prompt="a red cat", guidance_scale=3.5, height=h, width=w, num_inference_steps=steps,
                   sigmas=flux_sigmas(steps).numpy(), latents=patchify(noise), max_sequence_length=32,
                   ip_adapter_image=REF, output_type="np").images[0]
    ours = xlabs(prompt="a red cat", embedded_guidance=3.5, height=h, width=w, num_inference_steps=steps, seed=seed,
                 t5_sequence_length=32, ipadapter_images=REF, ipadapter_scale=0.7, **quiet)
    base = xlabs(prompt="a red cat", embedded_guidance=3.5, height=h, width=w, num_inference_steps=steps, seed=seed,
                 t5_sequence_length=32, **quiet)
    expected = np.round(expected * 255).astype(np.int16)
    got = np.asarray(ours).astype(np.int16)
    assert np.abs(got - np.asarray(base).astype(np.int16)).max() > 4  # the adapter visibly acts
    assert np.abs(got - expected).max() <= 2


def test_ipadapter_images_without_adapter_is_an_error(tiny_pipe):
    with pytest.raises(RuntimeError, match="needs an IP-Adapter"):
        tiny_pipe(**KW, ipadapter_images=REF)


def test_bad_images_and_scale(instantx):
    with pytest.raises(TypeError, match="ipadapter_images must be"):
        instantx(**KW, ipadapter_images="ref.jpg")
    with pytest.raises(TypeError, match="ipadapter_scale"):
        instantx(**KW, ipadapter_images=REF, ipadapter_scale="high")


def test_wrong_image_encoder_is_named(tiny_configs, files):
    pipe = _pipe(tiny_configs, files["xlabs"], files["siglip"])  # XLabs wants CLIP (24-d here), SigLIP gives 32
    with pytest.raises(ValueError, match="CLIP ViT-L/14"):
        pipe(**KW, ipadapter_images=REF)


def test_xlabs_controlnet_is_not_taken_for_an_ipadapter(tmp_path):
    from diffsynth.ops.files import save_safetensors
    path = tmp_path / "controlnet.safetensors"
    save_safetensors({"input_hint_block.0.weight": torch.zeros(4, 3, 3, 3),
                      "double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32),
                      "controlnet_blocks.0.weight": torch.zeros(32, 32)}, path)
    det = detect(str(path))
    assert det[0].family == "xlabs-controlnet"


def test_truncated_ipadapter_is_a_clear_error(tmp_path, files):
    from diffsynth.loading.registry import build
    from diffsynth.ops.files import load_state_dict, save_safetensors
    sd = {k: v for k, v in load_state_dict(str(files["st"])).items() if not k.startswith("image_proj.proj.2")}
    save_safetensors(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="image_proj.proj.2.weight"):
        build(detect(str(tmp_path / "broken.safetensors"))[0])
