"""The ControlNet rows' example scripts, run unchanged on tiny models: inference, low-VRAM inference, real 1-step
training runs of the LoRA and full scripts (their own arguments, dataset and step count made tiny), and the
validate scripts loading what those runs wrote."""
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.testing.tiny_controlnet import build_tiny_controlnet
from example_harness import EXAMPLES, train_script_one_step, link_model, run_example

ROWS = {  # row -> (model id, tiny kind)
    "FLUX.1-dev-Controlnet-Union-alpha": ("InstantX/FLUX.1-dev-Controlnet-Union-alpha", "union"),
    "FLUX.1-dev-Controlnet-Inpainting-Beta": ("alimama-creative/FLUX.1-dev-Controlnet-Inpainting-Beta", "inpaint"),
    "FLUX.1-dev-Controlnet-Upscaler": ("jasperai/Flux.1-dev-Controlnet-Upscaler", "plain"),
}


pytestmark = pytest.mark.usefixtures("cpu_noise")


@pytest.fixture(scope="module")
def tiny_nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_controlnets")
    kinds = ("union", "inpaint", "plain")
    return {kind: build_tiny_controlnet(root / kind, kind, seed=i) for i, kind in enumerate(kinds)}


def models_for(row, tiny_root, tiny_nets):
    model_id, kind = ROWS[row]
    return {"black-forest-labs/FLUX.1-dev": tiny_root, model_id: tiny_nets[kind]}


@pytest.fixture
def fake_controlnet_aux(monkeypatch, tmp_path):
    """controlnet_aux stand-in for the depth annotator (the real package and its weights are not installed here);
    the annotator code path that loads it from models/Annotators is ours and runs unchanged."""
    class Midas:
        @classmethod
        def from_pretrained(cls, path):
            assert (Path(path) / "dpt_hybrid-midas-501f0c75.pt").is_file()
            return cls()

        def __call__(self, image, detect_resolution, image_resolution):
            return image.convert("L").convert("RGB").resize((image_resolution, image_resolution))
    monkeypatch.setitem(sys.modules, "controlnet_aux", types.SimpleNamespace(MidasDetector=Midas))
    (tmp_path / "models" / "Annotators").mkdir(parents=True)
    (tmp_path / "models" / "Annotators" / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"")


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.needs("cv2") if "Union" in row else ())
                                 for row in ROWS])  # the Union example draws canny edges (OpenCV)
def test_inference_examples(row, folder, tiny_root, tiny_nets, tmp_path, monkeypatch, fake_controlnet_aux):
    run_example(f"{folder}/{row}.py", tmp_path, monkeypatch, models_for(row, tiny_root, tiny_nets))
    assert (tmp_path / "image_2.jpg").is_file()


def write_dataset(root: Path) -> None:
    """data/example_image_dataset with the files the scripts name (one row each, 64 px images)."""
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    for sub in ("canny", "inpaint", "upscale"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        image().save(root / sub / "image_1.jpg")
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "inpaint" / "mask.jpg")
    image().save(root / "image_1.jpg")
    (root / "metadata_controlnet_canny.csv").write_text(
        "image,prompt,controlnet_image,controlnet_processor_id\nimage_1.jpg,a dog,canny/image_1.jpg,canny\n")
    (root / "metadata_controlnet_inpaint.csv").write_text(
        "image,prompt,controlnet_image,controlnet_inpaint_mask\n"
        "image_1.jpg,a dog,inpaint/image_1.jpg,inpaint/mask.jpg\n")
    (root / "metadata_controlnet_upscale.csv").write_text(
        "image,prompt,controlnet_image\nimage_1.jpg,a dog,upscale/image_1.jpg\n")


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("row", list(ROWS))
def test_training_scripts_train_and_validate(row, kind, tiny_root, tiny_nets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models_for(row, tiny_root, tiny_nets).items():
        link_model(tmp_path, model_id, folder)
    write_dataset(tmp_path / "data" / "example_image_dataset")
    args, result, saved = train_script_one_step(EXAMPLES / "model_training" / kind / f"{row}.sh")
    assert args.remove_prefix_in_ckpt == ("pipe.controlnet.0." if kind == "full" else "pipe.dit.")
    out = saved.parent
    assert result["steps"] == 1 and saved.is_file()
    pipe = result["module"].pipe
    if kind == "full":  # the ControlNet trained (its own names, updated), the DiT untouched
        assert all(p.requires_grad for p in pipe.controlnet.parameters())
        assert not any(p.requires_grad for p in pipe.dit.parameters())
        from safetensors.torch import load_file
        before = load_file(models_for(row, tiny_root, tiny_nets)[ROWS[row][0]] / "diffusion_pytorch_model.safetensors")
        after = load_file(saved)
        assert after.keys() == pipe.controlnet[0].state_dict().keys()
        assert not torch.equal(after["controlnet_x_embedder.weight"], before["controlnet_x_embedder.weight"])
    else:
        shutil.copy(saved, out / "epoch-4.safetensors")  # the validate script reads the 5-epoch file
    run_example(f"model_training/validate_{kind}/{row}.py", tmp_path, monkeypatch,
                models_for(row, tiny_root, tiny_nets))
    assert (tmp_path / f"image_{row}_{kind}.jpg").is_file()
