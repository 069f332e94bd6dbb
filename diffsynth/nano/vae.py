"""Training a FLUX autoencoder (BFL ``ae.safetensors`` layout, 16 latent channels) from scratch.

Loss: L1 reconstruction + `kl_weight` x KL to N(0, 1), both means over elements. The KL is taken on the
*normalized* latents, ``(mean - shift) * scale``, the ones the DiT sees. Keep it weak: at 1e-3 the
posterior noise it asks for drowned the means (std 0.3) and the decoder learned grey blobs with the right
position but no colour or shape (measured); 1e-5 only keeps the latent scale in check.

``python -m diffsynth.nano.vae --output ae.safetensors --steps 1500`` trains on random shapes.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..models.flux_vae import FluxVAEConfig, FluxVAEDecoder, FluxVAEEncoder
from ..ops.files import save_safetensors
from .shapes import SIZE, random_image

NANO_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], the range the FLUX VAE works in."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def random_crop(image: Image.Image, crop: int, rng: random.Random) -> Image.Image:
    x, y = rng.randrange(image.width - crop + 1), rng.randrange(image.height - crop + 1)
    return image.crop((x, y, x + crop, y + crop))


def random_batches(batch_size: int, seed: int, crop: int = SIZE) -> Iterator[torch.Tensor]:
    """Random SIZE-pixel drawings cut to `crop` pixels (shapes keep their pixel scale). Crops are cheaper
    but, measured, an autoencoder trained on 24-pixel crops reconstructs whole 64-pixel images badly: its
    GroupNorms see other statistics on a whole, mostly background, image. flux-nano trains on whole images."""
    rng = random.Random(seed)
    while True:
        yield to_tensor([random_crop(random_image(rng), crop, rng) for _ in range(batch_size)])


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


def vae_loss(encoder_moments: Callable, decoder: FluxVAEDecoder, x: torch.Tensor, kl_weight: float,
             generator: torch.Generator) -> tuple[torch.Tensor, float]:
    mean, logvar = encoder_moments(x)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
    recon = (decoder(z) - x).abs().mean()
    return recon + kl_weight * kl_to_standard_normal(mean, logvar), recon.detach().item()


def train_vae(steps: int, batch_size: int = 16, learning_rate: float = 1e-3, kl_weight: float = 1e-5,
              seed: int = 0, crop: int = SIZE, config: FluxVAEConfig | None = None
              ) -> tuple[FluxVAEEncoder, FluxVAEDecoder, dict]:
    """Train encoder + decoder on random shapes; returns them (eval mode) and a summary."""
    torch.manual_seed(seed)
    config = config or FluxVAEConfig(**NANO_VAE)
    encoder, decoder = FluxVAEEncoder(config), FluxVAEDecoder(config)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    # cosine decay: large steps early, fine detail at the end
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    moments, generator = NormalizedMoments(encoder), torch.Generator().manual_seed(seed)
    started, recon_history = time.time(), []
    data = random_batches(batch_size, seed, crop)
    with tqdm(range(steps), desc="train autoencoder", dynamic_ncols=True) as progress:
        for _ in progress:
            loss, recon = vae_loss(moments, decoder, next(data), kl_weight, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recon_history.append(recon)
            progress.set_postfix(l1=f"{np.mean(recon_history[-50:]):.4f}")
    encoder.eval(), decoder.eval()
    summary = {"steps": steps, "batch_size": batch_size, "crop": crop, "learning_rate": learning_rate,
               "kl_weight": kl_weight, "seed": seed, "final_l1": float(np.mean(recon_history[-50:])),
               "seconds": time.time() - started}
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
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-5)
    p.add_argument("--crop", type=int, default=SIZE, help="training crop side (pixels) of the 64-pixel drawings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    encoder, decoder, summary = train_vae(args.steps, args.batch_size, args.learning_rate, args.kl_weight,
                                          args.seed, args.crop)
    save_ae(encoder, decoder, args.output)
    print({**summary, **latent_stats(encoder, decoder, next(random_batches(64, args.seed + 1)))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
