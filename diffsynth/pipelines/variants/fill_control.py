"""FLUX.1-Fill-dev (in-painting) and FLUX.1-Canny/Depth-dev (structural control): extra input channels.

Fill (`flux_fill_image` + `flux_fill_mask`, mode "L", white = repaint): the image with the masked
pixels blanked (x (1 - mask), mask binarized at 0.5) is VAE-encoded (16 channels), and the pixel mask
is folded 8x8 into 64 channels at latent resolution: DiT input (16 + 16 + 64) x 4 = 384.
Canny/Depth (`flux_control_image`: a canny edge map or a depth map, made by any annotator): its
latents are the 16 extra channels: DiT input (16 + 16) x 4 = 128.
"""
from __future__ import annotations

import torch

from ..units import step_unit, unit
from ._images import CONTROL_CHANNELS, FILL_CHANNELS, VAE_FACTOR, check_image, dit_channels, image_to_tensor, \
    latent_size, mask_tensor, require_dit, vae_encode


def fold_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 64, H/8, W/8): channel dy * 8 + dx holds pixel (8y + dy, 8x + dx)."""
    b, _, height, width = mask.shape
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    x = mask.view(b, h, VAE_FACTOR, w, VAE_FACTOR).permute(0, 2, 4, 1, 3)
    return x.reshape(b, VAE_FACTOR * VAE_FACTOR, h, w)


FILL_OUTPUTS = ("fill_condition",)


@unit(uses=("vae_encoder",), image_inputs=("flux_fill_image", "flux_fill_mask"), outputs=FILL_OUTPUTS, model_inputs=FILL_OUTPUTS, batched=FILL_OUTPUTS)
def prepare_fill_condition(pipe, noise, flux_fill_image=None, flux_fill_mask=None, tiled=False, tile_size=128,
                           tile_stride=64):
    """(B, 80, h, w): masked-image latents, then the folded mask."""
    if flux_fill_image is None and flux_fill_mask is None:
        if dit_channels(pipe) == FILL_CHANNELS:
            raise ValueError("the FLUX.1-Fill DiT needs flux_fill_image and flux_fill_mask (white = repaint)")
        return {}
    require_dit(pipe, FILL_CHANNELS, "flux_fill_image/flux_fill_mask", "FLUX.1-Fill")
    if flux_fill_image is None or flux_fill_mask is None:
        missing = "flux_fill_mask" if flux_fill_mask is None else "flux_fill_image"
        raise ValueError(f"FLUX.1-Fill needs both flux_fill_image and flux_fill_mask; {missing} is missing")
    check_image(flux_fill_image, "flux_fill_image")
    width, height = latent_size(noise)
    mask = mask_tensor(flux_fill_mask, "flux_fill_mask", flux_fill_image.size, ("L", "1"), resize_to=(width, height))
    mask = (mask >= 0.5).float()
    masked = image_to_tensor(flux_fill_image, width, height) * (1 - mask)
    z = vae_encode(pipe, masked, "flux_fill_image", tiled, tile_size, tile_stride)
    cond = torch.cat([z, fold_mask(mask).to(z)], 1)
    return {"fill_condition": cond.repeat(noise.shape[0], 1, 1, 1)}


CONTROL_OUTPUTS = ("control_latents",)


@unit(uses=("vae_encoder",), image_inputs=("flux_control_image",), outputs=CONTROL_OUTPUTS, model_inputs=CONTROL_OUTPUTS, batched=CONTROL_OUTPUTS)
def prepare_control_latents(pipe, noise, flux_control_image=None, tiled=False, tile_size=128, tile_stride=64):
    if flux_control_image is None:
        if dit_channels(pipe) == CONTROL_CHANNELS:
            raise ValueError("the FLUX.1-Canny/Depth DiT needs flux_control_image (a canny edge or depth map)")
        return {}
    require_dit(pipe, CONTROL_CHANNELS, "flux_control_image", "FLUX.1-Canny/Depth")
    width, height = latent_size(noise)
    z = vae_encode(pipe, image_to_tensor(check_image(flux_control_image, "flux_control_image"), width, height),
                   "flux_control_image", tiled, tile_size, tile_stride)
    return {"control_latents": z.repeat(noise.shape[0], 1, 1, 1)}


@step_unit()
def add_condition_channels(models, call, step, fill_condition=None, control_latents=None):
    for condition in (fill_condition, control_latents):
        if condition is not None:
            call.channels.append(condition)


UNITS = [prepare_fill_condition, prepare_control_latents, add_condition_channels]
