"""Run the scripts under examples/ on tiny models, so that they cannot rot.

The scripts are run unchanged (runpy): their `ModelConfig(model_id=..., origin_file_pattern=...)` resolve
offline-first from `./models/<model_id>/`, which the harness fills with links to tiny model folders in a
temporary working directory. The pipeline is made to run on the CPU in fp32 at most `max_side` pixels and
`steps` denoising steps, whatever the script asks, since the scripts are written for a real GPU.
"""
from __future__ import annotations

import runpy
from pathlib import Path

import torch

from diffsynth import FluxImagePipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "flux"


def link_model(tmp_path: Path, model_id: str, folder: Path) -> None:
    """Make `ModelConfig(model_id=model_id, ...)` find `folder` under ./models (offline-first resolution)."""
    target = tmp_path / "models" / model_id
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(folder, target_is_directory=True)


def _small(value, max_side: int):
    return value if value is None else max(16, min(int(value), max_side) // 16 * 16)


def run_example(script: str | Path, tmp_path: Path, monkeypatch, models: dict[str, Path],
                max_side: int = 64, steps: int = 2) -> dict:
    """Run `script` (relative to examples/flux/) with `models` {model_id: tiny folder}; returns its globals."""
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models.items():
        link_model(tmp_path, model_id, Path(folder))
    original_load = FluxImagePipeline.from_pretrained.__func__
    original_call = FluxImagePipeline.__call__

    def load_on_cpu(cls, *args, **kwargs):
        return original_load(cls, *args, **{**kwargs, "device": "cpu", "torch_dtype": torch.float32})

    def small_call(self, *args, **kwargs):
        kwargs["height"] = _small(kwargs.get("height"), max_side) or max_side
        kwargs["width"] = _small(kwargs.get("width"), max_side) or max_side
        kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps", steps), steps)
        kwargs.setdefault("t5_sequence_length", 32)
        kwargs["progress_bar_cmd"] = lambda x: x
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", classmethod(load_on_cpu))
    monkeypatch.setattr(FluxImagePipeline, "__call__", small_call)
    return runpy.run_path(str(EXAMPLES / script), run_name="__main__")
