"""FLUX ControlNets: layouts, parity with diffusers (model, pipeline, several at once), Inpainting's condition,
the active window, bad inputs, VRAM management and fp8 storage."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import ControlNetInput, FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import build, detect
from diffsynth.models.flux_dit import image_ids, patchify
from diffsynth.schedulers.flow_match import flux_sigmas
from diffsynth.testing.tiny_controlnet import build_tiny_controlnet, tiny_diffusers_controlnet

quiet = dict(progress_bar_cmd=lambda x: x)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {
        "union": build_tiny_controlnet(root / "union", "union", seed=1),
        "inpaint": build_tiny_controlnet(root / "inpaint", "inpaint", seed=2),
        "plain": build_tiny_controlnet(root / "plain", "plain", seed=3),
        "plain_b": build_tiny_controlnet(root / "plain_b", "plain", seed=4),
        "short": build_tiny_controlnet(root / "short", "plain", num_double=1, num_single=0, seed=5),
        "xlabs": build_tiny_controlnet(root / "xlabs", "xlabs", seed=6),
    }


def net_file(folder):
    return str(next(folder.glob("*.safetensors")))


@pytest.fixture(scope="module")
def make_pipe(tiny_configs, nets):
    def make(*kinds, **kw):
        configs = tiny_configs() + [ModelConfig(path=net_file(nets[k]), **kw) for k in kinds]
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    return make


def control_image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- the model

SEEDS = {"union": 1, "inpaint": 2, "plain": 3, "xlabs": 6}


@pytest.mark.parametrize("kind", ["union", "inpaint", "plain", "xlabs"])
def test_model_matches_diffusers(nets, kind):
    (det,) = detect(net_file(nets[kind]))
    assert (det.family, det.format) == (("xlabs-controlnet", "xlabs") if kind == "xlabs" else
                                        ("flux-controlnet", "diffusers"))
    ours = build(det, torch.float32, "cpu", compute_dtype=torch.float32)["controlnet"]
    ref = tiny_diffusers_controlnet(kind, seed=SEEDS[kind])
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 16, 64, generator=g)
    cond = torch.randn(1, 3, 64, 64, generator=g) if kind == "xlabs" else \
        torch.randn(1, 16, ours.config.cond_channels, generator=g)
    txt, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    ids, txt_ids, t, gd = image_ids(8, 8), torch.zeros(1, 5, 3), torch.tensor([0.7]), torch.tensor([3.5])
    mode = torch.tensor([2]) if kind == "union" else None
    out = ours(img, ids, txt, txt_ids, t, pooled, gd, cond=cond, mode=mode)
    with torch.no_grad():
        double, single = ref(hidden_states=img, controlnet_cond=cond, encoder_hidden_states=txt,
                             controlnet_mode=None if mode is None else mode[:, None], pooled_projections=pooled,
                             timestep=t, img_ids=ids[0], txt_ids=txt_ids[0], guidance=gd, return_dict=False)
    assert len(out.double) + len(out.single) == len(double) + len(single or ())
    for a, b in zip(out.double + out.single, [*double, *(single or ())]):
        assert (a - b).abs().max() / b.abs().max() < 1e-5
    assert ours.is_union == (kind == "union") and ours.config.extra_channels == (4 if kind == "inpaint" else 0)


def test_layouts_and_block_counts(nets, tmp_path):
    (det,) = detect(net_file(nets["short"]))
    net = build(det, torch.float32, "cpu", compute_dtype=torch.float32)["controlnet"]
    assert (net.config.num_double_blocks, net.config.num_single_blocks) == (1, 0)
    # residuals spread like diffusers: K residuals over the base blocks, interval ceil(n / K)
    from diffsynth.models.flux_controlnet import ControlNetOutput
    out = ControlNetOutput([torch.zeros(1), torch.ones(1)], [])
    assert [out.for_block("double", i, 19)[0].item() for i in (0, 9, 10, 18)] == [0, 0, 1, 1]
    assert out.for_block("single", 3, 38) is None
    xlabs = ControlNetOutput([torch.zeros(1), torch.ones(1)], [], repeat=True)  # XLabs: residual i % K
    assert [xlabs.for_block("double", i, 19)[0].item() for i in (0, 1, 2, 17, 18)] == [0, 1, 0, 1, 0]


# ----------------------------------------------------------------------------- pipeline parity

def diffusers_controlnet_pipeline(root, controlnet):
    from diffusers import FluxControlNetPipeline
    from test_pipeline import diffusers_pipeline
    base = diffusers_pipeline(root)
    return FluxControlNetPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                                  tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2,
                                  tokenizer_2=base.tokenizer_2, transformer=base.transformer, controlnet=controlnet)


@pytest.mark.parametrize("case", ["union", "plain", "two", "xlabs"])
def test_pipeline_matches_diffusers(tiny_root, make_pipe, case, monkeypatch):
    from diffusers import FluxMultiControlNetModel
    from diffusers.pipelines.flux import pipeline_flux_controlnet
    # diffusers samples the control image's latent distribution; we (and DiffSynth) take its mean
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents",
                        lambda out, generator=None: out.latent_dist.mode())
    h, w, steps, seed = 64, 64, 3, 5
    images = [control_image(1), control_image(2)]
    if case == "union":
        pipe, ref_net = make_pipe("union"), tiny_diffusers_controlnet("union", seed=1)
        inputs = [ControlNetInput(image=images[0], scale=0.8, processor_id="depth")]
        extra = dict(control_image=images[0], control_mode=2, controlnet_conditioning_scale=0.8)
    elif case == "xlabs":  # pixel condition, residuals repeated over the base blocks
        pipe, ref_net = make_pipe("xlabs"), tiny_diffusers_controlnet("xlabs", seed=6)
        inputs = [ControlNetInput(image=images[0], scale=0.8)]
        extra = dict(control_image=images[0], controlnet_conditioning_scale=0.8)
    elif case == "plain":
        pipe, ref_net = make_pipe("plain"), tiny_diffusers_controlnet("plain", seed=3)
        inputs = [ControlNetInput(image=images[0], scale=0.7)]
        extra = dict(control_image=images[0], controlnet_conditioning_scale=0.7)
    else:
        pipe = make_pipe("plain", "plain_b")
        ref_net = FluxMultiControlNetModel([tiny_diffusers_controlnet("plain", seed=3),
                                            tiny_diffusers_controlnet("plain", seed=4)])
        inputs = [ControlNetInput(image=images[0], scale=0.6),
                  ControlNetInput(image=images[1], scale=0.9, controlnet_id=1)]
        extra = dict(control_image=images, control_mode=[None, None], controlnet_conditioning_scale=[0.6, 0.9])
    ref = diffusers_controlnet_pipeline(tiny_root, ref_net)
    noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
    expected = ref(prompt="a red cat", guidance_scale=3.5, height=h, width=w, num_inference_steps=steps,
                   sigmas=flux_sigmas(steps).numpy(), latents=patchify(noise), max_sequence_length=16,
                   output_type="np", **extra).images[0]
    ours = pipe(prompt="a red cat", embedded_guidance=3.5, height=h, width=w, num_inference_steps=steps, seed=seed,
                t5_sequence_length=16, controlnet_inputs=inputs, **quiet)
    without = pipe(prompt="a red cat", embedded_guidance=3.5, height=h, width=w, num_inference_steps=steps,
                   seed=seed, t5_sequence_length=16, **quiet)
    expected = np.round(expected * 255).astype(np.int16)
    got, plain = np.asarray(ours).astype(np.int16), np.asarray(without).astype(np.int16)
    assert np.abs(got - expected).max() <= 2
    assert np.abs(got - plain).max() > 10  # the ControlNet matters


def test_inpainting_condition_is_masked_latents_plus_keep_mask(make_pipe):
    pipe = make_pipe("inpaint")
    image = control_image(3)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[8:40, 16:48] = 255
    captured = {}
    original = pipe.controlnet[0].forward

    def spy(*args, **kw):
        captured.setdefault("cond", kw["cond"])
        return original(*args, **kw)
    pipe.controlnet[0].forward = spy
    pipe(prompt="a cat", height=64, width=64, num_inference_steps=1, seed=0, t5_sequence_length=16,
         controlnet_inputs=[ControlNetInput(image=image, inpaint_mask=Image.fromarray(mask), scale=0.9)], **quiet)
    # independent computation: black pixels under the mask, VAE mean latents, keep = 1 - mask on the latent grid
    pixels = np.array(image)
    pixels[mask.mean(-1) > 127.5] = 0
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    latents = pipe.vae_encoder(x)
    keep = torch.ones(1, 1, 8, 8)
    keep[:, :, 1:5, 2:6] = 0
    expected = torch.cat([latents, keep], 1)  # (1, 17, 8, 8)
    packed = expected.view(1, 17, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 68)
    assert torch.allclose(captured["cond"], packed, atol=1e-5)


# ----------------------------------------------------------------------------- semantics and errors

def test_active_window_and_scale(make_pipe):
    pipe = make_pipe("plain")
    calls = []
    original = pipe.controlnet[0].forward
    pipe.controlnet[0].forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    run = lambda **kw: pipe(prompt="a cat", height=64, width=64, num_inference_steps=5, seed=0,  # noqa: E731
                            t5_sequence_length=16, output_type="latent", **quiet,
                            controlnet_inputs=[ControlNetInput(image=control_image(), **kw)])
    run(start=1.0, end=0.0)
    assert len(calls) == 5
    calls.clear()
    run(start=0.6, end=0.2)  # progress 1, .75, .5, .25, 0 -> steps 2 and 3
    assert len(calls) == 2
    zero = run(scale=0.0)
    base = pipe(prompt="a cat", height=64, width=64, num_inference_steps=5, seed=0, t5_sequence_length=16,
                output_type="latent", **quiet)
    assert torch.allclose(zero, base, atol=1e-6)


def test_batched_cfg_and_other_size_control_image(make_pipe):
    pipe = make_pipe("union")
    kw = dict(prompt="a cat", negative_prompt="dog", cfg_scale=2.0, height=64, width=64, num_inference_steps=2,
              seed=0, t5_sequence_length=16, output_type="latent", **quiet)
    inputs = [ControlNetInput(image=control_image(size=(96, 80)), processor_id="canny")]  # resized to 64x64
    batched = pipe(controlnet_inputs=inputs, **kw)
    separate = pipe(controlnet_inputs=inputs, batch_cfg=False, **kw)
    assert torch.allclose(batched, separate, atol=1e-5)


@pytest.mark.parametrize("kinds, inp, error, match", [
    (("union",), dict(processor_id="sketch"), ValueError, "processor_id='sketch'"),
    (("union",), dict(processor_id=None), ValueError, "union ControlNet"),
    (("plain",), dict(controlnet_id=1), ValueError, "controlnet_id=1"),
    (("plain",), dict(inpaint_mask=Image.new("RGB", (64, 64))), ValueError, "not an inpainting ControlNet"),
    (("inpaint",), dict(), ValueError, "give inpaint_mask"),
    (("plain",), dict(start=0.2, end=0.8), ValueError, "start"),
    (("plain",), dict(image="x.png"), TypeError, "PIL image"),
    ((), dict(), RuntimeError, "need a ControlNet"),
])
def test_bad_inputs(make_pipe, kinds, inp, error, match):
    pipe = make_pipe(*kinds)
    inp = {"image": control_image(), **inp}
    with pytest.raises(error, match=match):
        pipe(prompt="a", height=64, width=64, num_inference_steps=1, t5_sequence_length=16,
             controlnet_inputs=[ControlNetInput(**inp)], **quiet)


def test_loaded_names_models_alias_vram_and_fp8(make_pipe):
    pipe = make_pipe("plain", "union")
    assert [n for n in pipe.loaded_models() if n.startswith("controlnet")] == ["controlnet.0", "controlnet.1"]
    assert pipe.controlnet.models[1] is pipe.controlnet[1] and pipe.controlnet[1].is_union
    kw = dict(prompt="a cat", height=64, width=64, num_inference_steps=2, seed=0, t5_sequence_length=16,
              output_type="latent", controlnet_inputs=[ControlNetInput(image=control_image(), scale=0.5)], **quiet)
    offloaded = make_pipe("plain", "union", offload_device="cpu", offload_dtype=torch.float32)
    offloaded.enable_vram_management(vram_limit=0)
    seen = []
    original = offloaded.controlnet[0].forward
    offloaded.controlnet[0].forward = lambda *a, **k: seen.append(
        offloaded.vram_models["controlnet.0"].onloaded) or original(*a, **k)
    decoded = offloaded(**{**kw, "output_type": "pt"})
    assert seen and all(seen) and not offloaded.vram_models["controlnet.0"].onloaded  # on during denoising only
    assert torch.allclose(decoded, pipe(**{**kw, "output_type": "pt"}), atol=1e-5)
    fp8 = make_pipe("plain", offload_dtype=torch.float8_e4m3fn)
    assert fp8.controlnet[0].blocks[0].attn.a_to_qkv.weight.dtype == torch.float8_e4m3fn
    got = fp8(**kw)
    # oracle: the fp32 ControlNet with the weights fp8 storage holds rounded to fp8 once
    reference = make_pipe("plain")
    stored = dict(fp8.controlnet[0].named_parameters())
    with torch.no_grad():
        for name, p in reference.controlnet[0].named_parameters():
            if stored[name].dtype == torch.float8_e4m3fn:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    torch.testing.assert_close(got, reference(**kw), rtol=1e-5, atol=1e-5)
    assert (got - make_pipe("plain")(**kw)).abs().max() > 0  # the rounding is visible


# ----------------------------------------------------------------------------- annotators

@pytest.mark.needs("cv2")
def test_canny_annotator_matches_opencv():
    import cv2
    from diffsynth.controlnets.processors import Annotator
    image = control_image(7, size=(80, 64))
    out = Annotator("canny")(image)
    assert out.size == image.size and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out)[..., 0], cv2.Canny(np.asarray(image), 100, 200))
    assert Annotator("tile")(image) is image


def test_learned_annotators_say_what_to_install_or_download(monkeypatch, tmp_path):
    import sys
    import types
    from diffsynth.controlnets.processors import Annotator
    with pytest.raises(ValueError, match="unknown processor_id 'sketch'"):
        Annotator("sketch")
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # not installed
    with pytest.raises(ImportError, match=r"diffsynth-flux\[annotators\]"):
        Annotator("depth", model_path=str(tmp_path))
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.SimpleNamespace())  # installed, weights missing
    with pytest.raises(FileNotFoundError, match=r"body_pose_model.pth.*download_models\(\['Annotators:Openpose'\]\)"
                       ".*lllyasviel/Annotators"):
        Annotator("openpose", model_path=str(tmp_path))


def test_annotator_names_the_module_that_failed_to_import(monkeypatch, tmp_path):
    """controlnet_aux installed, torchvision (which it imports) missing: that module is named, not "install
    controlnet_aux"."""
    import sys
    from diffsynth.controlnets.processors import Annotator
    fake = tmp_path / "site" / "controlnet_aux"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import torchvision_absent_for_this_test\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "controlnet_aux", raising=False)
    with pytest.raises(ImportError, match="Annotator\\('depth'\\) needs controlnet_aux, which is installed but cannot "
                                          "be imported: the module 'torchvision_absent_for_this_test' it imports is "
                                          "missing") as e:
        Annotator("depth", model_path=str(tmp_path))
    assert "pip install" not in str(e.value)


def test_infiniteyou_projector_is_recognised_not_misread(tmp_path):
    """InfiniteYou's projector file is named as what it is; an incomplete one fails naming what is missing
    (the complete file loads: tests/test_infiniteyou.py)."""
    from diffsynth.ops.files import CheckpointError
    sd = {"image_proj": {"latents": torch.zeros(1, 8, 32), "proj_in.weight": torch.zeros(32, 16),
                         "proj_in.bias": torch.zeros(32), "layers.0.0.to_kv.weight": torch.zeros(64, 32)}}
    torch.save(sd, tmp_path / "image_proj_model.bin")
    (det,) = detect(str(tmp_path / "image_proj_model.bin"))
    assert det.family == "infiniteyou-projector"
    with pytest.raises(CheckpointError, match="InfiniteYou projector: missing.*to_q"):
        build(det, torch.float32, "cpu", compute_dtype=torch.float32)
