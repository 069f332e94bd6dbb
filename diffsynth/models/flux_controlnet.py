"""FLUX ControlNets in the diffusers layout (InstantX Union, alimama Inpainting, jasperai Upscaler, InfuseNet).

A ControlNet is a shortened FLUX DiT (K double, M single blocks, the DiT's own block classes) whose image
tokens also receive the embedded condition (`controlnet_x_embedder`); after each block a Linear
(`controlnet_blocks.i` / `controlnet_single_blocks.i`) turns the image tokens into a residual for the base
DiT. The checkpoint variants differ only in sizes, read from the tensor shapes:

* Union (InstantX): `controlnet_mode_embedder` (Embedding, 10 modes): one mode token prepended to the text.
* Inpainting (alimama): `controlnet_x_embedder` takes 4 more channels (the packed 1-channel keep-mask).
* InfuseNet (InfiniteYou): 4 double + 10 single blocks; its text is the identity tokens.

XLabs ControlNets (BFL-named double blocks) take the control image in pixels: `input_hint_block` (8 convs,
3 stride-2) makes a 16-channel latent-sized map of it, and their K residuals repeat over the base blocks
(base block i receives residual i % K).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.files import strip_first_prefix
from ..ops.linear import Linear
from .flux_dit import (BFL_PREFIXES, DoubleBlock, FluxDiT, FluxDiTConfig, MLPEmbedder, SingleBlock,
                       TimestepEmbedder, bfl_key_to_internal, default_axes_dim, dit_from_diffusers, patchify)
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_prefix, plain_tensors

# Union-alpha's control modes: `ControlNetInput.processor_id` -> mode index.
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


@dataclass
class FluxControlNetConfig(FluxDiTConfig):
    """The DiT's configuration (embedders and blocks are the DiT's) plus what the condition input needs."""
    cond_channels: int = 64          # packed condition: 64, or 68 with the inpainting mask
    num_modes: int = 0               # union ControlNets: size of the mode embedding table
    pixel_condition: bool = False    # XLabs: the condition is the image itself, through `input_hint_block`

    @property
    def extra_channels(self) -> int:
        return self.cond_channels - self.in_channels


@dataclass
class ControlNetOutput:
    """Per-block residuals on the image tokens, each (B, N, hidden)."""
    double: list[torch.Tensor]
    single: list[torch.Tensor]
    repeat: bool = False  # XLabs: residual i % K instead of spreading

    def for_block(self, kind: str, index: int, num_base_blocks: int) -> torch.Tensor | None:
        """The residual for base block `index` of `kind`: K residuals spread over the base blocks with
        interval ceil(num_base / K), so base block i receives residual i // interval (diffusers' rule)."""
        samples = self.double if kind == "double" else self.single
        if not samples:
            return None
        if self.repeat:
            return samples[index % len(samples)]
        interval = math.ceil(num_base_blocks / len(samples))
        return samples[index // interval] if index // interval < len(samples) else None


class FluxControlNet(nn.Module):
    # The DiT's embedding, rope and checkpointing helpers; they read the same attribute names.
    dtype = FluxDiT.dtype
    conditioning = FluxDiT.conditioning
    rope = FluxDiT.rope
    _call = FluxDiT._call

    def __init__(self, config: FluxControlNetConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config or FluxControlNetConfig(**kwargs)
        h = config.hidden_size
        self.x_embedder = Linear(config.in_channels, h)
        self.controlnet_x_embedder = Linear(config.cond_channels, h)
        self.context_embedder = Linear(config.context_dim, h)
        self.time_embedder = TimestepEmbedder(h)
        self.guidance_embedder = TimestepEmbedder(h) if config.guidance_embed else None
        self.pooled_text_embedder = MLPEmbedder(config.pooled_dim, h)
        self.controlnet_mode_embedder = nn.Embedding(config.num_modes, h) if config.num_modes else None
        self.blocks = nn.ModuleList(
            DoubleBlock(h, config.num_heads, config.mlp_hidden) for _ in range(config.num_double_blocks))
        self.single_blocks = nn.ModuleList(
            SingleBlock(h, config.num_heads, config.mlp_hidden) for _ in range(config.num_single_blocks))
        self.controlnet_blocks = nn.ModuleList(Linear(h, h) for _ in range(config.num_double_blocks))
        self.controlnet_single_blocks = nn.ModuleList(Linear(h, h) for _ in range(config.num_single_blocks))
        self.input_hint_block = hint_block(config.cond_channels // 4) if config.pixel_condition else None
        self.gradient_checkpointing = False

    @property
    def is_union(self) -> bool:
        return self.controlnet_mode_embedder is not None

    def forward(self, img, img_ids, txt, txt_ids, timestep, pooled, guidance=None, *, cond: torch.Tensor,
                mode: torch.Tensor | None = None) -> ControlNetOutput:
        """img (B, N, in_channels) packed latents with ids (B|-, N, 3); cond (B, N, cond_channels) the packed
        condition, or for pixel-condition (XLabs) ControlNets the image (B, 3, H, W) in [-1, 1]; txt (B, L,
        context_dim) with ids; timestep (B,) sigma; mode (B,) long (union only)."""
        if self.is_union and mode is None:
            raise ValueError("this ControlNet is a union ControlNet: it needs a control mode (processor_id)")
        if self.input_hint_block is not None:
            cond = patchify(self.input_hint_block(cond.to(self.dtype)))  # (B, 3, H, W) -> (B, N, 64)
        x = self.x_embedder(img.to(self.dtype)) + self.controlnet_x_embedder(cond.to(self.dtype))
        vec = self.conditioning(timestep, pooled, guidance if self.guidance_embedder is not None else None)
        txt = self.context_embedder(txt.to(self.dtype))
        if self.is_union:  # one mode token before the text, sharing the first text position
            token = self.controlnet_mode_embedder(mode.to(txt.device))[:, None].to(txt.dtype)
            txt = torch.cat([token.expand(txt.shape[0], -1, -1), txt], 1)
            txt_ids = torch.cat([txt_ids[..., :1, :], txt_ids], -2)
        rope = self.rope(txt_ids, img_ids)
        double = []
        for block, out in zip(self.blocks, self.controlnet_blocks):
            x, txt = self._call(block, x, txt, vec, rope, None, None)
            double.append(out(x))
        n = x.shape[1]
        x = torch.cat([txt, x], 1)
        single = []
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            x = self._call(block, x, vec, rope, None, None, None)
            single.append(out(x[:, -n:]))
        return ControlNetOutput(double, single, repeat=self.config.pixel_condition)


def hint_block(out_channels: int, width: int = 16) -> nn.Sequential:
    """Pixels (B, 3, H, W) -> (B, out_channels, H/8, W/8): 8 3x3 convs with SiLU between, 3 of them stride 2.
    Indices 0, 2, ..., 14 are the convs (XLabs' `input_hint_block.N` names)."""
    strides = (1, 1, 2, 1, 2, 1, 2)
    layers: list[nn.Module] = []
    for i, stride in enumerate(strides):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, stride=stride), nn.SiLU()]
    return nn.Sequential(*layers, nn.Conv2d(width, out_channels, 3, padding=1))


# ----------------------------------------------------------------------------- checkpoint formats

_OWN_KEYS = re.compile(
    r"^(controlnet_x_embedder|controlnet_mode_embedder|controlnet_blocks|controlnet_single_blocks)\.")


# diffusers' ControlNetConditioningEmbedding names of the hint convs -> their index in `hint_block`
_DIFFUSERS_HINT = {"conv_in": 0, **{f"blocks.{i}": 2 * i + 2 for i in range(6)}, "conv_out": 14}


def controlnet_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxControlNetModel keys -> ours. The shared DiT part goes through the DiT converter; the
    ControlNet's own layers keep their names."""
    sd = strip_first_prefix(sd, ("controlnet.",))
    out = {}
    for k, v in sd.items():
        m = re.match(r"input_hint_block\.(conv_in|conv_out|blocks\.\d+)\.(weight|bias)$", k)
        if m:
            out[f"input_hint_block.{_DIFFUSERS_HINT[m.group(1)]}.{m.group(2)}"] = v
        elif _OWN_KEYS.match(k):
            out[k] = v
    rest = {k: v for k, v in sd.items() if not _OWN_KEYS.match(k) and not k.startswith("input_hint_block.")}
    return {**dit_from_diffusers(rest), **out}


def controlnet_from_xlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs FLUX ControlNet keys (BFL-named blocks, `pos_embed_input`, `input_hint_block.N`) -> ours."""
    sd = strip_first_prefix(sd, BFL_PREFIXES)
    out, unknown = {}, []
    for k, v in sd.items():
        if k.startswith(("controlnet_blocks.", "input_hint_block.")):
            out[k] = v
        elif k.startswith("pos_embed_input."):
            out["controlnet_x_embedder." + k.split(".", 1)[1]] = v
        elif (name := bfl_key_to_internal(k)) is not None:
            out[name] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"unknown keys in XLabs FLUX ControlNet checkpoint: {unknown[:10]}")
    return out


def infer_controlnet_config(sd: dict[str, torch.Tensor]) -> FluxControlNetConfig:
    """Architecture from internal-named tensor shapes (block counts, extra channels, mode table, guidance)."""
    try:
        hidden, in_channels = sd["x_embedder.weight"].shape
        cond_channels = sd["controlnet_x_embedder.weight"].shape[1]  # (hint output channels x 4 with a hint)
        context_dim = sd["context_embedder.weight"].shape[1]
        pooled_dim = sd["pooled_text_embedder.0.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a FLUX ControlNet state dict: missing {e.args[0]!r}") from None
    count = lambda prefix: 1 + max((int(k.split(".")[1]) for k in sd if k.startswith(prefix)), default=-1)  # noqa: E731
    n_double, n_single = count("blocks."), count("single_blocks.")
    if n_double:
        head_dim = sd["blocks.0.attn.norm_q_a.weight"].shape[0]
        mlp_hidden = sd["blocks.0.ff_a.0.weight"].shape[0]
    elif n_single:
        head_dim = sd["single_blocks.0.norm_q_a.weight"].shape[0]
        mlp_hidden = sd["single_blocks.0.to_qkv_mlp.weight"].shape[0] - 3 * hidden
    else:
        raise ValueError("a FLUX ControlNet without any block")
    modes = sd.get("controlnet_mode_embedder.weight")
    return FluxControlNetConfig(
        in_channels=in_channels, cond_channels=cond_channels, hidden_size=hidden, num_heads=hidden // head_dim,
        num_double_blocks=n_double, num_single_blocks=n_single, context_dim=context_dim, pooled_dim=pooled_dim,
        mlp_ratio=mlp_hidden / hidden, guidance_embed="guidance_embedder.timestep_embedder.0.weight" in sd,
        num_modes=0 if modes is None else modes.shape[0], axes_dim=default_axes_dim(head_dim),
        pixel_condition="input_hint_block.0.weight" in sd)


# ----------------------------------------------------------------------------- table entry

def detect_diffusers(refs) -> str | None:
    """diffusers FluxControlNetModel (InstantX Union, alimama Inpainting, jasperai Upscaler, ...)."""
    keys = refs.keys()
    if "controlnet_x_embedder.weight" in keys or has_prefix(keys, "controlnet_blocks.0.", "controlnet_single_blocks."):
        if has_prefix(keys, "transformer_blocks.", "single_transformer_blocks.", "x_embedder."):
            return "diffusers"
    return None


def detect_xlabs(refs) -> str | None:
    keys = refs.keys()
    if has_prefix(keys, "input_hint_block.") and has_prefix(keys, "controlnet_blocks.", "double_blocks."):
        return "xlabs"
    return None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    convert = controlnet_from_xlabs if det.format == "xlabs" else controlnet_from_diffusers
    sd = convert(plain_tensors(det, options))
    config = infer_controlnet_config(sd)
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return {"controlnet": assign(FluxControlNet, config, sd, f"FLUX ControlNet from {det.source}")}


# ControlNets run with the DiT at every step: on the device together, offloaded after denoising.
COMPONENTS = (Component("controlnet", "denoise", in_loop=True, many=True, activation="dit"),)
FAMILIES = (Family("flux-controlnet", "FLUX ControlNet (diffusers layout)", detect_diffusers, fills("controlnet"), build),
            Family("xlabs-controlnet", "XLabs FLUX ControlNet", detect_xlabs, fills("controlnet"), build))
