"""Issue 22's late or unclear errors: each user mistake gives one clear line, before any work starts."""
import re

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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma_shift=1e-300), r"sigma_shift must be in \[0.001, 1000.0\], got 1e-300"),
    (dict(sigma_shift=INF), "sigma_shift must be finite"),
    (dict(ipadapter_scale=NAN), "ipadapter_scale must be finite, got nan"),
    (dict(lora_encoder_scale=1e30), r"lora_encoder_scale must be in \[-100.0, 100.0\]"),
])
def test_nonfinite_or_absurd_strengths_are_refused_up_front(tiny_pipe, monkeypatch, kwargs, message):
    """Like cfg_scale: these were a FloatingPointError after denoising (blaming fp16 in an fp32 run)."""
    calls = counting_dit(tiny_pipe, monkeypatch)
    with pytest.raises(ValueError, match=message):
        tiny_pipe("x", height=64, width=64, num_inference_steps=1, t5_sequence_length=16, **kwargs)
    assert calls == []


def test_controlnet_input_scale_is_checked_before_work(tiny_pipe, monkeypatch):
    from diffsynth import ControlNetInput
    calls = counting_dit(tiny_pipe, monkeypatch)
    image = Image.new("RGB", (64, 64))
    for field, value in (("scale", NAN), ("scale", 1e30), ("start", INF), ("end", NAN)):
        with pytest.raises(ValueError, match=rf"controlnet_inputs\[1\].{field} must be"):
            tiny_pipe("x", height=64, width=64, num_inference_steps=1, t5_sequence_length=16,
                      controlnet_inputs=[ControlNetInput(image=image), ControlNetInput(image=image, **{field: value})])
    assert calls == []


def test_lora_strength_1e30_is_refused_before_loading(tiny_root, tmp_path, capsys):
    from test_cli import write_tiny_lora
    lora = write_tiny_lora(tiny_root / "flux1-dev.safetensors", tmp_path / "lora.safetensors")
    pipe = pipe_without(tiny_root, "clip", "t5", "vae")
    before = pipe.dit.blocks[0].attn.a_to_qkv.weight.clone()
    with pytest.raises(ValueError, match=r"LoRA alpha \(strength\) must be in \[-100, 100\], got 1e\+30"):
        pipe.load_lora(pipe.dit, str(lora), alpha=1e30)
    assert torch.equal(pipe.dit.blocks[0].attn.a_to_qkv.weight, before)
    # the command line checks it before any model loads (this model file does not even exist)
    assert main(["generate", "--model", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--lora", str(lora),
                 "--lora-alpha", "1e30", "--output", str(tmp_path / "x.png")] + CLI) == 1
    assert "--lora-alpha must be in [-100, 100], got 1e+30" in capsys.readouterr().err


def test_nonfinite_output_of_an_fp32_run_does_not_blame_fp16(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "model_fn", lambda *a, latents, **kw: torch.full_like(latents, float("inf")))
    with pytest.raises(FloatingPointError, match=r"the DiT's computation \(extreme inputs or strengths\?\)"):
        tiny_pipe("x", height=64, width=64, num_inference_steps=1, t5_sequence_length=16)


@pytest.mark.parametrize("prompt", ["a \ud800 cat", "a \udcff cat"])  # a lone surrogate; invalid UTF-8 from argv
def test_prompt_that_is_not_valid_text_is_refused_before_work(tiny_pipe, tmp_path, monkeypatch, capsys, prompt):
    calls = counting_dit(tiny_pipe, monkeypatch)
    message = f"is not valid text: character 2 is the lone surrogate U+{ord(prompt[2]):04X}"
    with pytest.raises(ValueError, match=re.escape("prompt " + message)):
        tiny_pipe(prompt, height=64, width=64, num_inference_steps=1, t5_sequence_length=16)
    with pytest.raises(ValueError, match=re.escape("negative_prompt " + message)):
        tiny_pipe("x", negative_prompt=prompt, cfg_scale=2.0, height=64, width=64, num_inference_steps=1)
    with pytest.raises(TypeError, match=r"decode it first"):
        tiny_pipe(b"a \xff cat", height=64, width=64)
    assert calls == []
    # the command line: before any model loads (this model file does not even exist)
    assert main(["generate", "--model", str(tmp_path / "absent.safetensors"), "--prompt", prompt,
                 "--output", str(tmp_path / "x.png")] + CLI) == 1
    assert "prompt " + message in capsys.readouterr().err


