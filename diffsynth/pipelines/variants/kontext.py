"""FLUX.1-Kontext: reference images as extra image tokens (`kontext_images`).

Each reference is VAE-encoded at its own resolution (floored to a multiple of 16), packed into 2x2
tokens and appended after the target tokens, with position ids (1, row, column): they take part in
every attention and are dropped at the output (ControlNet residuals never touch them).

Several references get distinct positions instead of overlapping: each one is placed beside the
bounding box of the previous ones (to the right or below, whichever keeps that box squarer), so the
model sees them as separate pictures on one canvas. `kontext_auto_resize=True` first resizes each
reference to the Kontext training resolution closest to its aspect ratio (about one megapixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ...models.flux_dit import image_ids, patchify
from ..units import step_unit, unit
from ._images import BASE_CHANNELS, VAE_FACTOR, image_list, image_to_tensor, require_dit, vae_encode

MULTIPLE = VAE_FACTOR * 2  # VAE 8x, then 2x2 patches

# (width, height) the Kontext model was trained at.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672))


def reference_size(image: Image.Image, auto_resize: bool) -> tuple[int, int]:
    """(width, height) a reference is encoded at: its own (or the closest trained aspect), floored to 16."""
    width, height = image.size
    if auto_resize:
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    if width < MULTIPLE or height < MULTIPLE:
        raise ValueError(f"kontext_images: an image of {image.size[0]}x{image.size[1]} is smaller than "
                         f"{MULTIPLE}x{MULTIPLE} pixels")
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


@dataclass
class Canvas:
    """Where references sit on the packed-token grid: the bounding box (rows, cols) of those placed so far."""
    rows: int = 0
    cols: int = 0

    def place(self, h: int, w: int) -> tuple[int, int]:
        """(row, col) offset of the next (h, w) reference; the first sits at the origin."""
        if self.rows == 0:
            offset = (0, 0)
        elif h + self.rows > w + self.cols:  # below would be taller than right would be wide: go right
            offset = (0, self.cols)
        else:
            offset = (self.rows, 0)
        self.rows, self.cols = max(self.rows, offset[0] + h), max(self.cols, offset[1] + w)
        return offset


@unit(uses=("vae_encoder",), image_inputs=("kontext_images",), outputs=("kontext_latents", "kontext_image_ids"), model_inputs=("kontext_latents", "kontext_image_ids"),
      batched=("kontext_latents", "kontext_image_ids"))
def encode_kontext_images(pipe, noise, kontext_images=None, kontext_auto_resize=False, tiled=False,
                          tile_size=128, tile_stride=64):
    """kontext_images (a PIL image or a list) -> packed tokens (B, M, 64) and ids (B, M, 3)."""
    if kontext_images is None:
        return {}
    images = image_list(kontext_images, "kontext_images")
    require_dit(pipe, BASE_CHANNELS, "kontext_images", "FLUX.1-Kontext (or another 16-channel)")
    canvas, tokens, ids = Canvas(), [], []
    for image in images:
        width, height = reference_size(image, kontext_auto_resize)
        z = vae_encode(pipe, image_to_tensor(image, width, height), "kontext_images", tiled, tile_size, tile_stride)  # (1, 16, h, w)
        h, w = z.shape[2:]
        row, col = canvas.place(h // 2, w // 2)
        grid = image_ids(h, w, index=1, device=pipe.device).clone()  # (1, h/2*w/2, 3)
        grid[..., 1] += row
        grid[..., 2] += col
        tokens.append(patchify(z))
        ids.append(grid)
    b = noise.shape[0]
    return {"kontext_latents": torch.cat(tokens, 1).repeat(b, 1, 1),
            "kontext_image_ids": torch.cat(ids, 1).repeat(b, 1, 1)}


@step_unit()
def add_kontext_tokens(models, call, step, kontext_latents=None, kontext_image_ids=None):
    if kontext_latents is not None:
        call.ref.append((kontext_latents, kontext_image_ids))


UNITS = [encode_kontext_images, add_kontext_tokens]
