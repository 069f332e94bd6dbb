"""A tiny timestep LoRA in DiffSynth-Studio's file layout (PEFT names on the diffusers DiT), for the tiny DiT."""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny import TINY, fill_spec, linear_spec, _write_safetensors

FILE = "adapter_model.safetensors"  # the name DiffSynth-Studio/MultiAlign-FLUX.1-dev uses


def timestep_lora_layers(depth: int, depth_single: int, hidden: int, mlp: int) -> list[tuple[str, int, int]]:
    """(diffusers layer, in, out) of every layer DiffSynth-Studio's timestep LoRA targets."""
    layers = []
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        layers += [(f"{b}.attn.{n}", hidden, hidden) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                               "add_v_proj", "to_out.0", "to_add_out")]
        layers += [(f"{b}.{ff}.net.0.proj", hidden, mlp) for ff in ("ff", "ff_context")]
        layers += [(f"{b}.{ff}.net.2", mlp, hidden) for ff in ("ff", "ff_context")]
    for i in range(depth_single):
        layers += [(f"single_transformer_blocks.{i}.attn.{n}", hidden, hidden) for n in ("to_q", "to_k", "to_v")]
    return layers


def tiny_timestep_lora_state_dict(seed: int = 0, rank: int = 4, dtype: torch.dtype = torch.float32) -> dict:
    d = TINY["dit"]
    spec = []
    for name, n_in, n_out in timestep_lora_layers(d["depth"], d["depth_single_blocks"], d["hidden_size"],
                                                  int(d["hidden_size"] * d["mlp_ratio"])):
        p = f"base_model.model.{name}"
        spec += linear_spec(f"{p}.lora_A", rank, n_in, bias=False) + linear_spec(f"{p}.lora_B", n_out, rank, bias=False)
        spec += linear_spec(f"{p}.lora_time_gamma", rank, 256) + linear_spec(f"{p}.lora_time_beta", rank, 256)
    return fill_spec(spec, seed, "timestep_lora", dtype)


def build_tiny_timestep_lora(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / FILE, tiny_timestep_lora_state_dict(seed))
    return folder
