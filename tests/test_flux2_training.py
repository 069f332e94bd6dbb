"""FLUX.2 training on the shared trainer: every example training script (LoRA and full, klein and klein-base;
FLUX.2-dev's LoRA) runs one real step on tiny models and its validate script loads the result; editing data
(`edit_image` column) trains; the loss goes down on a tiny dataset."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from example_harness import ROOT, link_model, run_example, train_script_one_step
from PIL import Image

from diffsynth import Flux2ImagePipeline, ModelConfig
from diffsynth.testing.tiny_flux2 import build_tiny_flux2, build_tiny_flux2_dev

EXAMPLES = ROOT / "examples" / "flux2"
# row -> single blocks its LoRA script names (klein 4B has 20, 9B 24)
ROWS = {"FLUX.2-klein-4B": 20, "FLUX.2-klein-9B": 24, "FLUX.2-klein-base-4B": 20, "FLUX.2-klein-base-9B": 24}

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein_train")
    return {(singles, base): build_tiny_flux2(root / f"{singles}-{base}", seed=int(base), distilled=not base,
                                              num_single_layers=singles)
            for singles in (20, 24) for base in (False, True)}


def models_for(row: str, folders) -> dict:
    singles, base = ROWS[row], "base" in row
    te = row.replace("base-", "")
    return {f"black-forest-labs/{te}": folders[(singles, False)], f"black-forest-labs/{row}": folders[(singles, base)]}


def pattern(width: int, height: int, phase: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([(x * 4 + phase) % 256, (y * 3 + phase) % 256, (x + y) % 256], -1).astype(np.uint8))


def write_dataset(folder, edit: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pattern(64, 64, 0).save(folder / "image_1.jpg")
    pattern(64, 64, 90).save(folder / "edit_1.jpg")
    # (the 1-megapixel auto-resize of reference images, on by default as in DiffSynth-Studio 2.0, is too slow here)
    rows = [{"image": "image_1.jpg", "prompt": "a dog",
             **({"edit_image": ["edit_1.jpg"], "edit_image_auto_resize": False} if edit else {})}]
    if edit:
        (folder / "metadata.json").write_text(json.dumps(rows))
    else:
        (folder / "metadata.csv").write_text("image,prompt\nimage_1.jpg,a dog\n")


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("row", list(ROWS))
def test_training_scripts_train_and_validate(row, kind, folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models_for(row, folders).items():
        link_model(tmp_path, model_id, folder)
    write_dataset(tmp_path / "data" / "diffsynth_example_dataset" / "flux2" / row)
    args, result, saved = train_script_one_step(EXAMPLES / "model_training" / kind / f"{row}.sh")
    assert result["steps"] == 1 and saved.is_file() and args.remove_prefix_in_ckpt == "pipe.dit."
    pipe = result["module"].pipe
    assert isinstance(pipe, Flux2ImagePipeline)
    from safetensors.torch import load_file
    trained = load_file(saved)
    if kind == "full":
        assert trained.keys() == pipe.dit.state_dict().keys()
        shutil.copy(saved, saved.parent / "epoch-1.safetensors")  # the validate script reads the 2-epoch file
    else:
        assert any("single_transformer_blocks.19.attn.to_out" in k for k in trained)
        shutil.copy(saved, saved.parent / "epoch-4.safetensors")  # ... the 5-epoch one
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * 1024**3, 8 * 1024**3))
    run_example(f"model_training/validate_{kind}/{row}.py", tmp_path, monkeypatch, models_for(row, folders),
                pipeline=Flux2ImagePipeline, examples=EXAMPLES)
    assert (tmp_path / f"image_{row}_{kind}.jpg").is_file()


def test_dev_lora_script_trains_from_its_cache_and_validates(tmp_path_factory, tmp_path, monkeypatch):
    """FLUX.2-dev's LoRA script (2.0's two commands): --task sft:data_process runs the Mistral encoder and the VAE
    over the dataset, --task sft:train loads only the DiT and trains the LoRA on the 48 single blocks one step from
    that folder; validate_lora (2.0's model-level offload stages) loads it."""
    from test_flux2_examples import on_cpu
    dev = build_tiny_flux2_dev(tmp_path_factory.mktemp("dev_train") / "dev", num_single_layers=48)
    monkeypatch.chdir(tmp_path)
    link_model(tmp_path, "black-forest-labs/FLUX.2-dev", dev)
    write_dataset(tmp_path / "data" / "diffsynth_example_dataset" / "flux2" / "FLUX.2-dev")
    args, result, saved = train_script_one_step(EXAMPLES / "model_training" / "lora" / "FLUX.2-dev.sh")
    assert result["steps"] == 1 and saved.is_file() and args.task == "sft:train"
    pipe = result["module"].pipe
    assert pipe.text_encoder_mistral is None and pipe.vae_decoder is None  # not loaded by the training half
    assert (tmp_path / "models" / "train" / "FLUX.2-dev-LoRA-splited-cache" / "split_cache.json").is_file()
    from safetensors.torch import load_file
    assert any("single_transformer_blocks.47.attn.to_out" in k for k in load_file(saved))
    shutil.copy(saved, saved.parent / "epoch-4.safetensors")
    script = on_cpu(EXAMPLES / "model_training" / "validate_lora" / "FLUX.2-dev.py", tmp_path)
    scope = run_example(script.relative_to(tmp_path / "scripts"), tmp_path, monkeypatch,
                        {"black-forest-labs/FLUX.2-dev": dev}, pipeline=Flux2ImagePipeline,
                        examples=tmp_path / "scripts")
    assert (tmp_path / "image_FLUX.2-dev_lora.jpg").is_file() and scope["pipe"].text_encoder_mistral is not None


def test_split_training_script_trains(folders, tmp_path, monkeypatch):
    """2.0's special/split_training/FLUX.2-klein-base-4B_lora.sh: both commands run (encoders and VAE, then the
    DiT alone) and the LoRA is written."""
    row = "FLUX.2-klein-base-4B"
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models_for(row, folders).items():
        link_model(tmp_path, model_id, folder)
    write_dataset(tmp_path / "data" / "diffsynth_example_dataset" / "flux2" / row)
    args, result, saved = train_script_one_step(EXAMPLES / "model_training" / "special" / "split_training" /
                                                f"{row}_lora.sh")
    assert args.task == "sft:train" and result["steps"] == 1 and saved.is_file()
    assert result["module"].pipe.text_encoder_qwen3 is None


def test_editing_data_trains(folders, tmp_path, one_thread):
    """An `edit_image` column (a list of files) reaches the reference-image unit: the batch carries its tokens."""
    from diffsynth.training import build_parser, train
    root = folders[(20, False)]
    data = tmp_path / "data"
    write_dataset(data, edit=True)
    words = ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.json"),
             "--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image,edit_image_auto_resize", "--height", "64", "--width", "64",
             "--model_paths", json.dumps([str(root / "text_encoder"), str(root / "transformer"), str(root / "vae")]),
             "--output_path", str(tmp_path / "out"), "--lora_base_model", "dit", "--lora_target_modules",
             "to_q,to_k,to_v,to_qkv_mlp_proj", "--lora_rank", "8", "--dataset_repeat", "2", "--seed", "0",
             "--report_to", "none"]
    result = train(build_parser().parse_args(words))
    assert result["steps"] == 2 and all(np.isfinite(result["losses"]))
    module = result["module"]
    item = {"prompt": "a dog", "height": 64, "width": 64, "image": pattern(64, 64, 0),
            "edit_image": [pattern(64, 64, 90)], "edit_image_auto_resize": False}
    inputs = module.prepare_sample(item, seed=0)
    assert inputs["edit_latents"].shape == (1, 16, 128) and inputs["edit_ids"][0, :, 0].eq(10).all()


