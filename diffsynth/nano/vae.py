"""Training a FLUX autoencoder (BFL ``ae.safetensors`` layout, 16 latent channels) from scratch.

Loss: L1 reconstruction, weighted `foreground_weight` + 1 on the shape's pixels, + `kl_weight` x KL to
N(0, 1), means over elements. The KL is taken on the *normalized* latents, ``(mean - shift) * scale``, the
ones the DiT sees. What made this narrow autoencoder learn colour and shape (measured, 1500 steps):

* the foreground weight: the shape is ~10 % of the pixels, and with a plain L1 the decoder settled for one
  mean-coloured blurred blob at the right place (colour 20 %, shape 33 % read back after 200-400 steps);
* a weak KL (1e-5; at 1e-3 the noise it asks for drowned the means) and decoding from the mean plus
  `posterior_noise` (0.3) of the posterior's standard deviation: enough noise that nearby latents decode
  alike (the DiT's latents are never exact), not so much that it hides the colour;
* drawings of the grammar's sizes (shapes.random_image).

``python -m diffsynth.nano.vae --output ae.safetensors`` trains flux-nano's autoencoder (its recipe: the defaults).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..models.flux_vae import FluxVAEConfig, FluxVAEDecoder, FluxVAEEncoder
from ..ops.files import save_safetensors
from .shapes import BACKGROUND, random_image
from ..ops.images import convert_image

NANO_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)


@dataclass(frozen=True)
class VAETraining:
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 2e-3
    kl_weight: float = 1e-5
    foreground_weight: float = 4.0
    posterior_noise: float = 0.3
    seed: int = 0


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], the range the FLUX VAE works in."""
    arrays = np.stack([np.asarray(convert_image(im), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def random_batches(batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Whole random SIZE-pixel drawings. Not crops, not smaller drawings: measured, an autoencoder trained
    on 24-pixel crops or 32-pixel drawings reconstructs whole 64-pixel images badly (its GroupNorms see
    other statistics)."""
    rng = random.Random(seed)
    while True:
        yield to_tensor([random_image(rng) for _ in range(batch_size)])


def foreground(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) 1.0 where a pixel differs from the background."""
    background = torch.tensor(BACKGROUND, dtype=x.dtype) / 127.5 - 1
    return ((x - background[:, None, None]).abs().sum(1, keepdim=True) > 0.1).to(x.dtype)


class NormalizedMoments:
    """Captures the encoder's raw (mean, logvar) output and returns both in the normalized latent space.

    The encoder's forward only returns the normalized mean (what inference needs); training also needs
    the variance, which a hook on `conv_out` reads without duplicating the encoder's code.
    """

    def __init__(self, encoder: FluxVAEEncoder):
        self.encoder, self.raw = encoder, None
        encoder.conv_out.register_forward_hook(lambda _m, _i, out: setattr(self, "raw", out))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.encoder(x)
        logvar = self.raw[:, self.encoder.config.z_channels:].clamp(-30.0, 20.0)
        return mean, logvar + 2 * math.log(self.encoder.config.scaling_factor)


def vae_loss(encoder_moments: Callable, decoder: FluxVAEDecoder, x: torch.Tensor, recipe: VAETraining,
             generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """The training loss and the plain L1 of the reconstruction (for the progress bar)."""
    mean, logvar = encoder_moments(x)
    z = mean + recipe.posterior_noise * (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
    error = (decoder(z) - x).abs()                                                      # (B, 3, H, W)
    weighted = (error * (1 + recipe.foreground_weight * foreground(x))).mean()
    return weighted + recipe.kl_weight * kl_to_standard_normal(mean, logvar), error.mean().item()


def train_vae(recipe: VAETraining = VAETraining(), config: FluxVAEConfig | None = None
              ) -> tuple[FluxVAEEncoder, FluxVAEDecoder, dict]:
    """Train encoder + decoder on random shapes; returns them (eval mode) and a summary."""
    torch.manual_seed(recipe.seed)
    config = config or FluxVAEConfig(**NANO_VAE)
    encoder, decoder = FluxVAEEncoder(config), FluxVAEDecoder(config)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    # cosine decay: large steps early, fine detail at the end
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    moments, generator = NormalizedMoments(encoder), torch.Generator().manual_seed(recipe.seed)
    started, recon_history = time.time(), []
    data = random_batches(recipe.batch_size, recipe.seed)
    with tqdm(range(recipe.steps), desc="train autoencoder", dynamic_ncols=True) as progress:
        for _ in progress:
            loss, recon = vae_loss(moments, decoder, next(data), recipe, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recon_history.append(recon)
            progress.set_postfix(l1=f"{np.mean(recon_history[-50:]):.4f}")
    encoder.eval(), decoder.eval()
    summary = {**asdict(recipe), "final_l1": float(np.mean(recon_history[-50:])), "seconds": time.time() - started}
    return encoder, decoder, summary


def save_ae(encoder: FluxVAEEncoder, decoder: FluxVAEDecoder, path: str | Path) -> None:
    """BFL ``ae.safetensors`` key names: ``encoder.*`` / ``decoder.*``."""
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    tensors.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


@torch.no_grad()
def latent_stats(encoder: FluxVAEEncoder, decoder: FluxVAEDecoder, images: torch.Tensor) -> dict[str, float]:
    """Normalized latent mean/std (the DiT wants ~0/~1) and the reconstruction L1 of the mean latent."""
    z = encoder(images)
    return {"latent_mean": float(z.mean()), "latent_std": float(z.std()),
            "recon_l1": float((decoder(z) - images).abs().mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a FLUX-layout autoencoder on random shapes.")
    p.add_argument("--output", required=True, help="ae.safetensors to write")
    for field in fields(VAETraining):
        p.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    args = vars(p.parse_args(argv))
    output = args.pop("output")
    encoder, decoder, summary = train_vae(VAETraining(**args))
    save_ae(encoder, decoder, output)
    print({**summary, **latent_stats(encoder, decoder, next(random_batches(64, args["seed"] + 1)))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
