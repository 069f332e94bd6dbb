"""Training at scale: the trainer under accelerate with FSDP2 (2 gloo processes on CPU) gives the same weights,
EMA and checkpoint files as one process accumulating the same batches, and resumes either way; the accelerate
configs in examples/ are valid for the installed accelerate.

"The same": a step of one process with --gradient_accumulation_steps 2 and a step of two processes with 1 see
the same two batches (the epoch's batch list is dealt out in order) with the same noises and noise levels (drawn
per batch from (seed, epoch, batch index)), and average the same two gradients, so the runs differ only by the
order of float additions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsynth.testing.distributed import free_port
from diffsynth.testing.tiny_flux2 import build_tiny_flux2
from diffsynth.training import build_parser, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("examples/*/model_training/**/accelerate_config*.yaml"))
FSDP2_CONFIG = ROOT / "examples/flux2/model_training/full/accelerate_config_fsdp2.yaml"

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class Crash(RuntimeError):
    pass


# ----------------------------------------------------------------------------- the configs

def launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file path` would do: its parsed config, and the environment it gives
    the training processes (accelerate's own launcher code, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, config, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as `accelerate launch` sets it before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return config, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_accelerate_configs_are_valid_for_the_installed_accelerate(path, monkeypatch):
    """Every field is one accelerate knows (its config class and launcher arguments), and the plugin the training
    process builds from the launcher's environment accepts the values."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    config = load_config_from_file(str(path))  # unknown top-level fields raise here
    launcher_args = {a.dest for a in launch_command_parser()._actions}
    unknown = [k for k in {**(config.deepspeed_config or {}), **(config.fsdp_config or {})} if k not in launcher_args]
    assert not unknown, f"{path}: fields accelerate does not know: {unknown}"
    assert "gradient_accumulation_steps" not in (config.deepspeed_config or {})  # train.py's argument decides
    _, env = launch_env(path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kind = str(config.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == config.deepspeed_config["zero_stage"]
    elif kind == "FSDP":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2  # the trainer refuses FSDP1
        from diffsynth.models import flux2_dit, flux_dit
        blocks = {c.__name__ for m in (flux_dit, flux2_dit) for c in vars(m).values() if isinstance(c, type)}
        assert set(plugin.transformer_cls_names_to_wrap) <= blocks
    else:
        assert kind == "MULTI_GPU" and "ACCELERATE_USE_FSDP" not in env


@pytest.mark.parametrize("path", [p for p in CONFIGS if "zero" in p.name or p.name == "accelerate_config.yaml"],
                         ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_deepspeed_accepts_the_zero_configs(path, monkeypatch):
    """The part only DeepSpeed can check: its own config class reads the configuration accelerate builds."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    _, env = launch_env(path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ds = dict(DeepSpeedPlugin().deepspeed_config)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=8)
    ds = {k: v for k, v in ds.items() if v != "auto"}
    DeepSpeedConfig(ds, world_size=8)


# ----------------------------------------------------------------------------- FSDP2 runs

def pattern(phase: int) -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([(x * 4 + phase) % 256, (y * 3 + phase) % 256, (x + y) % 256], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    model = build_tiny_flux2(root / "klein")
    data = root / "data"
    data.mkdir()
    for i, phase in enumerate((0, 90)):
        pattern(phase).save(data / f"{i}.png")
    (data / "metadata.csv").write_text("image,prompt\n0.png,a dog\n1.png,a cat\n")
    return model, data


def words(setup, out: Path, *extra: str) -> list[str]:
    model, data = setup
    return ["--dataset_base_path", str(data), "--height", "64", "--width", "64", "--model_paths",
            json.dumps([str(model / "text_encoder"), str(model / "transformer"), str(model / "vae")]),
            "--output_path", str(out), "--dataset_repeat", "2", "--learning_rate", "1e-2", "--seed", "0",
            "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--ema_decay", "0.8",
            "--max_grad_norm", "1.0", "--report_to", "none", *extra]


def launch_fsdp2(argv: list[str]) -> str:
    """train.py under `accelerate launch` with the FSDP2 example config, 2 processes over gloo on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(FSDP2_CONFIG),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(ROOT / "examples/flux2/model_training/train.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 process(es) sharded with FSDP2" in log, log[-3000:]
    return log


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def optimizer_diff(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x["param_groups"] == y["param_groups"] and x["state"].keys() == y["state"].keys()
    return max((x["state"][i][k].float() - y["state"][i][k].float()).abs().max().item()
               for i in x["state"] for k in x["state"][i])


@pytest.mark.slow  # a 2-process launch each, ~15-20 s on 2 cores
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp2_two_processes_train_like_one_process(setup, tmp_path, kind):
    """LoRA: a fresh FSDP2 run. Full: an FSDP2 run resuming the one-process run's step-1 checkpoint (the file
    format is the same whatever the process count). Both end with the one-process run's files."""
    trained = ["--lora_base_model", "dit", "--lora_target_modules", "to_q,to_k,to_v,to_qkv_mlp_proj",
               "--lora_rank", "4"] if kind == "lora" else ["--trainable_models", "dit", "--learning_rate", "1e-3"]
    one = tmp_path / "one"
    single = train(build_parser().parse_args(words(setup, one, *trained, "--gradient_accumulation_steps", "2")))
    assert single["steps"] == 2  # 2 images x 2 repeats, 2 batches per step

    sharded = tmp_path / "sharded"
    if kind == "full":
        def crash(step, loss):
            if step == 1:  # after its checkpoint is written
                raise Crash()
        with pytest.raises(Crash):
            train(build_parser().parse_args(words(setup, sharded, *trained, "--gradient_accumulation_steps", "2")),
                  step_callback=crash)
        assert (sharded / "checkpoints" / "latest").read_text().strip() == "step-1"
        log = launch_fsdp2(words(setup, sharded, *trained, "--resume_from_checkpoint", "latest"))
        assert "resumed from" in log and "data order differs" not in log
    else:
        launch_fsdp2(words(setup, sharded, *trained))

    diffs = {name: max_diff(one / name, sharded / name) for name in (
        "epoch-0.safetensors", "epoch-0-ema.safetensors", "checkpoints/step-2/trainable.safetensors",
        "checkpoints/step-2/ema.safetensors")}
    diffs["optimizer"] = optimizer_diff(one / "checkpoints/step-2/optimizer.pt",
                                        sharded / "checkpoints/step-2/optimizer.pt")
    print(f"{kind}: max abs difference to the one-process run {diffs}")
    assert max(diffs.values()) <= 1e-6
    assert {p.name for p in (sharded / "checkpoints" / "step-2").iterdir()} == \
        {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "ema.safetensors", "state.json", "rng-0.pt",
         "rng-1.pt"}
