"""AttriCtrl value controllers (DiffSynth-Studio/AttriCtrl-FLUX.1-Dev, e.g. `brightness.safetensors`).

A scalar in [0, 1] -> x1000 -> sinusoidal embedding (256, cos half first) -> Linear-SiLU-Linear to the token
width -> broadcast to `tokens` positions plus a learned positional embedding: (tokens, width) prompt tokens.
Checkpoint names (kept as ours): `prefer_value_embedder.{0,2}.*`, `positional_embedding` (tokens, width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.files import CheckpointError
from ..ops.linear import Linear
from .flux_dit import timestep_embedding
from .entry import BuildOptions, Component, Detected, Family, assign, fills, plain_tensors, shapes


@dataclass
class ValueControllerConfig:
    freq_dim: int = 256
    width: int = 4096
    tokens: int = 32


class ValueController(nn.Module):
    def __init__(self, config: ValueControllerConfig):
        super().__init__()
        self.config = config
        self.prefer_value_embedder = nn.Sequential(Linear(config.freq_dim, config.width), nn.SiLU(),
                                                   Linear(config.width, config.width))
        self.positional_embedding = nn.Parameter(torch.empty(config.tokens, config.width))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        """value () in [0, 1] -> (tokens, width)."""
        pos = self.positional_embedding  # under VRAM management: the compute copy, on the compute device
        freq = timestep_embedding(value.reshape(1).float().to(pos.device) * 1000, self.config.freq_dim).to(pos.dtype)
        return self.prefer_value_embedder(freq) + pos  # (1, w) + (tokens, w)


def infer_value_controller_config(shapes: dict[str, tuple[int, ...]]) -> ValueControllerConfig:
    try:
        width, freq = shapes["prefer_value_embedder.0.weight"]
        tokens = shapes["positional_embedding"][0]
    except KeyError as e:
        raise CheckpointError(f"not a complete value controller: missing {e.args[0]!r}") from None
    return ValueControllerConfig(freq, width, tokens)


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if "positional_embedding" in keys and "prefer_value_embedder.0.weight" in keys else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    config = infer_value_controller_config(shapes(det.refs))
    return {"value_controller": assign(ValueController, config, plain_tensors(det, options),
                                       f"value controller from {det.source}")}


COMPONENTS = (Component("value_controller", "prompt_tokens", many=True),)
FAMILIES = (Family("flux-value-controller", "FLUX AttriCtrl value controller", detect, fills("value_controller"),
                   build),)
