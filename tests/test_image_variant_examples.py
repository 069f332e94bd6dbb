"""The Kontext / FLEX.2 / Fill / Canny / Depth example scripts run unchanged on tiny models, and their
training scripts' commands train (one step, LoRA and full) with the variants' dataset columns."""
import json
import os
import shutil
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.training import build_parser, train
from diffsynth.testing.tiny_image import build_tiny_variant, record_dit_calls
from example_harness import ROOT, run_example

TRAINING = ROOT / "examples/flux/model_training"
MODEL_IDS = {"black-forest-labs/FLUX.1-Kontext-dev": "kontext", "ostris/Flex.2-preview": "flex",
             "black-forest-labs/FLUX.1-Fill-dev": "fill", "black-forest-labs/FLUX.1-Canny-dev": "canny",
             "black-forest-labs/FLUX.1-Depth-dev": "depth"}


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def models(tiny_root, tmp_path_factory):
    """{model_id: tiny folder} for every model id the scripts name; DIFFSYNTH_EXAMPLE_MODELS (a JSON object
    {model_id: folder}) points some of them elsewhere, e.g. at other small checkpoints."""
    root = tmp_path_factory.mktemp("variant_models")
    out = {"black-forest-labs/FLUX.1-dev": tiny_root}
    for model_id, variant in MODEL_IDS.items():
        out[model_id] = build_tiny_variant(root / variant, variant)
    out.update({k: Path(v) for k, v in json.loads(os.environ.get("DIFFSYNTH_EXAMPLE_MODELS", "{}")).items()})
    return out