def test_cuda_on_a_machine_without_it_is_named_by_the_api(tiny_root, monkeypatch, tmp_path, capsys):
    """DiffSynth-Studio's example scripts say device="cuda": on a laptop that was an AssertionError from deep
    inside loading; now the CLI's message, before any file is read."""
    from diffsynth.ops import devices
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu"])  # (a CUDA machine too plays one without)
    configs = [ModelConfig(path=str(tiny_root / f)) for f in FILES.values()]
    with pytest.raises(ValueError, match=re.escape("device='cuda': this machine/torch build has no CUDA device "
                                                   "(use device='cpu')")):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=configs)
    with pytest.raises(ValueError, match=re.escape("offload_device='cuda:1': this machine/torch build has no CUDA")):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(tiny_root / FILES["vae"]), offload_device="cuda:1")])
    with pytest.raises(ValueError, match="device 'gpu' is not a device name"):
        FluxImagePipeline.from_pretrained(device="gpu", model_configs=configs)
    assert main(["generate", "--model", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--device", "cuda",
                 "--output", str(tmp_path / "x.png")]) == 1
    assert "--device cuda: this machine/torch build has no CUDA device (use --device cpu)" in capsys.readouterr().err


def test_a_model_file_given_as_a_lora_is_named_in_one_line(tiny_root, tmp_path, capsys):
    dit = tiny_root / FILES["dit"]
    assert main(["generate", "--model", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--lora", str(dit),
                 "--output", str(tmp_path / "x.png")] + CLI) == 1  # refused before any model loads
    assert capsys.readouterr().err == f"error: {dit} is a FLUX DiT checkpoint, not a LoRA (full weights, no low-rank pairs)\n"
    pipe = pipe_without(tiny_root, "clip", "t5")
    with pytest.raises(ValueError, match=re.escape(f"{tiny_root / FILES['vae']} is a FLUX VAE checkpoint, not a LoRA")):
        pipe.load_lora(pipe.dit, str(tiny_root / FILES["vae"]))


def test_cli_unmatched_lora_entries_are_one_line_without_api_flags(tiny_root, tmp_path, capsys):
    from diffsynth.ops.files import save_safetensors
    lora = tmp_path / "deep.safetensors"
    save_safetensors({f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_{d}.weight": torch.zeros(4, 4)
                      for i in (30, 31) for d in ("down", "up")}, lora)
    assert main(["generate", "--model-dir", str(tiny_root), "--prompt", "x", "--lora", str(lora),
                 "--output", str(tmp_path / "x.png")] + CLI) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strict" not in err and f"--lora {lora}: 2 entries match no layer" in err


def test_seed_comes_with_each_image_and_last_seed_is_per_thread(tiny_pipe):
    """Threads sharing a pipeline each read their own call's seed (a shared last_seed held the last finisher's)."""
    import threading
    small = dict(height=64, width=64, num_inference_steps=1, t5_sequence_length=16)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(seed):
        try:
            barrier.wait()
            image = tiny_pipe("x", seed=seed, **small)
            barrier.wait()  # both calls have finished: one shared attribute would hold a single seed now
            results[seed] = (image.info["seed"], tiny_pipe.last_seed)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(s,)) for s in (11, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == {11: (11, 11), 22: (22, 22)}
    batch = tiny_pipe("x", num_images=2, **small)
    assert [im.info["seed"] for im in batch] == [tiny_pipe.last_seed, tiny_pipe.last_seed + 1]
