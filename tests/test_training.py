"""Training on the tiny random FLUX.1-dev model (CPU): learning, outputs, resume, multi-process, formats, errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.ops.files import load_state_dict
from diffsynth.models.flux_dit import image_ids
from diffsynth.pipelines.denoise import model_fn
from diffsynth.pipelines.units import active_units, run_units
from diffsynth.training import DatasetError, build_parser, train
from diffsynth.training import trainer as trainer_module
from diffsynth.training.checkpoint import resolve_resume
from diffsynth.training.data import crop_resize

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
STUDIO_TARGETS = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
                "norm1_a.linear,norm1_b.linear,to_qkv_mlp")
STUDIO_LORA = ["--lora_base_model", "dit", "--lora_target_modules", STUDIO_TARGETS, "--lora_rank", "32",
             "--remove_prefix_in_ckpt", "pipe.dit."]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def pattern(width: int, height: int, phase: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 4 + phase) % 256, (y * 3 + 2 * phase) % 256, ((x + y) * 2) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    pattern(64, 96, 0).save(root / "cat.png")
    pattern(96, 64, 120).save(root / "dog.jpg")
    pattern(96, 48, 60).save(root / "wide.webp")
    (root / "metadata.csv").write_text('image,prompt\ncat.png,"a red cat, sitting"\ndog.jpg,a dog\n')
    (root / "one.jsonl").write_text(json.dumps({"image": "cat.png", "prompt": "a red cat"}) + "\n")
    (root / "three.json").write_text(json.dumps([{"image": n, "prompt": p} for n, p in
                                                 (("cat.png", "a cat"), ("dog.jpg", "a dog"), ("wide.webp", "a car"))]))
    return root


def argv(tiny_root, data, out, *extra, fixed_size: bool = True) -> list[str]:
    size = ["--height", "64", "--width", "64"] if fixed_size else []
    return ["--dataset_base_path", str(data), *size,
            "--model_paths", json.dumps([str(tiny_root / f) for f in MODEL_FILES]), "--output_path", str(out),
            "--t5_sequence_length", "32", "--seed", "0", "--report_to", "none", *extra]


def run(tiny_root, data, out, *extra, fixed_size: bool = True, **kw) -> dict:
    return train(build_parser().parse_args(argv(tiny_root, data, out, *extra, fixed_size=fixed_size)), **kw)


def fresh_pipe(tiny_root) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(tiny_root / f)) for f in MODEL_FILES])


@torch.no_grad()
def evaluate(pipe, image: Image.Image, prompt: str) -> tuple[float, float]:
    """(flow-matching loss at 8 fixed noise levels/noises, MSE of a generated latent to the image's latent)."""
    image = crop_resize(image, 64, 64)
    shared = dict(input_image=image, height=64, width=64, seed=0, sigmas=torch.ones(1), embedded_guidance=1.0,
                  t5_sequence_length=32)
    posi = {"prompt": prompt}
    units = active_units(pipe, pipe.units)  # the preprocessing units (the variants' step units run in model_fn)
    run_units(pipe, units, shared, posi, {}, False)
    x0, g, losses = shared["input_latents"], torch.Generator().manual_seed(0), []
    for sigma in torch.linspace(0.1, 0.9, 8):
        noise = torch.randn(x0.shape, generator=g)
        pred = model_fn(pipe.in_loop_models(), **pipe.model_inputs(units, {**shared, **posi}),
                        latents=(1 - sigma) * x0 + sigma * noise, timestep=sigma.view(1))
        losses.append(((pred - (noise - x0)) ** 2).mean().item())
    generated = pipe(prompt, height=64, width=64, seed=1, num_inference_steps=8, embedded_guidance=1.0,
                     t5_sequence_length=32, output_type="latent", progress_bar_cmd=lambda x: x)
    return sum(losses) / len(losses), ((generated - x0) ** 2).mean().item()


@torch.no_grad()
def dit_output(dit, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 32, generator=g)
    return dit(img, image_ids(8, 8, 1), txt, torch.zeros(1, 7, 3), torch.tensor([0.6]),
               torch.randn(1, 32, generator=g), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- learning

def test_lora_training_learns_the_training_image(tiny_root, data, tmp_path):
    """DiffSynth-Studio's LoRA arguments verbatim; 80 steps on one image; the LoRA file loads with pipe.load_lora."""
    image = Image.open(data / "cat.png")
    before = evaluate(fresh_pipe(tiny_root), image, "a red cat")
    result = run(tiny_root, data, tmp_path / "out", "--dataset_metadata_path", str(data / "one.jsonl"),
                 "--dataset_repeat", "80", "--learning_rate", "1e-2", "--cache_dir", str(tmp_path / "cache"),
                 *STUDIO_LORA)
    assert result["steps"] == 80 and result["files"] == [str(tmp_path / "out" / "epoch-0.safetensors")]
    sd = load_file(tmp_path / "out" / "epoch-0.safetensors")
    assert "blocks.0.attn.a_to_qkv.lora_A.default.weight" in sd and "single_blocks.1.to_qkv_mlp.lora_B.default.weight" in sd
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in sd)
    assert len(sd) == 2 * (2 * 10 + 2 * 3)  # 10 targeted linears per double block, 3 per single block

    pipe = fresh_pipe(tiny_root)
    pipe.load_lora(pipe.dit, str(tmp_path / "out" / "epoch-0.safetensors"), alpha=1)  # validate_lora flow
    after = evaluate(pipe, image, "a red cat")
    print(f"fixed-noise loss {before[0]:.4f} -> {after[0]:.4f}; generated-latent MSE {before[1]:.4f} -> {after[1]:.4f}")
    assert after[0] < 0.85 * before[0]
    assert after[1] < 0.9 * before[1]


def test_cache_gives_the_same_training_as_encoding_every_step(tiny_root, data, tmp_path):
    """The uncached path (units run on every image) and the disk cache train identically."""
    common = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2", "--dataset_repeat", "2")
    plain = run(tiny_root, data, tmp_path / "plain", *common)
    cached = run(tiny_root, data, tmp_path / "cached", *common, "--cache_dir", str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert plain["steps"] == cached["steps"] == 4
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    a, b = load_file(tmp_path / "plain" / "epoch-0.safetensors"), load_file(tmp_path / "cached" / "epoch-0.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_full_training_checkpoint_loads_back_and_reproduces_the_model(tiny_root, data, tmp_path):
    common = ("--trainable_models", "dit", "--remove_prefix_in_ckpt", "pipe.dit.", "--learning_rate", "1e-3",
              "--cache_dir", str(tmp_path / "cache"))
    result = run(tiny_root, data, tmp_path / "out", *common)
    with safe_open(str(tmp_path / "out" / "epoch-0.safetensors"), "pt") as f:  # no LoRA fields: none trained
        info = json.loads(f.metadata()["diffsynth_training"])
    assert info["trainable_models"] == ["dit"] and not [k for k in info if k.startswith("lora")]
    expected = dit_output(result["module"].pipe.dit)
    pipe = fresh_pipe(tiny_root)
    base = dit_output(pipe.dit)
    pipe.dit.load_state_dict(load_state_dict(str(tmp_path / "out" / "epoch-0.safetensors")))  # validate_full flow
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(dit_output(pipe.dit), expected, rtol=0, atol=0)

    # --full_format bfl: original FLUX key names, a DiT checkpoint the loader takes in place of flux1-dev
    run(tiny_root, data, tmp_path / "bfl", *common, "--full_format", "bfl")
    path = tmp_path / "bfl" / "epoch-0.safetensors"
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(path)
    configs = [ModelConfig(path=str(path))] + [ModelConfig(path=str(tiny_root / f)) for f in MODEL_FILES[1:]]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs)
    torch.testing.assert_close(dit_output(pipe.dit), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- resume

class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights(tiny_root, data, tmp_path):
    common = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2", "--dataset_repeat", "2",
              "--num_epochs", "2", "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
              "--ema_decay", "0.8", "--cache_dir", str(tmp_path / "cache"), "--deterministic")
    whole = run(tiny_root, data, tmp_path / "whole", *common)
    assert whole["steps"] == 8

    def crash(step, loss):
        if step == 7:
            raise Crash()

    with pytest.raises(Crash):
        run(tiny_root, data, tmp_path / "cut", *common, step_callback=crash)
    assert resolve_resume(tmp_path / "cut" / "checkpoints", "latest").name == "step-6"  # mid-epoch 1
    resumed = run(tiny_root, data, tmp_path / "cut", *common, "--resume_from_checkpoint", "latest")
    assert resumed["steps"] == 8 and len(resumed["losses"]) == 2
    assert resumed["losses"] == whole["losses"][6:]
    assert not torch.are_deterministic_algorithms_enabled()  # --deterministic ends with its run
    diff = 0.0
    for name in ("epoch-1.safetensors", "epoch-1-ema.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        diff = max(diff, max((a[k] - b[k]).abs().max().item() for k in a))
    print(f"resume max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.is_dir()] == ["step-8"]


def test_a_failed_checkpoint_write_leaves_latest_usable(tiny_root, data, tmp_path, monkeypatch):
    from diffsynth.training import checkpoint
    real, calls = checkpoint.save_file, []

    def flaky(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies half-written
            Path(path).write_bytes(b"partial")
            raise Crash()
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    common = ("--lora_base_model", "dit", "--lora_rank", "4", "--checkpointing_steps", "1", "--cache_dir",
              str(tmp_path / "cache"))
    with pytest.raises(Crash):
        run(tiny_root, data, tmp_path / "out", *common)
    root = tmp_path / "out" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-1"
    assert resolve_resume(root, "latest") == root / "step-1" and not (root / "step-2").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    resumed = run(tiny_root, data, tmp_path / "out", *common, "--resume_from_checkpoint", "latest")
    assert resumed["steps"] == 2 and len(resumed["losses"]) == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]


# ----------------------------------------------------------------------------- formats and processes

def test_kohya_output_loads_in_diffusers_with_the_same_dit_output(tiny_root, data, tmp_path):
    """diffusers' kohya reader hard-codes FLUX.1's 3072/12288 split of single-block linear1, so this tiny-model
    comparison leaves to_qkv_mlp out of the targets (our own reader handles it: see the LoRA test above)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffsynth.testing.tiny import _diffusers_dit_config, bfl_to_diffusers_dit, tiny_dit_state_dict
    targets = STUDIO_TARGETS.replace(",to_qkv_mlp", "")
    result = run(tiny_root, data, tmp_path / "out", "--lora_base_model", "dit", "--lora_target_modules", targets,
                 "--lora_rank", "4", "--learning_rate", "2e-2", "--remove_prefix_in_ckpt", "pipe.dit.",
                 "--align_to_opensource_format", "--cache_dir", str(tmp_path / "cache"))
    path = tmp_path / "out" / "epoch-0.safetensors"
    sd = load_file(path)
    assert all(k.startswith("lora_unet_") for k in sd) and sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"] == 4
    ours = dit_output(result["module"].pipe.dit)

    config = {k: v for k, v in _diffusers_dit_config(True).items() if not k.startswith("_")}
    transformer = FluxTransformer2DModel(**config).eval()
    transformer.load_state_dict(bfl_to_diffusers_dit(tiny_dit_state_dict(0, True)))
    g = torch.Generator().manual_seed(3)
    img, txt, pooled = (torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 32, generator=g),
                        torch.randn(1, 32, generator=g))  # the same draws as dit_output()

    def diffusers_out():
        with torch.no_grad():
            return transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,
                               timestep=torch.tensor([0.6]), img_ids=image_ids(8, 8, 1)[0], txt_ids=torch.zeros(7, 3),
                               guidance=torch.tensor([1.0]), return_dict=False)[0]

    base = diffusers_out()
    transformer.load_lora_adapter(FluxPipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="t")
    got = diffusers_out()
    assert (got - base).abs().max() > 1e-4  # the LoRA took effect
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)
    pipe = fresh_pipe(tiny_root)  # and our loader reads the kohya file back to the same model
    pipe.load_lora(pipe.dit, str(path), alpha=1)
    torch.testing.assert_close(dit_output(pipe.dit), ours, rtol=1e-5, atol=1e-5)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_save_once(tiny_root, data, tmp_path):
    """DDP over gloo on CPU. accelerate 1.x's `launch --cpu --num_processes 2` starts a single process unless MPI
    is configured, so the CPU run uses the multi-process launcher (which uses gloo when CUDA is absent)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "examples/flux/model_training/train.py"),
           *argv(tiny_root, data, tmp_path / "out", *STUDIO_LORA[:2], "--lora_rank", "4", "--dataset_repeat", "2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 process(es)" in log and log.count("saved ") == 1, log[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "epoch-0.safetensors"]
    ckpt = out / "checkpoints" / "step-2"  # 4 batches over 2 processes
    assert {"rng-0.pt", "rng-1.pt", "trainable.safetensors", "state.json"} <= {p.name for p in ckpt.iterdir()}


# ----------------------------------------------------------------------------- extras

def test_buckets_batches_ema_validation_and_samplers(tiny_root, data, tmp_path):
    result = run(tiny_root, data, tmp_path / "out", "--dataset_metadata_path",
                 str(data / "three.json"), "--max_pixels", str(64 * 64), "--batch_size", "2", "--bucket_step", "16",
                 "--lora_base_model", "dit", "--lora_rank", "4", "--timestep_sampling", "flux_shift",
                 "--ema_decay", "0.9", "--validation_prompts", "a cat,a dog", "--validation_steps", "2",
                 "--validation_inference_steps", "2", "--save_steps", "1", "--lr_scheduler", "linear", fixed_size=False)
    # dog (96x64) and wide (96x48) share the 80x48 bucket, cat (64x96) goes to 48x80: batches of 2 and 1
    assert result["steps"] == result["steps_per_epoch"] == 2
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoints", "epoch-0-ema.safetensors", "epoch-0.safetensors", "step-1-ema.safetensors",
                     "step-1.safetensors", "step-2-ema.safetensors", "step-2.safetensors", "validation"]
    pngs = sorted(p.name for p in (out / "validation").iterdir())
    assert pngs == ["step-2-0.png", "step-2-1.png"] and Image.open(out / "validation" / pngs[0]).size == (64, 64)


@pytest.mark.parametrize("sampling", ["shifted_uniform", "logit_normal"])
def test_gradient_checkpointing_and_accumulation(tiny_root, data, tmp_path, sampling):
    """Checkpointing (with offload) recomputes activations: the same seeded run without it gives the same losses
    and the same trained LoRA."""
    common = ("--lora_base_model", "dit", "--lora_rank", "4", "--gradient_accumulation_steps", "2",
              "--dataset_repeat", "2", "--timestep_sampling", sampling)
    result = run(tiny_root, data, tmp_path / "out", *common, "--use_gradient_checkpointing_offload",
                 "--cache_dir", str(tmp_path / "cache"))
    assert result["module"].pipe.dit.gradient_checkpointing
    plain = run(tiny_root, data, tmp_path / "plain", *common, "--cache_dir", str(tmp_path / "cache"))
    assert not plain["module"].pipe.dit.gradient_checkpointing
    assert result["steps"] == plain["steps"] == 2 and len(result["losses"]) == 2
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    trained = {n: p for n, p in result["module"].named_parameters() if p.requires_grad}
    reference = {n: p for n, p in plain["module"].named_parameters() if p.requires_grad}
    assert trained.keys() == reference.keys() and trained
    for name, p in trained.items():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero: it trained


# ----------------------------------------------------------------------------- errors before training

def test_bad_rows_are_all_reported_before_any_model_loads(tiny_root, data, tmp_path, monkeypatch):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("hi")
    rows = [{"image": "ok.png", "prompt": "fine"}, {"image": "missing.png", "prompt": "x"},
            {"image": "../escape.png", "prompt": "x"}, {"image": "broken.png", "prompt": "x"},
            {"image": "ok.png"}, {"image": "notes.txt", "prompt": "x"}]
    (tmp_path / "meta.json").write_text(json.dumps(rows))
    monkeypatch.setattr(trainer_module, "load_pipeline", lambda *a: pytest.fail("models loaded before validation"))
    with pytest.raises(DatasetError) as e:
        run(tiny_root, tmp_path, tmp_path / "out", "--dataset_metadata_path", str(tmp_path / "meta.json"),
            "--lora_base_model", "dit")
    msg = str(e.value)
    print(msg)
    assert "5 of 6 rows" in msg
    for row, what in ((2, "does not exist"), (3, "outside --dataset_base_path"), (4, "cannot be read as an image"),
                      (5, "no 'prompt'"), (6, "not a jpg/jpeg/png/webp image")):
        assert f"row {row}: " in msg and what in msg.split(f"row {row}: ")[1].split("\n")[0]
    assert not (tmp_path / "out").exists()


def test_bad_arguments_give_one_clear_error(tiny_root, data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_pipeline", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(ValueError) as e:
        run(tiny_root, data, tmp_path / "out", "--height", "60", "--num_epochs", "0",
            "--validation_steps", "5", "--align_to_opensource_format", "--trainable_models", "dit", fixed_size=False)
    msg = str(e.value)
    for part in ("--height and --width go together", "--height must be a positive multiple of 16",
                 "--num_epochs must be >= 1", "--validation_steps needs --validation_prompts",
                 "is for LoRA training of the DiT"):
        assert part in msg, msg
    with pytest.raises(ValueError, match="nothing to train"):
        run(tiny_root, data, tmp_path / "out")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="install tensorboard"):
            run(tiny_root, data, tmp_path / "out", "--lora_base_model", "dit", "--report_to", "tensorboard")
    with pytest.raises(ValueError, match="--full_format bfl is for full training of the DiT"):
        run(tiny_root, data, tmp_path / "out", "--lora_base_model", "dit", "--full_format", "bfl")


def test_model_dependent_arguments_are_checked_before_training(tiny_root, data, tmp_path):
    with pytest.raises(ValueError, match=r"\['to_q'\] match no linear layer; valid names: .*a_to_qkv"):
        run(tiny_root, data, tmp_path / "out", "--lora_base_model", "dit", "--lora_target_modules", "a_to_qkv,to_q")
    with pytest.raises(ValueError, match="'unet' is not a trainable model of the pipeline; loaded models: dit, vae_encoder, vae_decoder, text_encoder_1"):
        run(tiny_root, data, tmp_path / "out", "--trainable_models", "unet")
    (tmp_path / "k.csv").write_text("image,prompt,style_image\ncat.png,a cat,dog.jpg\n")
    with pytest.raises(ValueError, match="style_image.*not inputs of any unit"):
        run(tiny_root, data, tmp_path / "out", "--lora_base_model", "dit", "--extra_inputs", "style_image",
            "--data_file_keys", "image,style_image", "--dataset_metadata_path", str(tmp_path / "k.csv"))
    assert not (tmp_path / "out").exists()


def test_cli_train_subcommand(tiny_root, data, tmp_path, capsys, monkeypatch):
    """`diffsynth train` has every DiffSynth-Studio argument; its --model_id_with_origin_paths form works verbatim with
    the files already under ./models (no download)."""
    from diffsynth.cli import build_parser as cli_parser, main
    help_text = cli_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for arg in ("dataset_base_path", "dataset_metadata_path", "max_pixels", "height", "width", "data_file_keys",
                "dataset_repeat", "model_paths", "model_id_with_origin_paths", "learning_rate", "num_epochs",
                "output_path", "remove_prefix_in_ckpt", "trainable_models", "lora_base_model", "lora_target_modules",
                "lora_rank", "extra_inputs", "use_gradient_checkpointing", "use_gradient_checkpointing_offload",
                "gradient_accumulation_steps", "align_to_opensource_format", "save_steps", "lora_checkpoint",
                "weight_decay", "seed", "dataset_num_workers", "resume_from_checkpoint"):
        assert f"--{arg}" in help_text
    assert main(["train", *argv(tiny_root, data, tmp_path / "out"), "--height", "8"]) == 1
    assert "--height must be a positive multiple of 16" in capsys.readouterr().err

    (tmp_path / "models" / "black-forest-labs").mkdir(parents=True)
    (tmp_path / "models" / "black-forest-labs" / "FLUX.1-dev").symlink_to(tiny_root)
    monkeypatch.chdir(tmp_path)
    repo = "black-forest-labs/FLUX.1-dev"
    models = ",".join(f"{repo}:{f}" for f in MODEL_FILES)
    assert main(["train", "--dataset_base_path", str(data), "--model_id_with_origin_paths", models,
                 "--height", "64", "--width", "64", "--output_path", "out", "--t5_sequence_length", "32",
                 "--report_to", "none", "--max_steps", "1", "--dataset_num_workers", "1", *STUDIO_LORA]) == 0
    assert (tmp_path / "out" / "step-1.safetensors").is_file()


def test_example_scripts_parse(tmp_path):
    """Every shell script's train.py arguments pass the argument checks; the validation scripts compile."""
    import py_compile
    import shlex
    from diffsynth.training import check_args
    folder = ROOT / "examples/flux/model_training"
    scripts = sorted(folder.glob("lora/*.sh")) + sorted(folder.glob("full/*.sh"))
    assert len(scripts) >= 4
    for script in scripts:
        words = shlex.split(script.read_text().replace("\\\n", " "), comments=True)
        args = check_args(build_parser().parse_args(words[words.index("examples/flux/model_training/train.py") + 1:]))
        trained = args.lora_base_model or args.trainable_models[0]
        prefix = "pipe.controlnet.0." if trained == "controlnet" else f"pipe.{trained}."  # full ControlNet
        if not args.lora_base_model and len(args.trainable_models) > 1:  # InfiniteYou: InfuseNet + projector
            prefix = "pipe."
        assert args.remove_prefix_in_ckpt == prefix
        assert (args.lora_format == "kohya") == ("lora" in script.parts)
        if "--config_file" in words:
            assert (ROOT / words[words.index("--config_file") + 1]).is_file()
    for py in sorted(folder.glob("validate_*/*.py")) + [folder / "train.py"]:
        py_compile.compile(str(py), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_lora_checkpoint_warm_start(tiny_root, data, tmp_path):
    """--lora_checkpoint reads our own files and kohya files into the injected LoRA; a wrong rank is an error."""
    from diffsynth.training.export import save_output
    from diffsynth.training.module import FluxTrainingModule
    first = run(tiny_root, data, tmp_path / "a", "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate",
                "1e-2", "--max_steps", "1", "--cache_dir", str(tmp_path / "cache"))
    trained = first["module"].trainable_state_dict()
    save_output(trained, str(tmp_path / "kohya.safetensors"), "pipe.dit.", "kohya", "diffsynth", None)
    for path in (first["files"][0], str(tmp_path / "kohya.safetensors")):
        module = FluxTrainingModule(fresh_pipe(tiny_root), lora_base_model="dit",
                                    lora_target_modules=STUDIO_TARGETS.split(","), lora_rank=4, lora_checkpoint=path)
        loaded = module.trainable_state_dict()
        assert loaded.keys() == trained.keys()
        assert max((loaded[k] - trained[k]).abs().max().item() for k in trained) < 1e-7
    with pytest.raises(ValueError, match="does not fit --lora_rank 8"):
        FluxTrainingModule(fresh_pipe(tiny_root), lora_base_model="dit", lora_target_modules=STUDIO_TARGETS.split(","),
                           lora_rank=8, lora_checkpoint=first["files"][0])


def test_output_header_records_only_what_was_trained():
    from argparse import Namespace
    from diffsynth.training.export import training_info
    run_args = dict(trainable_models=[], lora_base_model=None, lora_rank=32, lora_target_modules=["a_to_qkv"],
                    lora_format="diffsynth", full_format="bfl", learning_rate=1e-4, guidance=1.0)
    full = training_info(Namespace(**{**run_args, "trainable_models": ["dit"]}))
    assert full == {"trainable_models": ["dit"], "learning_rate": 1e-4, "guidance": 1.0, "full_format": "bfl"}
    lora = training_info(Namespace(**{**run_args, "lora_base_model": "dit"}))
    assert lora["lora_rank"] == 32 and lora["lora_target_modules"] == ["a_to_qkv"] and "full_format" not in lora


@pytest.mark.parametrize("extra_inputs, freed", [
    ((), ["text_encoder_1", "text_encoder_2", "vae_decoder", "vae_encoder"]),
    (("kontext_images",), ["text_encoder_1", "text_encoder_2", "vae_decoder"]),
    # controlnet_image -> controlnet_inputs (one unit) -> control latents (the next): the chain keeps the encoder
    (("controlnet_image",), ["text_encoder_1", "text_encoder_2", "vae_decoder"]),
    (("eligen_entity_prompts", "eligen_entity_masks"), ["text_encoder_1", "vae_decoder", "vae_encoder"]),
])
def test_models_freed_after_caching_are_those_no_running_unit_reads(tiny_configs, extra_inputs, freed):
    from diffsynth.training.module import FluxTrainingModule
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=tiny_configs())
    module = FluxTrainingModule(pipe, trainable_models=["dit"], extra_inputs=extra_inputs)
    assert module.models_unused_with_cache() == freed


@pytest.mark.parametrize("prefix, want", [
    ("pipe.", {"controlnet.models.0.controlnet_blocks.0.weight", "controlnet.models.1.x", "image_proj_model.proj.weight"}),
    ("pipe.controlnet.0.", {"controlnet_blocks.0.weight", "pipe.controlnet.1.x", "pipe.image_proj_model.proj.weight"}),
])
def test_saved_list_entries_have_diffsynth_studio_names(tmp_path, prefix, want):
    """What DiffSynth-Studio's validate scripts read: `controlnet.models.0.*` (its MultiControlNet path)."""
    from diffsynth.training.export import save_output
    sd = {k: torch.ones(1) for k in ("pipe.controlnet.0.controlnet_blocks.0.weight", "pipe.controlnet.1.x",
                                     "pipe.image_proj_model.proj.weight")}
    save_output(sd, str(tmp_path / "out.safetensors"), prefix, "diffsynth", "diffsynth", None)
    assert set(load_file(tmp_path / "out.safetensors")) == want