def picture(width=64, height=64, phase=0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 4 + phase) % 256, (y * 3 + 2 * phase) % 256, ((x + y) * 2) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def dataset(folder: Path) -> Path:
    """The example dataset's layout: images, metadata.csv, metadata_kontext.csv, FLEX/Fill columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        picture(64, 64, 40 * i).save(folder / f"{i}.jpg")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / "mask.png")
    (folder / "metadata.csv").write_text("image,prompt\n0.jpg,a cat\n1.jpg,a dog\n")
    (folder / "metadata_kontext.csv").write_text("image,prompt,kontext_images\n1.jpg,make it red,0.jpg\n")
    (folder / "metadata_flex.csv").write_text(
        "image,prompt,flex_inpaint_image,flex_inpaint_mask,flex_control_image,flex_control_strength\n"
        "1.jpg,a dog,0.jpg,mask.png,2.jpg,0.7\n")
    return folder


# ----------------------------------------------------------------------------- inference scripts

@pytest.mark.parametrize("script", [f"{folder}/{row}.py" for row in ("FLUX.1-Kontext-dev", "FLEX.2-preview")
                                    for folder in ("model_inference", "model_inference_low_vram")])
def test_spec_row_inference_examples(models, tmp_path, monkeypatch, script):
    run_example(script, tmp_path, monkeypatch, models)
    assert len(list(tmp_path.glob("image_*.jpg"))) >= 2


@pytest.mark.parametrize("variant", ["Fill", "Canny", "Depth"])
def test_fill_canny_depth_examples(models, tmp_path, monkeypatch, variant):
    (tmp_path / "FLUX.1-Fill-dev").mkdir()
    picture(64, 96).save(tmp_path / "FLUX.1-Fill-dev/cup.png")
    mask = Image.new("L", (64, 96))
    mask.paste(255, (8, 8, 40, 60))
    mask.save(tmp_path / "FLUX.1-Fill-dev/cup_mask.png")
    dataset(tmp_path / "data/example_image_dataset")
    picture(64, 64, 90).convert("L").save(tmp_path / "depth.png")
    run_example(f"model_inference/FLUX.1-{variant}-dev.py", tmp_path, monkeypatch, models)
    assert (tmp_path / f"image_FLUX.1-{variant}-dev.jpg").is_file()


# ----------------------------------------------------------------------------- training scripts

def script_args(name: str, kind: str, models: dict, data: Path, out: Path, *extra: str) -> list[str]:
    """The shell script's train.py arguments, with the dataset, models and output made local and tiny."""
    words = shlex.split((TRAINING / kind / f"{name}.sh").read_text().replace("\\\n", " "), comments=True)
    args = words[words.index("examples/flux/model_training/train.py") + 1:]
    values, flags = {}, []
    for i, a in enumerate(args):
        if a.startswith("--"):
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                values[a] = args[i + 1]
            else:
                flags.append(a)
    paths = []
    for item in values.pop("--model_id_with_origin_paths").split(","):
        model_id, pattern = item.split(":")
        paths.append(str(Path(models[model_id]) / pattern))
    metadata = Path(values["--dataset_metadata_path"]).name
    values.update({"--dataset_base_path": str(data), "--dataset_metadata_path": str(data / metadata),
                   "--model_paths": json.dumps(paths), "--output_path": str(out), "--max_steps": "1",
                   "--height": "64", "--width": "64", "--t5_sequence_length": "16", "--report_to": "none",
                   "--lora_rank": "4"})
    values.pop("--max_pixels")
    return [*[x for kv in values.items() for x in kv], *flags, *extra]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_kontext_training_commands_train_and_validate(models, tmp_path, monkeypatch, kind):
    data = dataset(tmp_path / "data/example_image_dataset")
    out = tmp_path / f"models/train/FLUX.1-Kontext-dev_{kind}"
    seen = record_dit_calls(monkeypatch, passthrough=True)
    result = train(build_parser().parse_args(script_args("FLUX.1-Kontext-dev", kind, models, data, out)))
    assert result["steps"] == 1 and np.isfinite(result["losses"]).all()
    (tokens, ids), = seen[0].ref  # the dataset's reference image, as Kontext tokens
    assert tokens.shape == (1, 16, 64) and torch.all(ids[..., 0] == 1)
    monkeypatch.undo()
    target = out / ("epoch-4.safetensors" if kind == "lora" else "epoch-0.safetensors")
    if Path(result["files"][0]) != target:
        shutil.copy(result["files"][0], target)
    picture(64, 64).save(data / "2.jpg")
    run_example(f"model_training/validate_{kind}/FLUX.1-Kontext-dev.py", tmp_path, monkeypatch, models)
    assert (tmp_path / f"image_FLUX.1-Kontext-dev_{kind}.jpg").is_file()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_flex_training_with_condition_columns(models, tmp_path, monkeypatch, kind):
    data = dataset(tmp_path / "data/example_image_dataset")
    out = tmp_path / f"models/train/FLEX.2-preview_{kind}"
    extra = ["--dataset_metadata_path", str(data / "metadata_flex.csv"), "--extra_inputs",
             "flex_inpaint_image,flex_inpaint_mask,flex_control_image,flex_control_strength"]
    args = build_parser().parse_args(script_args("FLEX.2-preview", kind, models, data, out, *extra))
    seen = record_dit_calls(monkeypatch, passthrough=True)
    result = train(args)
    assert result["steps"] == 1 and np.isfinite(result["losses"]).all()
    (channels,) = seen[0].channels
    mask = channels[0, 16]
    assert 0 < mask.mean() < 1  # the dataset's mask, read as a grayscale image, not the all-ones default
    target = out / ("epoch-4.safetensors" if kind == "lora" else "epoch-0.safetensors")
    if Path(result["files"][0]) != target:
        shutil.copy(result["files"][0], target)
    monkeypatch.undo()
    run_example(f"model_training/validate_{kind}/FLEX.2-preview.py", tmp_path, monkeypatch, models)
    assert (tmp_path / f"image_FLEX.2-preview_{kind}.jpg").is_file()


def test_kontext_training_with_a_cache_keeps_only_the_models_it_still_reads(models, tmp_path, monkeypatch):
    """With --cache_dir the prompt and target latents come from the cache, so the text encoders and the VAE
    decoder are freed; the reference images are not cached, so the VAE encoder must stay."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline
    released = []
    monkeypatch.setattr(FluxImagePipeline, "release_model",
                        lambda pipe, name, original=FluxImagePipeline.release_model: (released.append(name),
                                                                                        original(pipe, name)))
    data = dataset(tmp_path / "data/example_image_dataset")
    out = tmp_path / "models/train/FLUX.1-Kontext-dev_lora"
    argv = script_args("FLUX.1-Kontext-dev", "lora", models, data, out, "--cache_dir", str(tmp_path / "cache"))
    result = train(build_parser().parse_args(argv))
    assert result["steps"] == 1 and np.isfinite(result["losses"]).all()
    assert released == ["text_encoder_1", "text_encoder_2", "vae_decoder"]
