"""The InfiniteYou row's example scripts, run unchanged on tiny models in the release's layout (tiny SCRFD-shaped
detector and facexlib-layout ArcFace included): inference, low-VRAM inference, real 1-step training runs of the
full (InfuseNet + projector) and LoRA scripts, and the validate scripts loading what those runs wrote."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.testing.tiny_infiniteyou import PROJECTOR_FILE, build_tiny_infiniteyou, face_image
from example_harness import EXAMPLES, train_script_one_step, link_model, run_example

ROW = "FLUX.1-dev-InfiniteYou"
DATASET = Path("data") / "diffsynth_example_dataset" / "flux" / ROW


# tiny detector written as ONNX, run by onnxruntime; faces aligned by OpenCV
pytestmark = [pytest.mark.usefixtures("cpu_noise"), pytest.mark.needs("onnx", "onnxruntime", "cv2")]


@pytest.fixture(scope="module")
def iy_root(tmp_path_factory):
    return build_tiny_infiniteyou(tmp_path_factory.mktemp("iy_examples") / "InfiniteYou")


def models(tiny_root, iy_root):
    return {"black-forest-labs/FLUX.1-dev": tiny_root, "ByteDance/InfiniteYou": iy_root}


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
def test_inference_examples(folder, tiny_root, iy_root, tmp_path, monkeypatch):
    (tmp_path / "data" / "examples" / "infiniteyou").mkdir(parents=True)
    for name, box in (("man", (96, 96, 160, 160)), ("woman", (40, 60, 120, 140))):
        face_image(box=box).save(tmp_path / "data" / "examples" / "infiniteyou" / f"{name}.jpg")
    run_example(f"{folder}/{ROW}.py", tmp_path, monkeypatch, models(tiny_root, iy_root))
    assert (tmp_path / "man.jpg").is_file() and (tmp_path / "woman.jpg").is_file()


def write_dataset(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "image_1.jpg")
    Image.new("RGB", (64, 64)).save(root / "black.jpg")
    face_image().save(root / "id_1.png")
    (root / "metadata.csv").write_text("image,prompt,controlnet_image,infinityou_id_image,infinityou_guidance\n"
                                       "image_1.jpg,a man,black.jpg,id_1.png,1.0\n")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_training_scripts_train_and_validate(kind, tiny_root, iy_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models(tiny_root, iy_root).items():
        link_model(tmp_path, model_id, folder)
    write_dataset(tmp_path / DATASET)
    args, result, saved = train_script_one_step(EXAMPLES / "model_training" / kind / f"{ROW}.sh")
    out = saved.parent
    assert result["steps"] == 1 and saved.is_file()
    pipe = result["module"].pipe
    if kind == "full":  # InfuseNet and the projector trained under their own names, the DiT untouched
        from safetensors.torch import load_file
        assert not any(p.requires_grad for p in pipe.dit.parameters())
        after = load_file(saved)
        assert {k.split(".")[0] for k in after} == {"controlnet", "image_proj_model"}
        before = torch.load(iy_root / PROJECTOR_FILE, weights_only=True)["image_proj"]
        # the projector got a gradient through the identity tokens InfuseNet read
        assert not torch.equal(after["image_proj_model.proj_out.weight"], before["proj_out.weight"])
        assert "controlnet.models.0.controlnet_x_embedder.weight" in after  # DiffSynth-Studio's name
    else:
        shutil.copy(saved, out / "epoch-4.safetensors")  # the validate script reads the 5-epoch file
    run_example(f"model_training/validate_{kind}/{ROW}.py", tmp_path, monkeypatch, models(tiny_root, iy_root))
    assert (tmp_path / f"image_{ROW}_{kind}.jpg").is_file()


# DiffSynth-Studio 2.0's way of writing the InfiniteYou script: `flux_image` import path (ControlNetInput
# included), the four-stage vram_config, T5 shards picked with a glob, vram_limit, the face models fetched with
# modelscope's snapshot_download into models/ByteDance/InfiniteYou.
STUDIO2_SCRIPT = '''
import numpy as np
import torch
from PIL import Image
from modelscope import snapshot_download
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig, ControlNetInput

snapshot_download("ByteDance/InfiniteYou", allow_file_pattern="supports/insightface/models/antelopev2/*",
                  local_dir="models/ByteDance/InfiniteYou")
stages = dict(offload_dtype=torch.float8_e4m3fn, offload_device="cpu", onload_dtype=torch.float8_e4m3fn,
              onload_device="cpu", preparing_dtype=torch.float8_e4m3fn, preparing_device="cuda",
              computation_dtype=torch.bfloat16, computation_device="cuda")
dev, iy = "black-forest-labs/FLUX.1-dev", "ByteDance/InfiniteYou"
pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[
    ModelConfig(model_id=dev, origin_file_pattern="flux1-dev.safetensors", **stages),
    ModelConfig(model_id=dev, origin_file_pattern="text_encoder/model.safetensors", **stages),
    ModelConfig(model_id=dev, origin_file_pattern="text_encoder_2/*.safetensors", **stages),
    ModelConfig(model_id=dev, origin_file_pattern="ae.safetensors", **stages),
    ModelConfig(model_id=iy, origin_file_pattern="infu_flux_v1.0/aes_stage2/image_proj_model.bin", **stages),
    ModelConfig(model_id=iy, origin_file_pattern="infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors", **stages),
], vram_limit=0.001)
control = [ControlNetInput(image=Image.fromarray(np.zeros([1024, 1024, 3]).astype(np.uint8)), scale=1.0,
                           processor_id="None")]
image = pipe(prompt="A man, portrait, cinematic", seed=1, infinityou_id_image=Image.open("man.jpg").convert("RGB"),
             infinityou_guidance=1.0, controlnet_inputs=control, num_inference_steps=50, embedded_guidance=3.5,
             height=1024, width=1024)
image.save("studio2_man.jpg")
'''


STUDIO1_SCRIPT = (STUDIO2_SCRIPT.replace("diffsynth.pipelines.flux_image ", "diffsynth.pipelines.flux_image_new ")
                  .replace(", **stages", "").replace("vram_limit=0.001", "").replace('text_encoder_2/*.safetensors"', 'text_encoder_2/"'))


@pytest.mark.parametrize("script_text", [STUDIO2_SCRIPT, STUDIO1_SCRIPT], ids=["2.0", "1.x"])
def test_studio_style_scripts(script_text, tiny_root, iy_root, tmp_path, monkeypatch):
    """DiffSynth-Studio's InfiniteYou script in 2.0's and in 1.x's form (1.x: flux_image_new, no stages, T5 as
    the `text_encoder_2/` folder; both: the infu_flux_v1.0/aes_stage2/... file patterns)."""
    import sys
    import types
    fetched = []

    def snapshot_download(model_id, allow_file_pattern, local_dir):
        assert (Path(local_dir) / allow_file_pattern.rstrip("*") / "scrfd_10g_bnkps.onnx").is_file()  # linked
        fetched.append(model_id)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    face_image().save(tmp_path / "man.jpg")
    script = tmp_path / "studio2.py"
    # CPU and fp32 compute (the harness loads every pipeline so); storage stays fp8 with VRAM management
    script.write_text(script_text.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32"))
    run_example(script, tmp_path, monkeypatch, models(tiny_root, iy_root))
    assert fetched == ["ByteDance/InfiniteYou"] and (tmp_path / "studio2_man.jpg").is_file()
