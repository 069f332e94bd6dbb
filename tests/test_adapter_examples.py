"""The IP-Adapter and EliGen example scripts and training commands, run on tiny models."""
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from example_harness import EXAMPLES, run_example
from diffsynth.testing.tiny_adapters import (build_tiny_siglip, write_tiny_instantx_ipadapter, write_tiny_lora_encoder,
                                             write_tiny_lora_patcher, write_tiny_value_controller)
from diffsynth.training import build_parser, check_args, train

SCRIPTS = EXAMPLES / "model_training"


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def models(tiny_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter_models")
    write_tiny_instantx_ipadapter(d / "ipadapter" / "ip-adapter.bin")
    eligen = d / "eligen"
    eligen.mkdir()
    write_tiny_dit_lora(tiny_root / "flux1-dev.safetensors", eligen / "model_bf16.safetensors")
    folders = {name: d / name.replace("/", "--") for name in (
        "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", "VoidOc/flux_animal_forest1", "DiffSynth-Studio/AttriCtrl-FLUX.1-Dev",
        "DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev", "cancel13/cxsk", "DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1")}
    for folder in folders.values():
        (folder / "models").mkdir(parents=True)
    write_tiny_lora_encoder(folders["DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev"] / "model.safetensors")
    write_tiny_dit_lora(tiny_root / "flux1-dev.safetensors", folders["VoidOc/flux_animal_forest1"] / "20.safetensors")
    write_tiny_value_controller(folders["DiffSynth-Studio/AttriCtrl-FLUX.1-Dev"] / "models/brightness.safetensors")
    write_tiny_lora_patcher(folders["DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev"] / "model.safetensors")
    write_tiny_dit_lora(tiny_root / "flux1-dev.safetensors", folders["cancel13/cxsk"] / "30.safetensors")
    write_tiny_dit_lora(tiny_root / "flux1-dev.safetensors",
                        folders["DiffSynth-Studio/ArtAug-lora-FLUX.1dev-v1"] / "merged_lora.safetensors")
    return {"black-forest-labs/FLUX.1-dev": tiny_root, "InstantX/FLUX.1-dev-IP-Adapter": d / "ipadapter",
            "google/siglip-so400m-patch14-384": build_tiny_siglip(d / "siglip"), "DiffSynth-Studio/Eligen": eligen,
            **folders}


def write_tiny_dit_lora(dit_file, path):
    from test_cli import write_tiny_lora
    return write_tiny_lora(dit_file, path)


def _box_mask(path: Path, box, size=(64, 64)):
    a = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _pattern(path: Path, phase: int = 0, size=(64, 64)):
    y, x = np.mgrid[0:size[1], 0:size[0]]
    rgb = np.stack([(x * 4 + phase) % 256, (y * 3 + phase) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _eligen_masks(root: Path, counts: dict[int, int]):
    for example, n in counts.items():
        for i in range(n):
            _box_mask(root / f"example_{example}" / f"{i}.png", (8 * i, 0, 8 * i + 24, 48))


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
def test_ipadapter_inference_examples(folder, tmp_path, monkeypatch, models):
    run_example(f"{folder}/FLUX.1-dev-IP-Adapter.py", tmp_path, monkeypatch, models)
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"style image.jpg", "A piggy.jpg"}


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
def test_eligen_inference_examples(folder, tmp_path, monkeypatch, models):
    _eligen_masks(tmp_path / "data/examples/eligen/entity_control", {1: 6, 4: 4})
    run_example(f"{folder}/FLUX.1-dev-EliGen.py", tmp_path, monkeypatch, models)
    assert {p.name for p in tmp_path.glob("*.png")} >= {"eligen_example_1_0.png", "eligen_example_4_mask_21.png"}


@pytest.mark.parametrize("script, outputs", [
    ("model_inference/FLUX.1-dev-LoRA-Encoder.py", 6), ("model_inference_low_vram/FLUX.1-dev-LoRA-Encoder.py", 6),
    ("model_inference/FLUX.1-dev-LoRA-Fusion.py", 1), ("model_inference/FLUX.1-dev-AttriCtrl.py", 5)])
def test_prompt_token_and_fusion_examples(script, outputs, tmp_path, monkeypatch, models):
    run_example(script, tmp_path, monkeypatch, models)
    assert len(list(tmp_path.glob("*.jpg"))) == outputs


def _script_args(script: Path, **paths) -> list[str]:
    """The train.py arguments of a shell script, with the dataset/model/output paths swapped for local ones."""
    words = shlex.split(script.read_text().replace("\\\n", " "), comments=True)
    words = words[words.index("examples/flux/model_training/train.py") + 1:]
    swap = {"--model_id_with_origin_paths": None, "--dataset_repeat": "1", "--max_pixels": str(64 * 64), **paths}
    out, i = [], 0
    while i < len(words):
        key = words[i]
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        if key in swap:
            if swap[key] is not None:
                out += [key, swap[key]]
        else:
            out += [key] + ([value] if value is not None else [])
        i += 2 if value is not None else 1
    return out + [x for k, v in paths.items() if k not in words for x in (k, v)]


def _model_paths(models: dict, *files: str) -> str:
    repo = {"flux": "black-forest-labs/FLUX.1-dev", "ip": "InstantX/FLUX.1-dev-IP-Adapter",
            "siglip": "google/siglip-so400m-patch14-384", "enc": "enc"}
    return json.dumps([str(Path(models[repo[f.split(":")[0]]]) / f.split(":")[1]) for f in files])


BASE = ("flux:flux1-dev.safetensors", "flux:text_encoder/model.safetensors", "flux:text_encoder_2/", "flux:ae.safetensors")
IP = ("ip:ip-adapter.bin", "siglip:model.safetensors")


def test_scripts_parse():
    for name in ("full/FLUX.1-dev-IP-Adapter.sh", "lora/FLUX.1-dev-IP-Adapter.sh", "lora/FLUX.1-dev-EliGen.sh",
                 "full/FLUX.1-dev-LoRA-Encoder.sh"):
        words = shlex.split((SCRIPTS / name).read_text().replace("\\\n", " "), comments=True)
        check_args(build_parser().parse_args(words[words.index("examples/flux/model_training/train.py") + 1:]))


def _train(script: str, data: Path, out: Path, models: dict, files, metadata: str):
    args = _script_args(SCRIPTS / script, **{
        "--dataset_base_path": str(data), "--dataset_metadata_path": str(data / metadata),
        "--output_path": str(out), "--model_paths": _model_paths(models, *files)})
    args += ["--height", "64", "--width", "64", "--t5_sequence_length", "16", "--report_to", "none",
             "--num_epochs", "1", "--dataset_num_workers", "0"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (tiny ops run fastest single-threaded)
    try:
        train(build_parser().parse_args(args))
    finally:  # the thread count changes float results (MKL's blocking): later tests compare bit for bit
        torch.set_num_threads(threads)
    return sorted(out.glob("*.safetensors"))


def test_ipadapter_full_training_then_validation(tmp_path, monkeypatch, models):
    data = tmp_path / "data/diffsynth_example_dataset/flux/FLUX.1-dev-IP-Adapter"
    _pattern(data / "image.jpg")
    _pattern(data / "reference.jpg", phase=90)
    (data / "metadata.csv").write_text("image,prompt,ipadapter_images\nimage.jpg,a dog,reference.jpg\n")
    out = tmp_path / "models/train/FLUX.1-dev-IP-Adapter_full"
    files = _train("full/FLUX.1-dev-IP-Adapter.sh", data, out, models, BASE + IP, "metadata.csv")
    assert [f.name for f in files] == ["epoch-0.safetensors"]
    from diffsynth import load_state_dict
    trained = load_state_dict(str(files[0]))
    assert any(k.startswith("ip_adapter.0.to_k_ip") for k in trained)
    _pattern(tmp_path / "data/example_image_dataset/1.jpg", phase=30)
    run_example("model_training/validate_full/FLUX.1-dev-IP-Adapter.py", tmp_path, monkeypatch, models)
    assert (tmp_path / "image_FLUX.1-dev-IP-Adapter_full.jpg").is_file()


def test_eligen_lora_training_then_validation(tmp_path, monkeypatch, models):
    data = tmp_path / "data/diffsynth_example_dataset/flux/FLUX.1-dev-EliGen"
    _pattern(data / "image.jpg")
    _box_mask(data / "masks/0.png", (0, 0, 32, 64))
    _box_mask(data / "masks/1.png", (32, 0, 64, 64), size=(128, 128))  # another size: resized
    (data / "metadata.json").write_text(json.dumps([{"image": "image.jpg", "prompt": "a cat and a dog",
                                                     "eligen_entity_prompts": ["a cat", "a dog"],
                                                     "eligen_entity_masks": ["masks/0.png", "masks/1.png"]}]))
    out = tmp_path / "models/train/FLUX.1-dev-EliGen_lora"
    files = _train("lora/FLUX.1-dev-EliGen.sh", data, out, models, BASE, "metadata.json")
    assert [f.name for f in files] == ["epoch-0.safetensors"]
    shutil.copy(files[0], out / "epoch-4.safetensors")  # the validation script reads the last of 5 epochs
    _eligen_masks(tmp_path / "data/example_image_dataset", {})
    for i in range(4):
        _box_mask(tmp_path / f"data/example_image_dataset/eligen/{i}.png", (16 * i, 0, 16 * i + 16, 64))
    run_example("model_training/validate_lora/FLUX.1-dev-EliGen.py", tmp_path, monkeypatch, models)
    assert (tmp_path / "EliGen_lora.png").is_file()


def test_ipadapter_lora_training_then_validation(tmp_path, monkeypatch, models):
    data = tmp_path / "data/diffsynth_example_dataset/flux/FLUX.1-dev-IP-Adapter"
    _pattern(data / "image.jpg")
    _pattern(data / "reference.jpg", phase=90)
    (data / "metadata.csv").write_text("image,prompt,ipadapter_images\nimage.jpg,a dog,reference.jpg\n")
    out = tmp_path / "models/train/FLUX.1-dev-IP-Adapter_lora"
    files = _train("lora/FLUX.1-dev-IP-Adapter.sh", data, out, models, BASE + IP, "metadata.csv")
    shutil.copy(files[0], out / "epoch-4.safetensors")
    _pattern(tmp_path / "data/example_image_dataset/1.jpg", phase=30)
    run_example("model_training/validate_lora/FLUX.1-dev-IP-Adapter.py", tmp_path, monkeypatch, models)
    assert (tmp_path / "image_FLUX.1-dev-IP-Adapter_lora.jpg").is_file()


def test_lora_encoder_full_training_then_validation(tmp_path, monkeypatch, models):
    data = tmp_path / "data/diffsynth_example_dataset/flux/FLUX.1-dev-LoRA-Encoder"
    _pattern(data / "image.jpg")
    lora = Path(models["VoidOc/flux_animal_forest1"]) / "20.safetensors"
    (data / "metadata.csv").write_text(f"image,prompt,lora_encoder_inputs\nimage.jpg,,{lora}\n")
    out = tmp_path / "models/train/FLUX.1-dev-LoRA-Encoder_full"
    encoder = Path(models["DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev"]) / "model.safetensors"
    files = _train("full/FLUX.1-dev-LoRA-Encoder.sh", data, out, {**models, "enc": encoder.parent},
                   BASE + ("enc:model.safetensors",), "metadata.csv")
    assert [f.name for f in files] == ["epoch-0.safetensors"]
    from diffsynth import load_state_dict
    trained, original = load_state_dict(str(files[0])), load_state_dict(str(encoder))
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in trained)  # it learned
    run_example("model_training/validate_full/FLUX.1-dev-LoRA-Encoder.py", tmp_path, monkeypatch, models)
    assert (tmp_path / "image_FLUX.1-dev-LoRA-Encoder_full.jpg").is_file()
