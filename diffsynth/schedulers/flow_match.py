"""Rectified-flow (flow-matching) schedule for FLUX: shifted linear sigmas, Euler steps, training weights."""
from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.003 / 1.002
SIGMA_MAX = 1.0
DEFAULT_SHIFT = 3.0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_sigmas(num_steps: int, denoising_strength: float = 1.0, shift: float = DEFAULT_SHIFT,
                sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """`num_steps` shifted sigmas from sigma_start down to sigma_min.

    denoising_strength scales the starting sigma; every one of the N steps is still spent between
    sigma_start and sigma_min (DiffSynth-Studio's img2img semantics, not an index into a longer schedule).
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    start = sigma_min + (sigma_max - sigma_min) * denoising_strength
    return shift_sigmas(torch.linspace(start, sigma_min, num_steps, dtype=torch.float64), shift).float()


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + velocity * (sigma_next - sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def training_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """The weights of a training grid of sigmas (one per index, 1000 for a 1000-step grid): a Gaussian bump
    around t = 500 on t = 1000 * sigma, shifted to 0 at its lowest point and scaled to mean 1."""
    t = sigmas.double() * 1000
    y = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    y = y - y.min()
    return (y * len(sigmas) / y.sum()).float()


def flux_training_sigmas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """FLUX.1's training grid: the inference schedule over 1000 steps (shift 3)."""
    return flux_sigmas(num_train_timesteps, 1.0, DEFAULT_SHIFT)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's time-shift exponent: fitted lines in the image token count at 10 and 200 steps,
    interpolated linearly in the step count; beyond 4300 tokens the 200-step line alone."""
    at_200 = 1.6927e-4 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-5 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(at_200 + slope * (num_steps - 200))


def flux2_sigmas(num_steps: int, image_seq_len: int, denoising_strength: float = 1.0,
                 mu: float | None = None) -> torch.Tensor:
    """FLUX.2 [klein]'s `num_steps` sigmas: linear from sigma_start down to 1/num_steps, then shifted
    exponentially, e^mu / (e^mu + 1/sigma - 1), with mu = flux2_empirical_mu(image_seq_len, num_steps)
    unless given. The last step goes to 0. denoising_strength scales sigma_start within [1/N, 1] (img2img)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    low = 1.0 / num_steps
    start = low + (1.0 - low) * denoising_strength
    sigmas = torch.linspace(start, low, num_steps, dtype=torch.float64)
    shift = math.exp(flux2_empirical_mu(image_seq_len, num_steps) if mu is None else mu)
    return (shift / (shift + (1 / sigmas - 1))).float()


FLUX2_TRAINING_MU = 0.8  # DiffSynth-Studio 2.0 trains FLUX.2 on a fixed shift, whatever the image size


def flux2_training_sigmas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """FLUX.2's training grid: its inference schedule over 1000 steps (1 down to 1/1000, exponential shift)
    with mu fixed at FLUX2_TRAINING_MU instead of the resolution-dependent one."""
    return flux2_sigmas(num_train_timesteps, 0, mu=FLUX2_TRAINING_MU)
