"""FLUX.1 autoencoder (the 16-channel KL VAE shipped as BFL ``ae.safetensors``).

Parameter names follow the BFL checkpoint exactly (minus the leading ``encoder.`` /
``decoder.``), so a BFL file loads with a plain prefix strip. Diffusers ``AutoencoderKL``
files go through :func:`vae_from_diffusers`.

Latent convention: the encoder returns *normalized* latents
``(mean - shift_factor) * scaling_factor`` and the decoder undoes that first, so the
rest of the framework only ever sees the latents the transformer was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .entry import BuildOptions, Component, Detected, Family, assign, has_prefix, plain_tensors

__all__ = [
    "FluxVAEConfig",
    "FluxVAEEncoder",
    "FluxVAEDecoder",
    "tiled_apply",
    "vae_from_bfl",
    "vae_from_diffusers",
    "diffusers_parts",
    "infer_vae_config",
]


@dataclass
class FluxVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    # 1x1 convolutions on the moments (encoder) and on the latents (decoder): FLUX.1 has none, FLUX.2 has both.
    quant_conv: bool = False

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis (one halving per level but the last)."""
        return 2 ** (len(self.ch_mult) - 1)


# ----------------------------------------------------------------------------- blocks


def _conv_layout(x: Tensor) -> Tensor:
    """Channels-last activations on CPU: oneDNN's convolutions run ~10 % faster on them (measured on the
    full-size decoder); every layer keeps the layout it is given."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """silu(norm(x)), the activation written over the norm's fresh output when no gradient is recorded
    (autograd would need the overwritten values): one full-resolution buffer less per call."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only created when the width changes, matching the checkpoint layout.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x) if not torch.is_grad_enabled() else x + h  # (h is the conv's fresh output)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 convs as projections)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            # Contiguous channels: flash/memory-efficient SDPA kernels need them; with strided tokens SDPA
            # falls back to the math path and materialises the (H*W)^2 score matrix (1 GB fp32 at 1024 px).
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1).contiguous()

        y = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric pad (right/bottom only) is what the weights were trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


# ----------------------------------------------------------------------------- tiling


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length); the last tile is pulled back to end at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp: int, fade_in: bool, fade_out: bool) -> Tensor:
    """1-D blend weight: 1 in the middle, linear fade over `ramp` samples at cut edges.

    Weights stay strictly positive so every output pixel has a non-zero total, and edges
    that lie on the image border get full weight (no neighbour to blend with there).
    """
    w = torch.ones(size)
    ramp = min(ramp, size // 2)
    if ramp > 0:
        r = (torch.arange(ramp) + 0.5) / ramp
        if fade_in:
            w[:ramp] = r
        if fade_out:
            w[size - ramp :] = r.flip(0)
    return w


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, stride: int, scale: float
) -> Tensor:
    """Run `fn` on overlapping spatial tiles of `x` and blend the results.

    `fn` maps (B, C, h, w) to (B, C', h*scale, w*scale); `tile`/`stride` are in input
    units. Overlaps are cross-faded with linear ramps as wide as the overlap (output
    units), then normalized by the summed weights. If `x` fits in one tile this is
    exactly `fn(x)`.
    """
    if stride <= 0 or stride > tile:
        raise ValueError(f"need 0 < tile_stride <= tile_size, got tile={tile}, stride={stride}")
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return fn(x)

    def out_len(n: int) -> int:
        # Tile origins must land on whole output pixels, otherwise tiles would be misplaced.
        m = n * scale
        if abs(m - round(m)) > 1e-9:
            raise ValueError(f"tile/stride/size {n} is not a multiple of 1/scale={1 / scale:g}")
        return round(m)

    rows, cols = _tile_starts(H, tile, stride), _tile_starts(W, tile, stride)
    for n in (H, W, tile, stride):
        out_len(n)
    ramp = out_len(tile - stride)

    th, tw = min(tile, H), min(tile, W)
    out = weight = None
    for y0 in rows:
        for x0 in cols:
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            if out is None:  # shape/device/dtype known only after the first call
                out = torch.zeros(*y.shape[:-2], out_len(H), out_len(W), device=y.device)
                weight = torch.zeros(out_len(H), out_len(W), device=y.device)
            oy, ox, oh, ow = out_len(y0), out_len(x0), y.shape[-2], y.shape[-1]
            mask = torch.outer(
                _ramp(oh, ramp, y0 > 0, y0 + th < H), _ramp(ow, ramp, x0 > 0, x0 + tw < W)
            ).to(y.device)
            # Accumulate in fp32 so bf16/fp16 tiles don't lose precision in the sum.
            out[..., oy : oy + oh, ox : ox + ow] += y.float() * mask
            weight[oy : oy + oh, ox : ox + ow] += mask
    return (out / weight).to(y.dtype)


