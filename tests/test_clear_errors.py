"""Issue 22's late or unclear errors: each user mistake gives one clear line, before any work starts."""
import pytest
import torch
from PIL import Image

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.cli import main
from diffsynth.pipelines.checks import MissingModelError

FILES = {"dit": "flux1-dev.safetensors", "clip": "text_encoder/model.safetensors", "t5": "text_encoder_2",
         "vae": "ae.safetensors"}
CLI = ["--height", "64", "--width", "64", "--steps", "2", "--t5-sequence-length", "16", "--device", "cpu",
       "--dtype", "fp32"]


def pipe_without(tiny_root, *left_out: str) -> FluxImagePipeline:
    configs = [ModelConfig(path=str(tiny_root / f)) for k, f in FILES.items() if k not in left_out]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)


def counting_dit(pipe, monkeypatch) -> list:
    calls = []
    original = pipe.model_fn
    monkeypatch.setattr(pipe, "model_fn", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def test_missing_vae_is_found_before_denoising(tiny_root, monkeypatch):
    pipe = pipe_without(tiny_root, "vae")
    calls = counting_dit(pipe, monkeypatch)
    with pytest.raises(MissingModelError, match=r"decoding the image needs the VAE decoder \(ae.safetensors\)"):
        pipe("a cat", height=64, width=64, num_inference_steps=2, t5_sequence_length=16)
    with pytest.raises(MissingModelError, match="input_image needs the VAE encoder"):
        pipe("a cat", input_image=Image.new("RGB", (64, 64)), output_type="latent",
             num_inference_steps=2, t5_sequence_length=16)
    assert calls == []  # no denoising step ran
    latents = pipe("a cat", height=64, width=64, num_inference_steps=1, t5_sequence_length=16, output_type="latent")
    assert latents.shape == (1, 16, 8, 8) and calls  # latents need no VAE


def test_missing_clip_names_clip_not_both_encoders(tiny_root, monkeypatch):
    pipe = pipe_without(tiny_root, "clip")
    calls = counting_dit(pipe, monkeypatch)
    with pytest.raises(MissingModelError) as e:
        pipe("a cat", height=64, width=64, num_inference_steps=2, t5_sequence_length=16)
    assert "the prompt needs the CLIP text encoder (text_encoder/model.safetensors), which is not loaded" in str(e.value)
    assert "T5" not in str(e.value) and "model_configs" in str(e.value) and calls == []


def test_cli_names_the_missing_model_in_its_own_words(tiny_root, tmp_path, capsys):
    models = [str(tiny_root / FILES[k]) for k in ("dit", "t5", "vae")]
    assert main(["generate", "--model", *models, "--prompt", "a cat", "--output", str(tmp_path / "x.png")] + CLI) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: the prompt needs the CLIP text encoder (text_encoder/model.safetensors), which is not "
                   "among the models given: add its file to --model (or give a complete --model-dir)")
    assert not (tmp_path / "x.png").exists()
