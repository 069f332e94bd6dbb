"""Images in and out of the pipeline: PIL <-> tensors, and VAE-encoding an image into latents.

Shared by the base units and every variant that conditions on an image (input image, Kontext/FLEX/Fill/
control images, ControlNet and Step1X references), so they all resize and encode the same way.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

VAE_FACTOR = 8


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images (rounded to uint8)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


def vae_encode(pipe, pixels: torch.Tensor, name: str, tiled: bool = False, tile_size: int = 128,
               tile_stride: int = 64) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) on the pipeline's device and dtype.

    `name` is the argument the image came from (for the error when no VAE encoder is loaded). The encoder is
    moved onto the device only here, when there is an image: txt2img never moves it. tile_size/tile_stride are
    latent units for both VAE halves (the encoder works in pixels)."""
    if pipe.vae_encoder is None:
        raise RuntimeError(f"{name} needs the VAE encoder: add the VAE (ae.safetensors, vae/) to model_configs")
    pipe.load_models_to_device(("vae_encoder",))
    x = pixels.to(pipe.compute_device_of("vae_encoder"), pipe.torch_dtype)
    z = pipe.vae_encoder(x, tiled=tiled, tile_size=tile_size * VAE_FACTOR, tile_stride=tile_stride * VAE_FACTOR)
    return z.to(pipe.device, pipe.torch_dtype)
