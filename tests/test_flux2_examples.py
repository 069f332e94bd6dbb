"""Every FLUX.2 example script (klein, klein-base, dev) runs, unchanged, on tiny models (see example_harness): the
model ids map onto tiny klein / klein-base / dev folders, calls are made small, the scripts' 1-megapixel reference resizing is
turned off and noise drawn on the CPU where no GPU exists."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from example_harness import ROOT, run_example

from diffsynth import Flux2ImagePipeline
from diffsynth.testing.tiny_flux2 import build_tiny_flux2, build_tiny_flux2_dev

EXAMPLES = ROOT / "examples" / "flux2"
ROWS = ("FLUX.2-klein-4B", "FLUX.2-klein-9B", "FLUX.2-klein-base-4B", "FLUX.2-klein-base-9B")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    klein = build_tiny_flux2(tmp_path_factory.mktemp("klein") / "klein")
    base = build_tiny_flux2(tmp_path_factory.mktemp("klein_base") / "klein-base", seed=1, distilled=False)
    dev = build_tiny_flux2_dev(tmp_path_factory.mktemp("dev") / "dev", seed=2)
    return {**{f"black-forest-labs/{row}": base if "base" in row else klein for row in ROWS},
            "black-forest-labs/FLUX.2-dev": dev}


@pytest.fixture
def cpu_only(monkeypatch, one_thread):
    """Scripts written for a GPU: noise from the CPU generator, no 1-megapixel reference resizing, and a
    card size for the low-VRAM scripts' `torch.cuda.mem_get_info`."""
    original = Flux2ImagePipeline.__call__
    rand = {} if torch.cuda.is_available() else {"rand_device": "cpu"}
    monkeypatch.setattr(Flux2ImagePipeline, "__call__", lambda self, *a, **kw: original(
        self, *a, **{**kw, **rand, "edit_image_auto_resize": False}))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * 1024**3, 8 * 1024**3))


def on_cpu(script: Path, folder: Path) -> Path:
    """The script with its GPU placement made the CPU's (the low-VRAM stages name "cuda" and bf16 explicitly)."""
    text = script.read_text().replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
    out = folder / "scripts" / script.parent.name / script.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


@pytest.mark.parametrize("row", ROWS)
def test_inference_example(row, models, tmp_path, monkeypatch, cpu_only):
    run_example(f"model_inference/{row}.py", tmp_path, monkeypatch, models, pipeline=Flux2ImagePipeline,
                examples=EXAMPLES)
    assert {p.name for p in tmp_path.glob("*.jpg")} == {f"image_{row}.jpg", f"image_edit_{row}.jpg"}


@pytest.mark.parametrize("row", ROWS)
def test_low_vram_example(row, models, tmp_path, monkeypatch, cpu_only):
    script = on_cpu(EXAMPLES / "model_inference_low_vram" / f"{row}.py", tmp_path)
    scope = run_example(script.relative_to(tmp_path / "scripts"), tmp_path, monkeypatch, models,
                        pipeline=Flux2ImagePipeline, examples=tmp_path / "scripts")
    assert {p.name for p in tmp_path.glob("*.jpg")} == {f"image_{row}.jpg", f"image_edit_{row}.jpg"}
    pipe = scope["pipe"]
    assert pipe.vram_management_enabled and pipe.offload["dit"] == ("cpu", torch.float8_e4m3fn)
    assert pipe.offload["vae_decoder"] == (None, None)


@pytest.mark.parametrize("kind", ["model_inference", "model_inference_low_vram"])
def test_dev_examples(kind, models, tmp_path, monkeypatch, cpu_only):
    """FLUX.2-dev's scripts (2.0's calls: its vram_config stages, embedded_guidance for the edit); both name
    "cuda" in their stages, so they run as the low-VRAM klein scripts do."""
    script = on_cpu(EXAMPLES / kind / "FLUX.2-dev.py", tmp_path)
    scope = run_example(script.relative_to(tmp_path / "scripts"), tmp_path, monkeypatch, models,
                        pipeline=Flux2ImagePipeline, examples=tmp_path / "scripts")
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"image_FLUX.2-dev.jpg", "image_edit_FLUX.2-dev.jpg"}
    pipe = scope["pipe"]
    assert pipe.text_encoder_mistral is not None and pipe.text_encoder_qwen3 is None
    storage = torch.float8_e4m3fn if kind.endswith("low_vram") else torch.float32
    assert pipe.offload["dit"] == pipe.offload["text_encoder_mistral"] == ("cpu", storage)
    assert pipe.vram_management_enabled == kind.endswith("low_vram")


def test_disk_offload_needs_an_onload_stage(tmp_path):
    from diffsynth import ModelConfig
    with pytest.raises(ValueError, match="offload 'disk' needs the onload_device/onload_dtype"):
        ModelConfig(path=str(tmp_path), offload_device="disk", offload_dtype="disk")
    config = ModelConfig(path=str(tmp_path), offload_device="disk", offload_dtype="disk", onload_device="cpu",
                         onload_dtype=torch.float8_e4m3fn)
    assert config.storage("cpu", torch.float32) == ("cpu", torch.float8_e4m3fn)
