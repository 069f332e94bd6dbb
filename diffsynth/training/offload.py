"""Low-memory training on the VRAM manager (loading/vram.py): where each model's weights are stored.

`--fp8_models` stores the named models' matrices in fp8 and `--offload_models` / `--enable_model_cpu_offload` keep
weights in CPU RAM; both are `ModelConfig` storage settings, so the loaded layers are the VRAM manager's cast layers
that fetch their weights to the device, in the compute dtype, for each call. A LoRA on such a layer adds its own
term on top. Streamed layers hold a device copy only while they run, and gradient checkpointing (turned on with
`--enable_model_cpu_offload`) makes the backward pass fetch them again instead of keeping every copy alive.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn

from ..loading import vram
from ..loading.model_config import ModelConfig
from ..loading.registry import detect

FP8_STORAGE = torch.float8_e4m3fn


def source_string(config: ModelConfig) -> str:
    """How a config was written on the command line (an entry of --model_paths or --model_id_with_origin_paths)."""
    if config.path is not None:
        return config.path if isinstance(config.path, str) else str(config.path)
    return f"{config.model_id}:{config.origin_file_pattern}"


def config_models(config: ModelConfig) -> set[str]:
    """The pipeline attributes (dit, vae, text_encoder_2, ...) the files of `config` load into (keys + shapes)."""
    return {name for det in detect(config.resolve()) for name in det.components}


def storage_configs(configs: list[ModelConfig], args: argparse.Namespace) -> list[ModelConfig]:
    """The configs with the storage --fp8_models, --offload_models and --enable_model_cpu_offload ask for. An entry
    names a pipeline model or is one of the given model sources, as in DiffSynth-Studio 2.0."""
    wanted = {"--fp8_models": args.fp8_models, "--offload_models": args.offload_models}
    if not any(wanted.values()) and not args.enable_model_cpu_offload:
        return configs
    names = [config_models(c) for c in configs]
    for flag, entries in wanted.items():
        unknown = [e for e in entries if not any(e == source_string(c) or e in n for c, n in zip(configs, names))]
        if unknown:
            known = sorted({*set().union(*names), *map(source_string, configs)})
            raise ValueError(f"{flag} {unknown}: no such model among the loaded ones ({', '.join(known)})")
    out = []
    for config, models in zip(configs, names):
        hit = lambda entries: any(e == source_string(config) or e in models for e in entries)  # noqa: E731
        changes = {}
        if hit(args.fp8_models):
            changes["offload_dtype"] = FP8_STORAGE
        if hit(args.offload_models) or args.enable_model_cpu_offload:
            changes["offload_device"] = "cpu"
        out.append(dataclasses.replace(config, **changes) if changes else config)
    return out


def place_trained(module: nn.Module, device: torch.device, on_cpu: bool) -> None:
    """Put the trained weights on the compute device, or (`on_cpu`, --enable_optimizer_cpu_offload) keep them in
    CPU RAM as streamed layers computing in their own dtype: their gradients then land on the CPU copies, where
    the optimizer steps."""
    for layer in {m for m in module.modules() for p in m.parameters(recurse=False) if p.requires_grad}:
        dtype = next(p.dtype for p in layer.parameters(recurse=False) if p.requires_grad)
        if on_cpu:
            vram.cast_layer(layer, device, dtype)
        vram.move_unit(layer, torch.device("cpu") if on_cpu else device)