# ----------------------------------------------------------------------------- encoder / decoder


class FluxVAEEncoder(nn.Module):
    """Image in [-1, 1], (B, in_channels, H, W) -> normalized latents (B, z, H/8, W/8)."""

    def __init__(self, config: FluxVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or FluxVAEConfig()
        g = cfg.num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, cfg.ch * mult, g))
                block_in = cfg.ch * mult
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = MidBlock(block_in, g)
        self.norm_out = _norm(block_in, g)
        # 2*z: mean and log-variance; we only ever use the mean.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def _encode(self, x: Tensor) -> Tensor:
        h = self.conv_in(_conv_layout(x))
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        h = self.conv_out(_norm_silu(self.norm_out, h))
        if self.config.quant_conv:
            h = self.quant_conv(h)
        mean = h[:, : self.config.z_channels]
        return ((mean - self.config.shift_factor) * self.config.scaling_factor).contiguous()

    def forward(
        self, x: Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> Tensor:
        """Encode `x`. With `tiled`, `tile_size`/`tile_stride` are in PIXELS here.

        The pipeline passes the same two numbers to encoder and decoder (DiffSynth
        convention); the decoder reads them in latent units, the encoder in pixels.
        Both must be multiples of the downscale factor (8 for FLUX).
        """
        if not tiled:
            return self._encode(x)
        return tiled_apply(self._encode, x, tile_size, tile_stride, 1 / self.config.downscale)


class FluxVAEDecoder(nn.Module):
    """Normalized latents (B, z, h, w) -> image (B, out_channels, 8h, 8w), roughly [-1, 1]."""

    def __init__(self, config: FluxVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or FluxVAEConfig()
        g = cfg.num_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        if cfg.quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        # Built deepest-first (execution order) but indexed by level, as in the checkpoint.
        up: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[level], g))
                block_in = cfg.ch * cfg.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(block_in)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def _decode(self, z: Tensor) -> Tensor:
        z = z / self.config.scaling_factor + self.config.shift_factor
        if self.config.quant_conv:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(_conv_layout(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_norm_silu(self.norm_out, h)).contiguous()

    def forward(
        self, z: Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> Tensor:
        """Decode `z`. With `tiled`, `tile_size`/`tile_stride` are in LATENT units."""
        if not tiled:
            return self._decode(z)
        return tiled_apply(self._decode, z, tile_size, tile_stride, self.config.downscale)


# ----------------------------------------------------------------------------- checkpoints

StateDict = Mapping[str, Tensor]
_ATTN_PROJ = ("q", "k", "v", "proj_out")


def _count(sd: StateDict, fmt: str) -> int:
    """Number of consecutive indices i for which some key starts with fmt.format(i)."""
    n = 0
    while any(k.startswith(fmt.format(n)) for k in sd):
        n += 1
    return n


def _require(sd: StateDict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ValueError(f"not a FLUX VAE {what} state dict: missing keys {missing}")


def infer_vae_config(state_dict: StateDict) -> FluxVAEConfig:
    """Recover the architecture from tensor shapes of an encoder OR decoder state dict
    (BFL names, prefix already stripped). num_groups and the latent scale/shift are not
    stored in checkpoints and keep their FLUX defaults.

    From a decoder alone only the widths ch*ch_mult[i] are observable; we set ch to the
    level-0 width, which builds an identical network.
    """
    try:
        return _infer_vae_config(state_dict)
    except KeyError as e:  # a level/block exists but lacks a tensor we read shapes from
        raise ValueError(f"not a FLUX VAE state dict: missing keys [{e}]") from None


def _infer_vae_config(sd: StateDict) -> FluxVAEConfig:
    if "down.0.block.0.conv1.weight" in sd:  # encoder
        _require(sd, ["conv_in.weight", "conv_out.weight"], "encoder")
        ch, in_channels = sd["conv_in.weight"].shape[:2]
        levels = _count(sd, "down.{}.")
        widths = [sd[f"down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        num_res_blocks = _count(sd, "down.0.block.{}.")
        z_channels = sd["conv_out.weight"].shape[0] // 2
        out_channels = in_channels
    elif "up.0.block.0.conv1.weight" in sd:  # decoder
        _require(sd, ["conv_in.weight", "conv_out.weight"], "decoder")
        z_channels = sd["conv_in.weight"].shape[1]
        out_channels = sd["conv_out.weight"].shape[0]
        levels = _count(sd, "up.{}.")
        widths = [sd[f"up.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        ch = widths[0]
        num_res_blocks = _count(sd, "up.0.block.{}.") - 1
        in_channels = out_channels
    else:
        raise ValueError(
            "not a FLUX VAE encoder/decoder state dict: missing keys "
            "['down.0.block.0.conv1.weight'] (encoder) or ['up.0.block.0.conv1.weight'] (decoder)"
        )
    if any(w % ch for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of ch={ch}")
    return FluxVAEConfig(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        ch=int(ch),
        ch_mult=tuple(int(w // ch) for w in widths),
        num_res_blocks=int(num_res_blocks),
        z_channels=int(z_channels),
        quant_conv="quant_conv.weight" in sd or "post_quant_conv.weight" in sd,
    )


def _check_keys(sd: dict[str, Tensor], module_cls: type[nn.Module], what: str) -> None:
    """Compare against the key set of a meta-device model of the inferred size."""
    cfg = infer_vae_config(sd)
    with torch.device("meta"):
        expected = set(module_cls(cfg).state_dict())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"not a FLUX VAE {what} state dict: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )


def _attn_to_conv(sd: dict[str, Tensor]) -> None:
    # Some exporters store the attention projections as Linear (C, C); we use 1x1 convs.
    for k, v in sd.items():
        parts = k.split(".")
        if "attn_1" in parts and parts[-2] in _ATTN_PROJ and parts[-1] == "weight" and v.ndim == 2:
            sd[k] = v[:, :, None, None]


def _split_and_check(enc: dict[str, Tensor], dec: dict[str, Tensor]):
    for part, what in ((enc, "encoder"), (dec, "decoder")):
        if not part:
            raise ValueError(
                f"not a FLUX VAE state dict: missing keys ['{what}.conv_in.weight', ...]"
            )
        _attn_to_conv(part)
    _check_keys(enc, FluxVAEEncoder, "encoder")
    _check_keys(dec, FluxVAEDecoder, "decoder")
    return enc, dec


def vae_from_bfl(state_dict: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a BFL ``ae.safetensors`` state dict into (encoder_sd, decoder_sd).

    Also accepts the ``vae.`` / ``first_stage_model.`` prefixes of all-in-one files;
    unrelated keys (transformer, text encoders) are ignored.
    """
    for prefix in ("", "vae.", "first_stage_model."):
        if any(k.startswith((prefix + "encoder.", prefix + "decoder.")) for k in state_dict):
            break
    enc, dec = {}, {}
    for k, v in state_dict.items():
        if k.startswith(prefix + "encoder."):
            enc[k[len(prefix) + len("encoder.") :]] = v
        elif k.startswith(prefix + "decoder."):
            dec[k[len(prefix) + len("decoder.") :]] = v
    return _split_and_check(enc, dec)


# Diffusers sub-module names -> BFL names, applied per dotted path segment run.
_DIFFUSERS_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # Pre-0.14 diffusers attention naming, still found in old exports.
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}


def _rename_diffusers(key: str, num_levels: int) -> str:
    k = key
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = k.replace("mid_block.resnets.0", "mid.block_1")
    k = k.replace("mid_block.resnets.1", "mid.block_2")
    if k.startswith("mid_block.attentions.0."):
        rest = k[len("mid_block.attentions.0.") :]
        name, param = rest.rsplit(".", 1)
        k = f"mid.attn_1.{_DIFFUSERS_ATTN.get(name, name)}.{param}"
    if k.startswith("down_blocks."):
        _, i, rest = k.split(".", 2)
        rest = rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
        k = f"down.{i}.{rest}"
    if k.startswith("up_blocks."):
        # Diffusers counts up blocks in execution order (deepest first); BFL by level.
        _, i, rest = k.split(".", 2)
        rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
        k = f"up.{num_levels - 1 - int(i)}.{rest}"
    return k


def vae_from_diffusers(state_dict: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Convert a diffusers ``AutoencoderKL`` state dict into (encoder_sd, decoder_sd) with
    BFL names. Linear attention projections become 1x1 conv weights."""
    if "quant_conv.weight" in state_dict or "post_quant_conv.weight" in state_dict:
        raise ValueError(
            "state dict has quant_conv/post_quant_conv: not a FLUX VAE (FLUX uses none)"
        )
    return diffusers_parts(state_dict)


def diffusers_parts(state_dict: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder_sd, decoder_sd) with BFL names from diffusers ``encoder.*``/``decoder.*`` keys; a
    ``quant_conv`` goes with the encoder, a ``post_quant_conv`` with the decoder. Other keys are ignored."""
    num_levels = _count(state_dict, "decoder.up_blocks.{}.")
    enc, dec = {}, {}
    for key, v in state_dict.items():
        if key.startswith("quant_conv."):
            enc[key] = v
        elif key.startswith("post_quant_conv."):
            dec[key] = v
        for part, out in (("encoder.", enc), ("decoder.", dec)):
            if key.startswith(part):
                out[_rename_diffusers(key[len(part) :], num_levels)] = v
    return _split_and_check(enc, dec)


# ----------------------------------------------------------------------------- table entry

def layout(keys) -> str | None:
    """"bfl" or "diffusers" when the keys are a FLUX-style VAE's (either half)."""
    if has_prefix(keys, "encoder.down.0.block.0.", "decoder.up.0.block.0."):
        return "bfl"
    if has_prefix(keys, "encoder.down_blocks.0.resnets.0.", "decoder.up_blocks.0.resnets.0."):
        return "diffusers"
    return None


def parts(refs) -> tuple[str, ...]:
    """The halves a VAE file holds (some files carry only the decoder)."""
    keys = refs.keys()
    return tuple(c for c, p in (("vae_encoder", "encoder."), ("vae_decoder", "decoder.")) if has_prefix(keys, p))


def detect(refs) -> str | None:
    """FLUX.1's VAE (FLUX.2's, with latent statistics, is tried first)."""
    return layout(refs.keys())


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = plain_tensors(det, options)
    enc, dec = (vae_from_bfl if det.format == "bfl" else vae_from_diffusers)(sd)
    out = {}
    if enc:
        out["vae_encoder"] = assign(FluxVAEEncoder, infer_vae_config(enc), enc, f"VAE encoder from {det.source}")
    if dec:
        out["vae_decoder"] = assign(FluxVAEDecoder, infer_vae_config(dec), dec, f"VAE decoder from {det.source}")
    return out


COMPONENTS = (Component("vae_encoder", "vae_encoder", activation="vae", label="the VAE encoder (ae.safetensors)"),
              Component("vae_decoder", "vae_decoder", activation="vae", label="the VAE decoder (ae.safetensors)"))
FAMILIES = (Family("flux-vae", "FLUX VAE", detect, parts, build, bundle_prefixes=("first_stage_model.", "vae.")),)