def test_lora_exports_and_warm_start_use_flux2_names(folders, tmp_path, one_thread):
    """--lora_format kohya / diffusers write FLUX.2's names (not FLUX.1's tables) and load back into the DiT
    with the same effect as the run's own file; --lora_checkpoint reads a FLUX.2 LoRA in any of them."""
    from diffsynth.training import build_parser, train
    root = folders[(20, False)]
    write_dataset(tmp_path / "data")

    def run(out: str, *extra: str) -> dict:
        words = ["--dataset_base_path", str(tmp_path / "data"), "--dataset_metadata_path",
                 str(tmp_path / "data" / "metadata.csv"), "--height", "64", "--width", "64",
                 "--model_paths", json.dumps([str(root / "text_encoder"), str(root / "transformer"), str(root / "vae")]),
                 "--output_path", str(tmp_path / out), "--lora_base_model", "dit", "--lora_target_modules",
                 "to_q,to_k,to_v,to_qkv_mlp_proj", "--lora_rank", "4", "--dataset_repeat", "1", "--seed", "0",
                 "--learning_rate", "1e-2", "--remove_prefix_in_ckpt", "pipe.dit.", "--report_to", "none", *extra]
        return train(build_parser().parse_args(words))

    run("ours")
    run("kohya", "--lora_format", "kohya")
    run("peft", "--lora_format", "diffusers")
    files = {f: tmp_path / f / "epoch-0.safetensors" for f in ("ours", "kohya", "peft")}
    from safetensors.torch import load_file
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in load_file(files["kohya"]))
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj")
               for k in load_file(files["peft"]))
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                              model_configs=[ModelConfig(path=str(root / "transformer"))])
    x = torch.randn(1, 16, pipe.dit.config.in_channels, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(1, 16, 4)
    ids[0, :, 2] = torch.arange(16) // 4
    ids[0, :, 3] = torch.arange(16) % 4
    txt = torch.randn(1, 8, pipe.dit.config.context_dim, generator=torch.Generator().manual_seed(1))
    txt_ids = torch.zeros(1, 8, 4)
    txt_ids[0, :, 3] = torch.arange(8)

    def velocity(lora=None) -> torch.Tensor:
        if lora is not None:
            pipe.load_lora(pipe.dit, str(lora), hotload=True)
        try:
            return pipe.dit(x, ids, txt, txt_ids, torch.tensor([0.5]))
        finally:
            pipe.clear_lora()

    base, ours = velocity(), velocity(files["ours"])
    assert (ours - base).abs().max() > 1e-4  # the trained LoRA changes the DiT
    for name in ("kohya", "peft"):
        torch.testing.assert_close(velocity(files[name]), ours, rtol=1e-4, atol=1e-5)
    result = run("warm", "--lora_checkpoint", str(files["peft"]))  # (kohya fuses q/k/v: rank 3r, another --lora_rank)
    assert result["steps"] == 1


@pytest.mark.slow  # 60 training steps, ~28 s
def test_lora_training_pulls_the_loss_down(folders, tmp_path, one_thread):
    """60 LoRA steps on one image: the flow-matching loss at fixed noises and noise levels falls (1.336 -> 1.203
    when written; the tiny klein-base learns slowly: a larger learning rate plateaus at 1.245). The untrained
    state is the same module with its LoRA B matrices zeroed (their initial value)."""
    from diffsynth.training import build_parser, train
    root = folders[(20, True)]
    write_dataset(tmp_path / "data")
    words = ["--dataset_base_path", str(tmp_path / "data"), "--dataset_metadata_path",
             str(tmp_path / "data" / "metadata.csv"), "--height", "64", "--width", "64",
             "--model_paths", json.dumps([str(root / "text_encoder"), str(root / "transformer"), str(root / "vae")]),
             "--output_path", str(tmp_path / "out"), "--lora_base_model", "dit", "--lora_target_modules",
             "to_q,to_k,to_v,to_out.0,to_qkv_mlp_proj,linear_in,linear_out", "--lora_rank", "8", "--dataset_repeat", "60",
             "--learning_rate", "3e-2", "--seed", "0", "--report_to", "none"]
    result = train(build_parser().parse_args(words))
    module = result["module"].eval()
    item = {"prompt": "a dog", "height": 64, "width": 64, "image": pattern(64, 64, 0)}

    @torch.no_grad()
    def fixed_loss() -> float:
        losses = []
        for seed, sigma in enumerate((0.2, 0.4, 0.6, 0.8)):
            module.sigma_sampler = lambda b, tokens, generator, s=sigma: (torch.full((b,), s), torch.ones(b))
            losses.append(module.loss(module.prepare_sample(item, seed=seed)).item())
        return sum(losses) / len(losses)

    after = fixed_loss()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.zero_()
    before = fixed_loss()
    print(f"fixed-noise loss {before:.4f} -> {after:.4f}")
    assert after < 0.96 * before


# ----------------------------------------------------------------------------- the FLUX.1 guarantees

def klein_words(root, data, out, *extra: str) -> list[str]:
    return ["--dataset_base_path", str(data), "--height", "64", "--width", "64",
            "--model_paths", json.dumps([str(root / "text_encoder"), str(root / "transformer"), str(root / "vae")]),
            "--output_path", str(out), "--lora_base_model", "dit", "--lora_target_modules",
            "to_q,to_k,to_v,to_qkv_mlp_proj", "--lora_rank", "4", "--learning_rate", "1e-2", "--seed", "0",
            "--report_to", "none", *extra]


def two_rows(folder, edit: bool) -> None:
    """Two rows; with `edit`, each with a reference image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, phase in enumerate((0, 60)):
        pattern(64, 64, phase).save(folder / f"image_{i}.png")
        pattern(64, 64, phase + 90).save(folder / f"edit_{i}.png")
        # (no 1-megapixel auto-resize of the reference: too slow here)
        rows.append({"image": f"image_{i}.png", "prompt": ("a dog", "a cat")[i], "edit_image_auto_resize": False,
                     **({"edit_image": [f"edit_{i}.png"]} if edit else {})})
    (folder / "metadata.json").write_text(json.dumps(rows))


EDIT = ("--data_file_keys", "image,edit_image", "--extra_inputs", "edit_image,edit_image_auto_resize")


@pytest.mark.parametrize("edit", [False, True], ids=["text-to-image", "editing"])
def test_cache_gives_the_same_training_as_encoding_every_step(folders, tmp_path, one_thread, edit):
    """The uncached path (units run on every image) and the disk cache (prompt embeddings, latents and, for
    editing rows, the reference tokens) train identically; the cache key follows the reference image."""
    from diffsynth.training import build_parser, train
    root, data = folders[(20, False)], tmp_path / "data"
    two_rows(data, edit)
    common = ("--dataset_repeat", "2", *(EDIT if edit else ()))
    plain = train(build_parser().parse_args(klein_words(root, data, tmp_path / "plain", *common)))
    cache = tmp_path / "cache"
    cached = train(build_parser().parse_args(klein_words(root, data, tmp_path / "cached", *common,
                                                         "--cache_dir", str(cache))))
    entries = sorted(cache.iterdir())
    assert len(entries) == 2 and plain["steps"] == cached["steps"] == 4
    from safetensors.torch import load_file
    stored = [set(load_file(e)) for e in entries]
    assert stored == 2 * [{"input_latents", "prompt_emb", *(("edit_latents", "edit_ids") if edit else ())}]
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    a, b = (load_file(tmp_path / d / "epoch-0.safetensors") for d in ("plain", "cached"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    flux2_grid = Flux2ImagePipeline.training_sigmas()
    assert torch.isin(cached["module"].sigma_sampler(64, 16, None)[0], flux2_grid).all()  # FLUX.2's grid
    if edit:  # another reference image: a new entry for that row, not the stale one
        pattern(64, 64, 200).save(data / "edit_0.png")
        train(build_parser().parse_args(klein_words(root, data, tmp_path / "again", *common, "--cache_dir", str(cache))))
        assert len(list(cache.iterdir())) == 3


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights(folders, tmp_path, one_thread):
    """Stopped after 3 of 4 steps (mid-epoch, checkpoint every 3 steps), resumed: the same losses and files as
    the uninterrupted run (LoRA, EMA, cosine LR, the cache, editing rows)."""
    from diffsynth.training import build_parser, train
    from diffsynth.training.checkpoint import resolve_resume
    root, data = folders[(20, True)], tmp_path / "data"
    two_rows(data, edit=True)
    common = ("--dataset_repeat", "2", "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps",
              "1", "--ema_decay", "0.8", "--cache_dir", str(tmp_path / "cache"), "--deterministic", *EDIT)
    whole = train(build_parser().parse_args(klein_words(root, data, tmp_path / "whole", *common)))
    assert whole["steps"] == 4

    def crash(step, loss):
        if step == 4:
            raise Crash()

    with pytest.raises(Crash):
        train(build_parser().parse_args(klein_words(root, data, tmp_path / "cut", *common)), step_callback=crash)
    assert resolve_resume(tmp_path / "cut" / "checkpoints", "latest").name == "step-3"
    resumed = train(build_parser().parse_args(klein_words(root, data, tmp_path / "cut", *common,
                                                          "--resume_from_checkpoint", "latest")))
    assert resumed["steps"] == 4 and resumed["losses"] == whole["losses"][3:]
    from safetensors.torch import load_file
    for name in ("epoch-0.safetensors", "epoch-0-ema.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.is_dir()] == ["step-4"]
