"""Test helpers: tiny random FLUX.1 models in the real on-disk layouts."""

from .tiny import (
    COMFY_PREFIXES,
    TINY,
    bfl_to_diffusers_dit,
    build_tiny_comfy_checkpoint,
    build_tiny_flux,
    tiny_ae_state_dict,
    tiny_clip_config,
    tiny_clip_state_dict,
    tiny_dit_state_dict,
    tiny_t5_config,
    tiny_t5_state_dict,
)

__all__ = [
    "COMFY_PREFIXES",
    "TINY",
    "bfl_to_diffusers_dit",
    "build_tiny_comfy_checkpoint",
    "build_tiny_flux",
    "tiny_ae_state_dict",
    "tiny_clip_config",
    "tiny_clip_state_dict",
    "tiny_dit_state_dict",
    "tiny_t5_config",
    "tiny_t5_state_dict",
]
