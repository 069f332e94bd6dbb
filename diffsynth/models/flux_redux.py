"""FLUX.1-Redux-dev's image embedder: SigLIP patch features -> tokens in T5 space, appended to the prompt.

Weights: `redux_up` (siglip width -> 3 x T5 width) and `redux_down` (-> T5 width), SiLU between. The BFL
file and diffusers' `image_embedder/` folder use the same names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_key, plain_tensors


@dataclass
class ReduxConfig:
    vision_dim: int = 1152
    hidden_dim: int = 4096 * 3
    text_dim: int = 4096


class ReduxImageEncoder(nn.Module):
    def __init__(self, config: ReduxConfig | None = None):
        super().__init__()
        self.config = config = config or ReduxConfig()
        self.redux_up = Linear(config.vision_dim, config.hidden_dim)
        self.redux_down = Linear(config.hidden_dim, config.text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, patches, vision_dim) -> (B, patches, text_dim)."""
        return self.redux_down(F.silu(self.redux_up(features)))


def infer_redux_config(sd: dict) -> ReduxConfig:
    hidden, vision = sd["redux_up.weight"].shape
    return ReduxConfig(vision_dim=vision, hidden_dim=hidden, text_dim=sd["redux_down.weight"].shape[0])


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    return "bfl" if has_key(refs.keys(), "redux_up.weight") and has_key(refs.keys(), "redux_down.weight") else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = plain_tensors(det, options)
    return {"redux": assign(ReduxImageEncoder, infer_redux_config(sd), sd, f"FLUX.1-Redux embedder from {det.source}")}


COMPONENTS = (Component("redux", "image_encoder", activation="text"),)
FAMILIES = (Family("flux-redux", "FLUX.1-Redux image embedder", detect, fills("redux"), build),)
