"""FLEX.2 (ostris): in-painting and structural control through 33 extra input channels.

The condition, concatenated after the 16 latent channels (DiT input (16 + 33) x 4 = 196):
  1. in-paint latents x (1 - mask), 16 channels (zeros without `flex_inpaint_image`);
  2. the mask in [0, 1], white = repaint, of any size, resized (bicubic) to latent resolution (all ones
     without `flex_inpaint_mask`);
  3. control latents x `flex_control_strength` (zeros without `flex_control_image`).
The control channels are used while sigma >= sigmas[int(flex_control_stop * (N - 1))] and zeroed after
(1: throughout, 0.5: first half, 0: only the first step). Training has no schedule: the stop is then
taken on the 1000-step training schedule.
"""
from __future__ import annotations

import torch
from PIL import Image

from ...schedulers.flow_match import flux_sigmas
from ..units import step_unit, unit
from ._images import FLEX_CHANNELS, check_image, dit_channels, image_to_tensor, latent_size, mask_tensor, \
    require_dit, vae_encode

FLEX_ARGUMENTS = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image", "flex_control_strength",
                  "flex_control_stop")
TRAINING_STEPS = 1000


def stop_sigma(sigmas: torch.Tensor, stop: float) -> float:
    if not 0.0 <= stop <= 1.0:
        raise ValueError(f"flex_control_stop must be in [0, 1], got {stop}")
    if len(sigmas) < 2:  # training: no inference schedule
        sigmas = flux_sigmas(TRAINING_STEPS)
    return sigmas[int(stop * (len(sigmas) - 1))].item()


def flex_condition(pipe, noise, inpaint_image, inpaint_mask, control_image, strength: float, tiling: dict):
    """(condition, condition without control), each (B, 33, h, w)."""
    width, height = latent_size(noise)
    b, _, h, w = noise.shape
    zeros = torch.zeros(1, 16, h, w, device=pipe.device, dtype=pipe.torch_dtype)
    inpaint = zeros
    if inpaint_image is not None:
        inpaint = vae_encode(pipe, image_to_tensor(check_image(inpaint_image, "flex_inpaint_image"), width, height),
                             "flex_inpaint_image", **tiling)
    mask = torch.ones(1, 1, h, w, device=pipe.device, dtype=pipe.torch_dtype)
    if inpaint_mask is not None:
        # any size (DiffSynth-Studio's scripts pass a 1024x1024 mask with any image), resampled straight to
        # the latent grid with PIL's bicubic filter, as DiffSynth-Studio does
        mask = mask_tensor(inpaint_mask, "flex_inpaint_mask", None, ("L", "1", "RGB"), resize_to=(w, h),
                           resample=Image.BICUBIC)
        mask = mask.to(pipe.device, pipe.torch_dtype)
    control = zeros
    if control_image is not None:
        control = vae_encode(pipe, image_to_tensor(check_image(control_image, "flex_control_image"), width, height),
                             "flex_control_image", **tiling) * strength
    kept = torch.cat([inpaint * (1 - mask), mask], 1)
    return torch.cat([kept, control], 1).repeat(b, 1, 1, 1), torch.cat([kept, zeros], 1).repeat(b, 1, 1, 1)


FLEX_OUTPUTS = ("flex_condition", "flex_uncondition", "flex_control_stop_sigma")


@unit(uses=("vae_encoder",), image_inputs=("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image"),
      outputs=FLEX_OUTPUTS, model_inputs=FLEX_OUTPUTS, batched=("flex_condition", "flex_uncondition"))
def prepare_flex_condition(pipe, noise, sigmas, flex_inpaint_image=None, flex_inpaint_mask=None,
                           flex_control_image=None, flex_control_strength=None, flex_control_stop=None,
                           tiled=False, tile_size=128, tile_stride=64):
    given = [n for n, v in zip(FLEX_ARGUMENTS, (flex_inpaint_image, flex_inpaint_mask, flex_control_image,
                                                 flex_control_strength, flex_control_stop)) if v is not None]
    if dit_channels(pipe) != FLEX_CHANNELS:
        if given:
            require_dit(pipe, FLEX_CHANNELS, ", ".join(given), "FLEX.2")
        return {}
    strength = 0.5 if flex_control_strength is None else float(flex_control_strength)
    stop = stop_sigma(sigmas, 0.5 if flex_control_stop is None else float(flex_control_stop))
    tiling = dict(tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
    cond, uncond = flex_condition(pipe, noise, flex_inpaint_image, flex_inpaint_mask, flex_control_image, strength,
                                  tiling)
    return {"flex_condition": cond, "flex_uncondition": uncond, "flex_control_stop_sigma": stop}


@step_unit()
def add_flex_condition(models, call, step, flex_condition=None, flex_uncondition=None, flex_control_stop_sigma=None):
    if flex_condition is None:
        return
    # per batch row: training draws one sigma per sample; compared in the timestep's own dtype
    stop = torch.tensor(flex_control_stop_sigma, dtype=call.timestep.dtype)
    use_control = (call.timestep >= stop.to(call.timestep.device)).view(-1, 1, 1, 1)
    call.channels.append(torch.where(use_control, flex_condition, flex_uncondition))


UNITS = [prepare_flex_condition, add_flex_condition]
