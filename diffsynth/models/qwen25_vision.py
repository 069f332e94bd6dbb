"""Qwen2.5-VL's vision tower and image processor, written here rather than taken from transformers.

Importing transformers' model code costs about 2 s of every fresh process, and its vision APIs move between
versions (transformers 5 returns the merged embeddings as `pooler_output`, 4 as a plain tensor). This module
reproduces transformers' numbers (tests/test_qwen25_vision.py compares against it) with parameter names equal
to transformers' `Qwen2_5_VLModel.visual`, so the release's `visual.*` tensors load unchanged.

Image processor (PIL + numpy, no torchvision):

    image -> RGB (transparency composited onto white) -> PIL bicubic resize of the uint8 image to
    `smart_resize` (multiples of patch * merge, area in [min_pixels, max_pixels]) -> x / 255 -> (x - mean) / std
    -> patches (N, C*T*P*P), each patch repeated T times (a still image is T identical frames)

Patches are listed merge block by merge block: the merge**2 patches that become one language-model token are
consecutive, blocks in row-major order over the image. The tower keeps that order at its output.

Vision tower:

    patches (N, C*T*P*P) -> patch embedding (a Conv3d whose kernel is its stride: one GEMM) -> (N, D)
    -> reorder merge blocks window by window (windows of `window_size` pixels, row-major inside each image)
    -> depth x [x + attn(norm1(x)), x + mlp(norm2(x))]: 2D rotary positions (row, column), attention inside
       each window, or inside each whole image (frame) for the blocks in `fullatt_block_indexes`
    -> merger: RMSNorm, merge**2 neighbours concatenated, Linear-GELU-Linear -> (N / merge**2, out_hidden_size)
    -> back to the original merge-block order
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..ops.images import convert_image
from ..ops.linear import Linear
from .clip_vision import CLIP_MEAN, CLIP_STD
from .flux_dit import RMSNorm

PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer strips, as transformers does


# ----------------------------------------------------------------------------- config

def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class VisionConfig:
    """The tower's shape; defaults are transformers' `Qwen2_5_VLVisionConfig` defaults."""
    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "in_channels"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"Qwen2.5-VL vision config: {name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL vision config: hidden_act {self.hidden_act!r} is not supported "
                             "(only 'silu', the released models' activation)")
        if self.hidden_size % (4 * self.num_heads):
            raise ValueError(f"Qwen2.5-VL vision config: hidden_size {self.hidden_size} must split into "
                             f"{self.num_heads} heads of a multiple of 4 (half of each head's rotary angles per axis)")
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ValueError(f"Qwen2.5-VL vision config: window_size {self.window_size} is smaller than one merged "
                             f"token (patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size})")
        blocks = self.fullatt_block_indexes
        if not isinstance(blocks, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < self.depth for i in blocks):
            raise ValueError(f"Qwen2.5-VL vision config: fullatt_block_indexes must list block indexes in "
                             f"[0, {self.depth}), got {blocks!r}")
        object.__setattr__(self, "fullatt_block_indexes", tuple(blocks))
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
            raise ValueError(f"Qwen2.5-VL vision config: rope_theta must be a positive number, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_window(self) -> int:
        """The window side in merged tokens (transformers floors it too)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_dict(cls, config: Mapping) -> "VisionConfig":
        """From a whole Qwen2.5-VL config.json (its `vision_config`); absent keys take transformers' defaults.

        The rotary base is read from `rope_parameters` (transformers 5 writes {"rope_theta": 10000.0,
        "rope_type": "axial"}); the release's config has none and transformers 4 fixes it at 10000."""
        vision = config.get("vision_config")
        if not isinstance(vision, Mapping):
            raise ValueError(f"Qwen2.5-VL config: 'vision_config' must be a mapping, got {vision!r}")
        values = {f.name: vision[f.name] for f in fields(cls) if f.name in vision}
        rope = vision.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"Qwen2.5-VL vision config: rope_parameters must be a mapping, got {rope!r}")
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"Qwen2.5-VL vision config: rope_type {rope['rope_type']!r} is not supported "
                             "(only 'axial')")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)


