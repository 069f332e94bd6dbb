"""DiffSynth-Studio's scripts, both generations, run unchanged on a tiny local model (no network).

Scripts run from a folder whose `models/` holds the tiny FLUX.1-dev (and a Krea DiT) in the hub layout,
so `ModelConfig(model_id=...)` resolves offline; "cuda" becomes "cpu" and every call is made small.
"""
from __future__ import annotations

import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import diffsynth
from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading import download as dl
from diffsynth.loading import presets

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(height=32, width=48, num_inference_steps=2, t5_sequence_length=16, progress_bar_cmd=lambda x: x)


@pytest.fixture
def hub(tiny_root, tmp_path, monkeypatch):
    """cwd with models/black-forest-labs/{FLUX.1-dev, FLUX.1-Krea-dev}; pipeline calls made small; no hub."""
    models = tmp_path / "models" / "black-forest-labs"
    models.mkdir(parents=True)
    (models / "FLUX.1-dev").symlink_to(tiny_root, target_is_directory=True)
    (models / "FLUX.1-Krea-dev").mkdir()
    (models / "FLUX.1-Krea-dev" / "flux1-krea-dev.safetensors").symlink_to(tiny_root / "flux1-dev.safetensors")
    monkeypatch.chdir(tmp_path)
    original = FluxImagePipeline.__call__
    monkeypatch.setattr(FluxImagePipeline, "__call__", lambda self, *a, **kw: original(self, *a, **{**kw, **SMALL}))

    def offline(*args):
        raise AssertionError(f"a script tried to download {args[:1]}")
    for source in dl.SOURCES:
        monkeypatch.setitem(dl.SOURCES, source, offline)
    return tmp_path


def run_script(text: str, folder: Path) -> dict:
    path = folder / "script.py"
    path.write_text(text.replace('"cuda"', '"cpu"'))
    return runpy.run_path(str(path), run_name="__main__")


