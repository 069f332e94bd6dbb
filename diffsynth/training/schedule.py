"""Small pure functions for training schedules: timestep (sigma) samplers and learning-rate curves."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedulers.flow_match import flux_training_sigmas, training_weights
from .names import LR_SCHEDULERS, TIMESTEP_SAMPLINGS

# (sigma, weight) per sample, given batch size, image tokens per sample, and a torch.Generator (or None)
SigmaSampler = Callable[[int, int, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


def grid_sampler(sigmas: torch.Tensor) -> SigmaSampler:
    """DiffSynth-Studio's sampler on a family's training grid (`pipe.training_sigmas()`): a uniform index into
    the grid, weighted by the grid's bump (`training_weights`)."""
    weights = training_weights(sigmas)

    def sample(batch: int, seq_len: int, generator: torch.Generator | None = None):
        idx = torch.randint(0, len(sigmas), (batch,), generator=generator)
        return sigmas[idx], weights[idx]
    return sample


shifted_uniform = grid_sampler(flux_training_sigmas())  # FLUX.1's grid


def logit_normal(batch: int, seq_len: int, generator: torch.Generator | None = None,
                 mean: float = 0.0, std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma = sigmoid(N(mean, std)) (SD3 / kohya "sigmoid"); the density already favours mid noise, weight 1."""
    sigma = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return sigma, torch.ones(batch)


def flux_mu(seq_len: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift exponent: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (seq_len - base_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Exponential time shift e^mu / (e^mu + 1/t - 1): moves sigmas towards 1 for large images."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flux_shift(batch: int, seq_len: int, generator: torch.Generator | None = None,
               mean: float = 0.0, std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-normal sigmas shifted by the resolution-dependent mu FLUX uses at inference (weight 1)."""
    sigma, weight = logit_normal(batch, seq_len, generator, mean, std)
    return time_shift(flux_mu(seq_len), sigma.clamp(1e-5, 1 - 1e-5)), weight


def make_sigma_sampler(kind: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                       grid: torch.Tensor | None = None) -> SigmaSampler:
    """`kind` is --timestep_sampling; "shifted_uniform" draws from `grid`, the family's training sigmas
    (FLUX.1's when not given)."""
    if kind == "shifted_uniform":
        return shifted_uniform if grid is None else grid_sampler(grid)
    if kind == "logit_normal":
        return lambda b, n, g=None: logit_normal(b, n, g, logit_mean, logit_std)
    if kind == "flux_shift":
        return lambda b, n, g=None: flux_shift(b, n, g, logit_mean, logit_std)
    raise ValueError(f"--timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {kind!r}")


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base LR after `step` optimizer steps: linear warmup, then constant/linear/cosine.

    "constant" is exactly 1 after warmup (no hidden 1/3 factor); the decays reach 0 at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {kind!r}")
