"""What the image-conditioned variants share: checking condition images and masks, VAE-encoding them,
and asking which kind of DiT is loaded (the variants' DiTs differ only in their input channels)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..images import VAE_FACTOR, image_to_tensor, vae_encode  # noqa: F401  (the variants' image helpers)
from ...ops.images import check_image, convert_image, image_list  # noqa: F401  (re-exported)

from ...models.flux_dit import (BASE_CHANNELS, CONTROL_CHANNELS, FILL_CHANNELS, FLEX_CHANNELS,  # noqa: F401
                                 VARIANT_BY_CHANNELS)

PATCH = 2


def dit_channels(pipe) -> int:
    return pipe.dit.config.in_channels


def dit_kind(pipe) -> str:
    c = dit_channels(pipe)
    return f"a {VARIANT_BY_CHANNELS[c]} DiT" if c in VARIANT_BY_CHANNELS else f"a DiT with {c} input channels"


def require_dit(pipe, channels: int, argument: str, model: str) -> None:
    """`argument` only makes sense for the DiT with `channels` inputs: say which DiT is loaded otherwise."""
    if dit_channels(pipe) != channels:
        raise ValueError(f"{argument} needs the {model} DiT ({channels} input channels); the loaded DiT is "
                         f"{dit_kind(pipe)} ({dit_channels(pipe)} input channels)")


def mask_tensor(mask, name: str, size: tuple[int, int] | None, modes: tuple[str, ...], resize_to=None,
                resample: int = Image.BILINEAR) -> torch.Tensor:
    """A mask image -> (1, 1, h, w) in [0, 1] (white = 1). It must have the size of the image it masks
    (`size`, (width, height); None: any size) and one of `modes`; `resize_to` (width, height) resamples
    it with `resample` (an RGB mask: its first channel)."""
    check_image(mask, name)
    if mask.mode not in modes:
        raise ValueError(f"{name} must be a mask image of mode {' or '.join(map(repr, modes))} "
                         f"(white = the region to paint), got mode {mask.mode!r}: use .convert('L')")
    if size is not None and mask.size != size:
        raise ValueError(f"{name} is {mask.size[0]}x{mask.size[1]} but the image it masks is {size[0]}x{size[1]}")
    # PIL resamples each channel on its own: channel 0 then resize == resize the RGB image then channel 0
    mask = convert_image(mask).getchannel(0) if mask.mode == "RGB" else convert_image(mask, "L")
    if resize_to is not None and mask.size != resize_to:
        mask = mask.resize(resize_to, resample)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def latent_size(noise: torch.Tensor) -> tuple[int, int]:
    """(width, height) in pixels of the generated image, from the noise (B, 16, h, w)."""
    return noise.shape[3] * VAE_FACTOR, noise.shape[2] * VAE_FACTOR
