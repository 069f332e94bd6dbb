"""FLUX.2 autoencoder: FLUX.1's encoder/decoder configured with 32 latent channels and quant convs, plus
FLUX.2's latent space: 2x2 patches (32 -> 128 channels) normalised by batch-norm running statistics.

The encoder returns normalised, patchified latents (B, 128, H/16, W/16), the decoder takes them back: the
rest of the framework only sees the tokens the FLUX.2 transformer was trained on. Files: diffusers'
`AutoencoderKLFlux2` (`vae/diffusion_pytorch_model.safetensors`: `encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`, `bn.running_mean/var`) and the same modules under BFL's names (`encoder.down.0.*`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from torch import Tensor, nn

from .entry import BuildOptions, Detected, Family, assign, plain_tensors
from .flux_vae import (FluxVAEConfig, FluxVAEDecoder, FluxVAEEncoder, diffusers_parts, infer_vae_config, layout, parts,
                       vae_from_bfl)

PATCH = 2
BATCH_NORM_EPS = 1e-4  # AutoencoderKLFlux2's default `batch_norm_eps`
STAT_KEYS = ("bn.running_mean", "bn.running_var")


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); channel 4c + 2i + j holds pixel (i, j) of each 2x2 patch of channel c."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4) \
        .reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(z: Tensor) -> Tensor:
    """Inverse of `patchify`."""
    b, c, h, w = z.shape
    return z.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3) \
        .reshape(b, c // (PATCH * PATCH), h * PATCH, w * PATCH)


class LatentStats(nn.Module):
    """The running mean/variance of the patchified latents (an affine-free BatchNorm2d in eval mode)."""

    def __init__(self, channels: int, eps: float = BATCH_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def mean_std(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # computed in the buffers' precision, then cast, as diffusers does
        std = torch.sqrt(self.running_var + self.eps)
        return (self.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype),
                std.view(1, -1, 1, 1).to(like.device, like.dtype))


def flux2_config(config: FluxVAEConfig) -> FluxVAEConfig:
    """FLUX.2's latents are normalised by the batch-norm statistics, not by a scale and shift."""
    return replace(config, scaling_factor=1.0, shift_factor=0.0)


class Flux2VAEEncoder(FluxVAEEncoder):
    """Image in [-1, 1], (B, 3, H, W) -> normalised patchified latents (B, 4z, H/16, W/16)."""

    def __init__(self, config: FluxVAEConfig, eps: float = BATCH_NORM_EPS):
        super().__init__(flux2_config(config))
        self.bn = LatentStats(self.config.z_channels * PATCH * PATCH, eps)

    def forward(self, x: Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64) -> Tensor:
        """`tile_size`/`tile_stride` in pixels, as for FLUX.1's encoder (the 2x2 patches come after tiling)."""
        z = patchify(super().forward(x, tiled, tile_size, tile_stride))
        mean, std = self.bn.mean_std(z)
        return (z - mean) / std


class Flux2VAEDecoder(FluxVAEDecoder):
    """Normalised patchified latents (B, 4z, h, w) -> image (B, 3, 16h, 16w), roughly [-1, 1]."""

    def __init__(self, config: FluxVAEConfig, eps: float = BATCH_NORM_EPS):
        super().__init__(flux2_config(config))
        self.bn = LatentStats(self.config.z_channels * PATCH * PATCH, eps)

    def forward(self, z: Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64) -> Tensor:
        """`tile_size`/`tile_stride` in units of the unpatchified 8x latents, as for FLUX.1's decoder."""
        mean, std = self.bn.mean_std(z)
        return super().forward(unpatchify(z * std + mean), tiled, tile_size, tile_stride)


# ----------------------------------------------------------------------------- checkpoints

StateDict = Mapping[str, Tensor]


def _stats(state_dict: StateDict) -> dict[str, Tensor]:
    missing = [k for k in STAT_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not a FLUX.2 VAE state dict: missing keys {missing} (the latent statistics)")
    return {k: state_dict[k] for k in STAT_KEYS}


def flux2_vae_parts(state_dict: StateDict, fmt: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder_sd, decoder_sd) in our names, each with the latent statistics (`bn.*`); `fmt` "diffusers"
    (AutoencoderKLFlux2) or "bfl" (BFL block names, quant convs at the top level or inside encoder/decoder)."""
    stats = _stats(state_dict)
    if fmt == "diffusers":
        enc, dec = diffusers_parts(state_dict)
    else:
        nested = {k: v for k, v in state_dict.items() if not k.startswith(("bn.", "quant_conv.", "post_quant_conv."))}
        nested.update({"encoder." + k: v for k, v in state_dict.items() if k.startswith("quant_conv.")})
        nested.update({"decoder." + k: v for k, v in state_dict.items() if k.startswith("post_quant_conv.")})
        enc, dec = vae_from_bfl(nested)
    if "quant_conv.weight" not in enc or "post_quant_conv.weight" not in dec:
        raise ValueError("not a FLUX.2 VAE state dict: quant_conv / post_quant_conv missing")
    channels = 4 * enc["quant_conv.weight"].shape[0] // 2
    if stats["bn.running_mean"].shape != (channels,):
        raise ValueError(f"FLUX.2 VAE latent statistics have {tuple(stats['bn.running_mean'].shape)} entries, "
                         f"the encoder's 2x2 patches {channels}")
    return {**enc, **stats}, {**dec, **stats}


def vae_config(part: StateDict) -> FluxVAEConfig:
    """The architecture of one half (statistics excluded), read from its shapes."""
    return infer_vae_config({k: v for k, v in part.items() if not k.startswith("bn.")})


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """FLUX.1's layout plus the batch-norm statistics of the patchified latents."""
    keys = refs.keys()
    return layout(keys) if "bn.running_mean" in keys and "bn.running_var" in keys else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    eps = float((det.config or {}).get("batch_norm_eps", BATCH_NORM_EPS))
    enc, dec = flux2_vae_parts(plain_tensors(det, options), det.format)
    return {"vae_encoder": assign(lambda c: Flux2VAEEncoder(c, eps), vae_config(enc), enc,
                                  f"FLUX.2 VAE encoder from {det.source}"),
            "vae_decoder": assign(lambda c: Flux2VAEDecoder(c, eps), vae_config(dec), dec,
                                  f"FLUX.2 VAE decoder from {det.source}")}


FAMILIES = (Family("flux2-vae", "FLUX.2 VAE", detect, parts, build, pipeline="flux2"),)