# ----------------------------------------------------------------------------- token order and positions

def check_grid(grid_thw: torch.Tensor, merge: int) -> list[tuple[int, int, int]]:
    """(n, 3) frames, rows, columns of patches per image, as Python ints (rows, columns multiples of merge)."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or len(grid_thw) == 0:
        raise ValueError(f"grid_thw must be (n_images, 3), got shape {tuple(grid_thw.shape)}")
    grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    for t, h, w in grid:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"grid_thw row {[t, h, w]}: sizes must be positive, rows and columns multiples "
                             f"of spatial_merge_size {merge}")
    return grid


def window_order(grid: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The merge blocks (tokens) listed window by window, and each window's length in patches.

    A frame's (h/merge, w/merge) tokens are cut into window x window squares (the last row and column of
    windows may be smaller), taken in row-major order. A stable sort by window id keeps the tokens of each
    window in row-major order, frames and images in input order.
    Returns `order` (n_tokens,): window-ordered position -> original token index, and the lengths."""
    keys, offset = [], 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge
        across, down = -(-cols // window), -(-rows // window)
        key = (torch.arange(t)[:, None, None] * down + torch.arange(rows)[None, :, None] // window) * across
        key = key + torch.arange(cols)[None, None, :] // window  # (t, rows, cols) window id
        keys.append(key.flatten() + offset)
        offset += t * down * across
    key = torch.cat(keys)
    lengths = torch.bincount(key, minlength=offset) * merge ** 2  # every window holds at least one token
    return torch.argsort(key, stable=True), lengths.tolist()


def patch_positions(grid: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(N, 2) row and column of each patch in the processor's merge-block order, repeated per frame."""
    out = []
    for t, h, w in grid:
        rows = torch.arange(h).view(h // merge, 1, merge, 1).expand(-1, w // merge, -1, merge)
        cols = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, -1, merge, -1)
        out.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1).repeat(t, 1))
    return torch.cat(out)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) of axial 2D RoPE: the first quarter of the angles turn with the row, the second with
    the column, and that half is repeated (`rotate` pairs dim i with dim i + head_dim/2)."""
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float) / axis_dim))  # (head_dim/4,)
    angles = (positions[..., None].float() * inv_freq.to(positions.device)).flatten(1)  # (N, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def segment_rows(lengths: list[int], device: torch.device) -> list[torch.Tensor]:
    """Consecutive segments of the given lengths, grouped by length: one (n, length) index tensor of rows per
    distinct length, so the attention runs one batched call per length instead of one per segment."""
    starts: dict[int, list[int]] = {}
    start = 0
    for length in lengths:
        starts.setdefault(length, []).append(start)
        start += length
    return [(torch.tensor(s)[:, None] + torch.arange(length)).to(device) for length, s in starts.items()]


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """q, k, v (L, H, Dh) -> (L, H, Dh): each row attends only to the rows of its own segment (no L x L mask)."""
    if len(groups) == 1 and groups[0].numel() == q.shape[0]:  # equal segments covering all rows: views suffice
        n, length = groups[0].shape
        o = F.scaled_dot_product_attention(*(t.view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)))
        return o.transpose(1, 2).reshape(q.shape)  # (n, H, l, Dh) -> (L, H, Dh)
    out = torch.empty_like(q)
    for rows in groups:  # rows (n, l)
        o = F.scaled_dot_product_attention(*(t[rows].transpose(1, 2) for t in (q, k, v)))  # (n, H, l, Dh)
        out[rows] = o.transpose(1, 2)
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in fp32 on x (L, H, Dh) with cos, sin (L, Dh), pairing dim i with i + Dh/2; cast back."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------- network

class PatchEmbed(nn.Module):
    """A Conv3d whose kernel is its stride (one T x P x P patch, no bias), called as a module so that VRAM
    management's per-layer casting (loading/vram.py) applies to it. Pixels take the weight's dtype, as transformers
    casts them (the loader keeps this weight in the compute dtype under fp8 storage)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = pixels.reshape(-1, self.proj.in_channels, *self.proj.kernel_size)  # (N, C, T, P, P)
        return self.proj(patches.to(self.proj.weight.dtype)).flatten(1)  # (N, D, 1, 1, 1) -> (N, D)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_heads
        self.qkv = Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                groups: list[torch.Tensor]) -> torch.Tensor:
        length = x.shape[0]
        q, k, v = self.qkv(x).view(length, 3, self.heads, -1).unbind(1)  # 3 x (L, H, Dh)
        out = segment_attention(rotate(q, cos=cos, sin=sin), rotate(k, cos=cos, sin=sin), v, groups=groups)
        return self.proj(out.reshape(length, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                groups: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos=cos, sin=sin, groups=groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, then each merge block's merge**2 patches concatenated -> Linear-GELU-Linear."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        merged = c.hidden_size * c.spatial_merge_size ** 2
        self.ln_q = RMSNorm(c.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(Linear(merged, merged), nn.GELU(), Linear(merged, c.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.mlp[0].in_features
        return self.mlp(self.ln_q(x).reshape(-1, merged))  # (N, D) -> (N / merge**2, out)


class VisionTower(nn.Module):
    """Qwen2.5-VL's ViT: patches of any number of images -> one embedding per merge block (see module doc)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*T*P*P), grid_thw (n_images, 3) as the processor gives them
        -> (N / merge**2, out_hidden_size), in the processor's token order."""
        c = self.config
        merge, unit = c.spatial_merge_size, c.spatial_merge_size ** 2
        grid = check_grid(grid_thw, merge=merge)
        n_patches = sum(t * h * w for t, h, w in grid)
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
        if pixel_values.shape != (n_patches, patch_dim):
            raise ValueError(f"pixel_values must be ({n_patches}, {patch_dim}) for grid_thw {grid}, "
                             f"got {tuple(pixel_values.shape)}")
        device = pixel_values.device
        order, window_lengths = window_order(grid, merge=merge, window=c.merged_window)
        order = order.to(device)
        # every tensor indexed by patch goes to window order, the merge blocks moving as wholes
        x = self.patch_embed(pixel_values)
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)  # (N, D)
        positions = patch_positions(grid, merge=merge).to(device).view(-1, unit, 2)[order].flatten(0, 1)  # (N, 2)
        cos, sin = rotary_angles(positions, head_dim=c.head_dim, theta=c.rope_theta)
        windows = segment_rows(window_lengths, device=device)
        frames = segment_rows([h * w for t, h, w in grid for _ in range(t)], device=device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos=cos, sin=sin, groups=frames if i in c.fullatt_block_indexes else windows)
        merged = self.merger(x)  # (N / merge**2, out), window order
        return torch.empty_like(merged).index_copy_(0, order, merged)


# ----------------------------------------------------------------------------- image processor

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(h, w): multiples of `factor` nearest to (height, width), scaled (aspect ratio kept as far as the
    rounding allows) so that h * w lies in [min_pixels, max_pixels]. Python's `round` (half to even) on
    purpose: transformers rounds so."""
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency (alpha band or a transparent palette colour) over a white background.
    Through ops.images.convert_image, as every reader here: 16-bit and float images are scaled by their range
    (transformers would clip them), 8-bit ones convert as in transformers."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return convert_image(image, "RGB")
    rgba = convert_image(image, "RGBA")
    return convert_image(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba), "RGB")


def patchify(image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """(C, H, W) -> (H/P * W/P, C*T*P*P) patches in merge-block order, each patch repeated over T frames."""
    c, h, w = image.shape
    x = image.reshape(c, h // (merge * patch), merge, patch, w // (merge * patch), merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (H/(mP), W/(mP), m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))
    return x.reshape(-1, c * temporal * patch * patch)


@dataclass(frozen=True)
class QwenImageProcessor:
    """Qwen2-VL / Qwen2.5-VL image processor; defaults are transformers' (`Qwen2VLImageProcessorPil`)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_resize: bool = True
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_folder(cls, folder: str | Path) -> "QwenImageProcessor":
        """From the folder's preprocessor_config.json (transformers 4 or 5 layout)."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (the image processor's settings of a Qwen2.5-VL folder)")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(config, source=str(path))

    @classmethod
    def from_dict(cls, config: Mapping, source: str = PREPROCESSOR_FILE) -> "QwenImageProcessor":
        """From a preprocessor_config.json dict. Absent or null keys take the defaults; top-level min_pixels /
        max_pixels win over transformers 5's `size` {"shortest_edge", "longest_edge"} (transformers' order)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        values = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        size = config.get("size")
        if size is not None:
            for key, name in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
                if not isinstance(size, Mapping) or (key not in size and name not in values):
                    raise ValueError(f"{source}: 'size' must hold 'shortest_edge' and 'longest_edge' "
                                     f"(or give '{name}'), got {size!r}")
                if name not in values:
                    values[name] = size[key]
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if name in values and not _positive_int(values[name]):
                raise ValueError(f"{source}: '{name}' must be a positive integer, got {values[name]!r}")
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if name in values and not isinstance(values[name], bool):
                raise ValueError(f"{source}: '{name}' must be true or false, got {values[name]!r}")
        for name in ("image_mean", "image_std"):
            if name in values:
                value = values[name]
                if not (isinstance(value, (list, tuple)) and len(value) == 3
                        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                    raise ValueError(f"{source}: '{name}' must be 3 numbers (R, G, B), got {value!r}")
                values[name] = tuple(float(v) for v in value)
        if "rescale_factor" in values and not (isinstance(values["rescale_factor"], (int, float))
                                               and values["rescale_factor"] > 0):
            raise ValueError(f"{source}: 'rescale_factor' must be a positive number, got {values['rescale_factor']!r}")
        if "resample" in values and values["resample"] not in set(Image.Resampling):
            filters = ", ".join(f"{r.value} {r.name}" for r in Image.Resampling)
            raise ValueError(f"{source}: 'resample' must be a PIL resampling filter number ({filters}), "
                             f"got {values['resample']!r}")
        return cls(**values)

    def __call__(self, images: list[Image.Image], min_pixels: int | None = None,
                 max_pixels: int | None = None) -> dict[str, torch.Tensor]:
        """pixel_values (N, C*T*P*P) float32, image_grid_thw (n_images, 3) long. `min_pixels` / `max_pixels`
        override the configured area limits for this call."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("no images to process")
        limits = (self.min_pixels if min_pixels is None else min_pixels,
                  self.max_pixels if max_pixels is None else max_pixels)
        patches, grids = [], []
        for image in images:
            pixels = self.pixels(image, min_pixels=limits[0], max_pixels=limits[1])  # (C, H, W)
            patches.append(patchify(pixels, patch=self.patch_size, merge=self.merge_size,
                                    temporal=self.temporal_patch_size))
            grids.append([1, pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size])
        return {"pixel_values": torch.from_numpy(np.concatenate(patches)),
                "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def pixels(self, image: Image.Image, min_pixels: int, max_pixels: int) -> np.ndarray:
        """One image -> (3, H, W) float32, H and W multiples of patch_size * merge_size."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images, got {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"image mode {image.mode!r}: the processor's do_convert_rgb is off, give RGB images")
        factor = self.patch_size * self.merge_size
        if self.do_resize:
            h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            image = image.resize((w, h), resample=self.resample)  # on uint8 pixels, as transformers' PIL backend
        elif image.height % factor or image.width % factor:
            raise ValueError(f"image {image.width} x {image.height}: do_resize is off and the sides are not "
                             f"multiples of patch_size * merge_size = {factor}")
        x = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_rescale:  # the product in float64, then float32: transformers' rounding
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = x.astype(np.float32, copy=False)
        if self.do_normalize:
            mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
            x = (x - mean[:, None, None]) / std[:, None, None]
        return x