# The base model's scripts; every variant's scripts are run by that variant's own example tests.
EXAMPLES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples/flux").glob("*/*.py")
                  if p.parent.name == "acceleration" or (p.parent.name in ("model_inference", "model_inference_low_vram")
                                                           and p.name in ("FLUX.1-dev.py", "FLUX.1-Krea-dev.py")))


@pytest.mark.parametrize("example", EXAMPLES)
def test_inference_examples_run(example, hub):
    run_script((ROOT / example).read_text(), hub)
    assert list(hub.glob("*.jpg")) or list(hub.glob("*.png")), "the example saved no image"


def test_examples_are_named_after_the_model():
    names = {p.name for p in (ROOT / "examples/flux").rglob("*") if p.is_file()}
    assert not [n for n in names if "Kera" in n]  # the misspelling some tables carry
    for folder in ("model_inference", "model_inference_low_vram", "model_training/validate_lora",
                   "model_training/validate_full"):
        assert (ROOT / "examples/flux" / folder / "FLUX.1-Krea-dev.py").is_file(), folder
    for folder in ("model_training/lora", "model_training/full"):
        assert (ROOT / "examples/flux" / folder / "FLUX.1-Krea-dev.sh").is_file(), folder


# DiffSynth-Studio 2.0's FLUX scripts: `flux_image` import path, the four-stage vram_config on every
# ModelConfig, shards picked with a glob, and vram_limit on from_pretrained.
STUDIO2_LOW_VRAM = '''
import torch
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

stages = dict(offload_dtype=torch.float8_e4m3fn, offload_device="cpu", onload_dtype=torch.float8_e4m3fn,
              onload_device="cpu", preparing_dtype=torch.float8_e4m3fn, preparing_device="cuda",
              computation_dtype=torch.bfloat16, computation_device="cuda")
repo = "black-forest-labs/FLUX.1-dev"
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16, device="cuda",
    model_configs=[ModelConfig(model_id="black-forest-labs/FLUX.1-Krea-dev",
                               origin_file_pattern="flux1-krea-dev.safetensors", **stages),
                   ModelConfig(model_id=repo, origin_file_pattern="text_encoder/model.safetensors", **stages),
                   ModelConfig(model_id=repo, origin_file_pattern="text_encoder_2/*.safetensors", **stages),
                   ModelConfig(model_id=repo, origin_file_pattern="ae.safetensors", **stages)],
    tokenizer_1_config=ModelConfig(model_id=repo, origin_file_pattern="tokenizer/", download_source="ModelScope"),
    tokenizer_2_config=ModelConfig(model_id=repo, origin_file_pattern="tokenizer_2/"),
    vram_limit=0.001,
)
pipe(prompt="a bicycle in a park", seed=0, embedded_guidance=4.5).save("krea.jpg")
pipe(prompt="a bicycle", negative_prompt="blurry", seed=0, cfg_scale=2).save("krea_cfg.jpg")
'''


def test_studio2_low_vram_script_runs_with_fp8_storage_and_vram_limit(hub):
    pipe = run_script(STUDIO2_LOW_VRAM, hub)["pipe"]
    assert (hub / "krea_cfg.jpg").is_file()
    assert pipe.dit.single_blocks[0].to_qkv_mlp.weight.dtype == torch.float8_e4m3fn  # stored as offload_dtype
    assert pipe.offload["text_encoder_2"] == ("cpu", torch.float8_e4m3fn)
    assert pipe.vram_management_enabled


def test_studio2_base_script_matches_ours(hub, tiny_pipe):
    """2.0's base form (no vram_config) gives what the 1.x import path gives."""
    text = STUDIO2_LOW_VRAM.replace(", **stages", "").replace("vram_limit=0.001,", "").replace("bfloat16", "float32")
    pipe = run_script(text, hub)["pipe"]
    assert not pipe.vram_management_enabled
    torch.testing.assert_close(pipe("a cat", seed=1, output_type="latent"),
                               tiny_pipe("a cat", seed=1, output_type="latent", **SMALL))


@pytest.mark.parametrize("field, value, message", [
    ("computation_dtype", torch.float16, "computation_dtype=torch.float16 but from_pretrained\\(torch_dtype="),
    ("computation_device", "meta", "computation_device='meta' but from_pretrained\\(device='cpu'\\)"),
    ("preparing_device", "meta", "preparing_device='meta'"),
    ("onload_dtype", torch.float16, "onload_dtype.*differ"),
    ("onload_device", "meta", "onload_device='meta' is neither"),
])
def test_studio2_stage_fields_that_cannot_be_honoured_are_refused(tiny_root, field, value, message):
    config = ModelConfig(path=str(tiny_root / "ae.safetensors"), offload_device="cpu", offload_dtype=torch.bfloat16,
                         **{field: value})
    with pytest.raises(ValueError, match=message):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[config])


def test_studio2_names_of_1x_arguments(tiny_root):
    assert ModelConfig(model_id="a/b", download_source="HuggingFace").download_resource == "huggingface"
    with pytest.raises(ValueError, match="download_source='modelscope' and download_resource='huggingface'"):
        ModelConfig(model_id="a/b", download_source="modelscope", download_resource="huggingface")
    with pytest.raises(TypeError, match="tokenizer_1_path or tokenizer_1_config, not both"):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=str(tiny_root / "text_encoder"))],
                                          tokenizer_1_path=str(tiny_root / "tokenizer"),
                                          tokenizer_1_config=ModelConfig(path=str(tiny_root / "tokenizer")))


def test_onload_fields_alone_set_the_storage():
    config = ModelConfig(path="x", onload_device="cpu", onload_dtype=torch.float8_e4m3fn)
    assert config.storage("cuda", torch.bfloat16) == ("cpu", torch.float8_e4m3fn)
    assert ModelConfig(path="x").storage("cuda:0", torch.bfloat16) == (None, None)


# ----------------------------------------------------------------------------- LoRA given as a ModelConfig

def test_load_lora_accepts_a_model_config(tiny_pipe, tmp_path):
    from diffsynth.loading.lora import save_lora
    layer = tiny_pipe.dit.blocks[0].attn.a_to_qkv
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, layer.in_features, generator=g), torch.randn(layer.out_features, 2, generator=g)
    save_lora(tmp_path / "models" / "me" / "style" / "lora.safetensors", {
        "blocks.0.attn.a_to_qkv.lora_A.default.weight": down, "blocks.0.attn.a_to_qkv.lora_B.default.weight": up})
    base = tiny_pipe("a cat", seed=0, output_type="latent", **SMALL)
    config = ModelConfig(model_id="me/style", origin_file_pattern="lora.safetensors",
                         local_model_path=str(tmp_path / "models"), skip_download=True)
    tiny_pipe.load_lora(tiny_pipe.dit, config, alpha=0.5, hotload=True)
    try:
        hot = tiny_pipe("a cat", seed=0, output_type="latent", **SMALL)
    finally:
        tiny_pipe.clear_lora()
    original = layer.weight.detach().clone()
    with torch.no_grad():  # oracle: the update merged by hand (PEFT keys without alpha: scale 1, strength 0.5)
        layer.weight += 0.5 * up @ down
    try:
        torch.testing.assert_close(hot, tiny_pipe("a cat", seed=0, output_type="latent", **SMALL), rtol=1e-4, atol=1e-4)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
    torch.testing.assert_close(tiny_pipe("a cat", seed=0, output_type="latent", **SMALL), base, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 1.x download helpers

@pytest.fixture
def fake_hub(monkeypatch):
    """ModelScope fails (as without the package); Hugging Face writes the requested file."""
    calls = []

    def modelscope(model_id, local_dir, allow, ignore):
        calls.append(("modelscope", model_id, allow))
        raise ImportError("the modelscope package is not installed")

    def huggingface(model_id, local_dir, allow, ignore):
        calls.append(("huggingface", model_id, allow))
        target = Path(local_dir) / allow.replace("*", "model.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    monkeypatch.setitem(dl.SOURCES, "modelscope", modelscope)
    monkeypatch.setitem(dl.SOURCES, "huggingface", huggingface)
    return calls


def test_download_helpers_are_importable_from_the_package():
    assert diffsynth.download_models is presets.download_models
    assert diffsynth.download_customized_models is dl.download_customized_models


def test_download_customized_models_falls_back_then_works_offline(tmp_path, fake_hub):
    local = tmp_path / "lora"
    paths = diffsynth.download_customized_models("me/loras", "sub/style.safetensors", str(local))
    assert paths == [str(local / "style.safetensors")] and (local / "style.safetensors").is_file()
    assert not (local / "sub").exists()  # 1.x's layout: the file itself in local_dir
    assert [c[0] for c in fake_hub] == ["modelscope", "huggingface"]
    assert diffsynth.download_customized_models("me/loras", "sub/style.safetensors", str(local)) == paths
    assert len(fake_hub) == 2  # already there: no hub touched


def test_download_models_presets_land_where_model_configs_look(tmp_path, fake_hub):
    paths = diffsynth.download_models(["FLUX.1-dev"], downloading_priority=["HuggingFace"],
                                      local_model_path=str(tmp_path))
    repo = tmp_path / "black-forest-labs" / "FLUX.1-dev"
    assert str(repo / "ae.safetensors") in paths and (repo / "text_encoder_2" / "model.safetensors").is_file()
    assert len(fake_hub) == 4
    assert diffsynth.download_models(["FLUX.1-dev"], ["HuggingFace"], str(tmp_path)) == paths
    assert len(fake_hub) == 4  # the second time everything is on disk
    with pytest.raises(ValueError, match="unknown preset.*FLUX.1-dev"):
        diffsynth.download_models(["FLUX.3"])


def test_annotator_presets_land_where_annotator_reads(tmp_path, fake_hub, monkeypatch):
    """1.x's `download_models(["Annotators:Depth"])`: the files controlnet_aux's detectors read, flat in
    models/Annotators (Annotator's default model_path), from each hub's own repository; offline-first."""
    import inspect
    from diffsynth.controlnets.processors import LEARNED, Annotator
    monkeypatch.chdir(tmp_path)
    paths = diffsynth.download_models(["Annotators:Depth", "Annotators:Openpose"])
    default = inspect.signature(Annotator).parameters["model_path"].default
    want = [os.path.join("./models", "Annotators", f) for f in (*LEARNED["depth"].files, *LEARNED["openpose"].files)]
    assert paths == want and all(os.path.samefile(p, Path(default) / Path(p).name) for p in paths)
    assert fake_hub[:2] == [("modelscope", "sd_lora/Annotators", "dpt_hybrid-midas-501f0c75.pt"),
                            ("huggingface", "lllyasviel/Annotators", "dpt_hybrid-midas-501f0c75.pt")]
    assert len(fake_hub) == 8  # 4 files, each refused by ModelScope first
    assert diffsynth.download_models(["Annotators:Lineart", "Annotators:Depth"], ["HuggingFace"]) == [
        os.path.join("./models", "Annotators", f) for f in ("sk_model.pth", "sk_model2.pth",
                                                           "dpt_hybrid-midas-501f0c75.pt")]
    assert len(fake_hub) == 10  # only Lineart's two files were missing
    with pytest.raises(ValueError, match="Annotators:Depth.*Annotators:Softedge"):
        diffsynth.download_models(["Annotators:Sketch"])


# ----------------------------------------------------------------------------- failing downloads

def test_failed_download_names_model_pattern_folder_and_leaves_no_folder(tmp_path, fake_hub):
    config = ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors",
                         local_model_path=str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError) as info:
        config.resolve()
    message = str(info.value)
    for part in ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", str(tmp_path / "models"),
                 "modelscope package is not installed"):
        assert part in message
    assert not (tmp_path / "models").exists()


def test_failed_download_into_an_existing_folder_keeps_it(tmp_path, fake_hub):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.txt").write_text("keep")
    with pytest.raises(FileNotFoundError):
        ModelConfig(model_id="a/b", origin_file_pattern="x.safetensors",
                    local_model_path=str(tmp_path / "models")).resolve()
    assert os.listdir(tmp_path / "models") == ["mine.txt"]


def test_images_are_rounded_where_diffsynth_studio_truncates(tiny_pipe):
    """Kept on purpose (diffusers rounds too): against DiffSynth-Studio's truncation every pixel differs by
    0 or 1/255, about half of them by 1 (measured: 0.489 at 64x64, 0.489 at 128x128, 0.493 at 256x256)."""
    kw = dict(seed=0, height=64, width=64, num_inference_steps=2, progress_bar_cmd=lambda x: x)
    decoded = tiny_pipe.vae_decoder(tiny_pipe("a cat", output_type="latent", **kw))
    truncated = ((decoded + 1) * 127.5).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).int()
    ours = torch.from_numpy(np.asarray(tiny_pipe("a cat", **kw))).int()
    diff = ours - truncated
    assert torch.equal(ours, ((decoded.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).int())
    assert diff.min() == 0 and diff.max() == 1 and 0.4 < diff.float().mean() < 0.6
