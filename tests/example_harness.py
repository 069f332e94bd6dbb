"""Run the scripts under examples/ on tiny models, so that they cannot rot.

The scripts are run unchanged (runpy): their `ModelConfig(model_id=..., origin_file_pattern=...)` resolve
offline-first from `./models/<model_id>/`, which the harness fills with links to tiny model folders in a
temporary working directory. The pipeline is made to run on the CPU in fp32 at most `max_side` pixels and
`steps` denoising steps, whatever the script asks, since the scripts are written for a real GPU.
"""
from __future__ import annotations

import inspect
import runpy
import shlex
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
                max_side: int = 64, steps: int = 2, pipeline: type = FluxImagePipeline,
                examples: Path = EXAMPLES) -> dict:
    """Run `script` (relative to `examples`, examples/flux/ by default) with `models` {model_id: tiny folder}
    and `pipeline` (the class the script uses) made small; returns the script's globals."""
    monkeypatch.chdir(tmp_path)
    for model_id, folder in models.items():
        link_model(tmp_path, model_id, Path(folder))
    original_load = pipeline.from_pretrained.__func__
    original_call = pipeline.__call__
    has_t5 = "t5_sequence_length" in inspect.signature(original_call).parameters

    def load_on_cpu(cls, *args, **kwargs):
        return original_load(cls, *args, **{**kwargs, "device": "cpu", "torch_dtype": torch.float32})

    def small_call(self, *args, **kwargs):
        kwargs["height"] = _small(kwargs.get("height"), max_side) or max_side
        kwargs["width"] = _small(kwargs.get("width"), max_side) or max_side
        kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps", steps), steps)
        if has_t5:
            kwargs.setdefault("t5_sequence_length", 32)
        kwargs["progress_bar_cmd"] = lambda x: x
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "from_pretrained", classmethod(load_on_cpu))
    monkeypatch.setattr(pipeline, "__call__", small_call)
    return runpy.run_path(str(examples / script), run_name="__main__")


# What a training script's one-step smoke run adds to the script's own arguments.
ONE_STEP = ["--dataset_repeat", "1", "--num_epochs", "1", "--height", "64", "--width", "64",
            "--t5_sequence_length", "32", "--seed", "0", "--report_to", "none"]


def script_commands(script: Path) -> list[list[str]]:
    """The train.py arguments of each command of an examples/*/model_training shell script (split-training
    scripts have two: --task sft:data_process, then --task sft:train)."""
    words = shlex.split(script.read_text().replace("\\\n", " "), comments=True)
    starts = [i for i, w in enumerate(words) if w.endswith("/model_training/train.py")]  # flux or flux2
    ends = [next((j for j in range(i + 1, len(words)) if words[j] == "accelerate"), len(words)) for i in starts]
    return [words[i + 1:end] for i, end in zip(starts, ends)]


def script_args(script: Path) -> list[str]:
    """The train.py arguments of a script's (last) command."""
    return script_commands(script)[-1]


def train_script_one_step(script: Path):
    """Run a training script's commands for one step (each with its own arguments + ONE_STEP), in the current
    folder. Returns (the last command's checked arguments, its train() result, its saved epoch-0 file)."""
    from diffsynth.training import build_parser, check_args, train
    for words in script_commands(script):
        args = check_args(build_parser().parse_args(words))
        result = train(build_parser().parse_args(words + ONE_STEP))
    return args, result, Path(args.output_path) / "epoch-0.safetensors"
