"""Insert-Anything (DiffSynth-Studio 2.0): insert the object of a reference photo into a masked region of a
source photo, on FLUX.1-Fill + FLUX.1-Redux + the Insert-Anything LoRA.

The four inputs become a diptych that FLUX.1-Fill completes, as DiffSynth-Studio prepares it:
  left:  the reference object (white outside its mask), cropped to its box, padded by 30 % and to a square;
  right: a square crop of the source around the (dilated) target region, padded to a square;
both halves SIDE x SIDE (768). The fill mask is the target region on the right half; Redux sees the left half.
After decoding, the right half is resized back into the crop box of the source photo (a 2-pixel border of the
box keeps the original), and the whole source photo is returned. The size is the diptych's: `height`/`width` are
set here. An `input_image` (training: the dataset image) is replaced by the diptych, so training reconstructs it
(the source photo then already shows the object). OpenCV does the resizing and dilation (`pip install
'diffsynth-flux[insertanything]'`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..units import unit
from ._images import FILL_CHANNELS, check_image, convert_image, require_dit

SIDE = 768
INPUTS = ("insert_anything_source_image", "insert_anything_source_mask", "insert_anything_ref_image",
          "insert_anything_ref_mask")
EDGE = 2  # pixels of the crop box's border that keep the source photo


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("Insert-Anything needs OpenCV: pip install 'diffsynth-flux[insertanything]' "
                          "(or opencv-python-headless)") from None
    return cv2


def binary(mask: Image.Image) -> np.ndarray:
    return (np.asarray(convert_image(mask, "L")) > 128).astype(np.uint8)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the mask's first and last rows/columns (the whole image for under 10 pixels)."""
    if mask.sum() < 10:
        return 0, mask.shape[0], 0, mask.shape[1]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def grow_box(box, height: int, width: int, threshold: float = 0.6, floor: float = 0.1):
    """Scale the box about its centre so that its share of the image r becomes floor + (1 - floor) r / threshold
    (the whole image from `threshold` on), clipped to the image."""
    y1, y2, x1, x2 = box
    h, w = y2 - y1 + 1, x2 - x1 + 1
    share = h * w / (height * width)
    target = floor + (1 - floor) / threshold * share if share < threshold else 1.0
    scale = math.sqrt(target / share)
    yc, xc, h, w = (y1 + y2) / 2, (x1 + x2) / 2, scale * h, scale * w
    return (max(0, int(yc - h / 2)), min(height, int(yc + h / 2)),
            max(0, int(xc - w / 2)), min(width, int(xc + w / 2)))


def square_box(box, height: int, width: int):
    """The box widened (or heightened) about its centre to a square of its longer side, clipped to the image."""
    y1, y2, x1, x2 = box
    yc, xc, h, w = (y1 + y2) // 2, (x1 + x2) // 2, y2 - y1, x2 - x1
    if h >= w:
        x1, x2 = xc - h // 2, xc + h // 2
    else:
        y1, y2 = yc - w // 2, yc + w // 2
    return max(0, y1), min(height, y2), max(0, x1), min(width, x2)


def pad_square(a: np.ndarray, value: int) -> np.ndarray:
    """Pad the shorter side on both sides (the extra pixel after) to a square."""
    h, w = a.shape[:2]
    before, after = abs(h - w) // 2, abs(h - w) - abs(h - w) // 2
    spec = [(0, 0), (before, after)] if h > w else [(before, after), (0, 0)]
    return np.pad(a, spec + [(0, 0)] * (a.ndim - 2), constant_values=value)


def pad_around(a: np.ndarray, ratio: float, value: int) -> np.ndarray:
    h, w = a.shape[:2]
    dh, dw = int(h * ratio) - h, int(w * ratio) - w
    spec = [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)]
    return np.pad(a, spec + [(0, 0)] * (a.ndim - 2), constant_values=value)


@dataclass
class Diptych:
    image: Image.Image           # (2 SIDE) x SIDE: reference | source crop
    mask: Image.Image            # "L", 255 = the target region (right half only)
    reference: Image.Image       # the left half, for Redux
    source: np.ndarray           # the whole source photo
    box: tuple[int, int, int, int]  # the crop box in the source photo
    padded: int                  # side of the crop once padded to a square

    def paste(self, image: Image.Image) -> Image.Image:
        """The generated diptych's right half, back in the source photo."""
        w, h = image.size
        right = np.asarray(convert_image(image.crop((w // 2, 0, w, h))))
        y1, y2, x1, x2 = self.box
        crop_h, crop_w = y2 - y1, x2 - x1
        pred = _cv2().resize(right, (self.padded, self.padded))
        top, left = (self.padded - crop_h) // 2, (self.padded - crop_w) // 2  # undo pad_square's centring
        pred = pred[top:top + crop_h, left:left + crop_w]
        out = self.source.copy()
        e = EDGE
        out[y1 + e:y2 - e, x1 + e:x2 - e] = pred[e:crop_h - e, e:crop_w - e]
        return Image.fromarray(out)


def make_diptych(source: Image.Image, source_mask: Image.Image, ref: Image.Image, ref_mask: Image.Image,
                 side: int = SIDE) -> Diptych:
    cv2 = _cv2()
    ref_rgb, src = np.asarray(convert_image(ref)), np.asarray(convert_image(source))
    ref_m = binary(ref_mask)
    if ref_m.shape != ref_rgb.shape[:2]:
        raise ValueError(f"insert_anything_ref_mask is {ref_mask.size[0]}x{ref_mask.size[1]} but "
                         f"insert_anything_ref_image is {ref.size[0]}x{ref.size[1]}")
    # the reference object on white, cropped to its box (exclusive of the last row/column, as DiffSynth-Studio)
    white = np.where(ref_m[..., None].astype(bool), ref_rgb, 255).astype(np.uint8)
    y1, y2, x1, x2 = mask_box(ref_m)
    left = pad_square(pad_around(white[y1:y2, x1:x2], 1.3, 255), 255)
    left = cv2.resize(left, (side, side))
    # the target region, dilated, its box grown twice, squared
    h, w = src.shape[:2]
    tar_m = cv2.resize(binary(source_mask), (w, h))
    tar_m = cv2.dilate(tar_m, np.ones((7, 7), np.uint8), iterations=2)
    box = square_box(grow_box(grow_box(mask_box(tar_m), h, w), h, w), h, w)
    y1, y2, x1, x2 = box
    crop = pad_square(src[y1:y2, x1:x2], 255)
    right = cv2.resize(crop, (side, side))
    right_m = cv2.resize(pad_square(tar_m[y1:y2, x1:x2], 0), (side, side))
    mask = np.concatenate([np.zeros_like(right_m), right_m], 1) * 255
    return Diptych(Image.fromarray(np.concatenate([left, right], 1)), Image.fromarray(mask.astype(np.uint8), "L"),
                   Image.fromarray(left), src, box, crop.shape[0])


INSERT_OUTPUTS = ("flux_fill_image", "flux_fill_mask", "flux_redux_image", "redux_replaces_prompt", "height",
                  "width", "input_image", "image_edit")


@unit(outputs=INSERT_OUTPUTS, image_inputs=INPUTS)
def prepare_insert_anything(pipe, insert_anything_source_image=None, insert_anything_source_mask=None,
                            insert_anything_ref_image=None, insert_anything_ref_mask=None, input_image=None,
                            flux_fill_image=None, flux_fill_mask=None, flux_redux_image=None):
    values = dict(zip(INPUTS, (insert_anything_source_image, insert_anything_source_mask, insert_anything_ref_image,
                               insert_anything_ref_mask)))
    given = [n for n, v in values.items() if v is not None]
    if not given:
        return {}
    missing = [n for n in INPUTS if values[n] is None]
    if missing:
        raise ValueError(f"Insert-Anything needs all of {', '.join(INPUTS)}; missing: {', '.join(missing)}")
    clash = [n for n, v in (("flux_fill_image", flux_fill_image), ("flux_fill_mask", flux_fill_mask),
                            ("flux_redux_image", flux_redux_image)) if v is not None]
    if clash:
        raise ValueError(f"Insert-Anything makes {', '.join(clash)} itself from its four inputs: pass either")
    for name, value in values.items():
        check_image(value, name)
    require_dit(pipe, FILL_CHANNELS, "insert_anything_*", "FLUX.1-Fill")
    d = make_diptych(*values.values(), side=SIDE)
    # Redux conditions as in DiffSynth-Studio, whose Insert-Anything this is: zeros for the prompt, then the tokens
    out = {"flux_fill_image": d.image, "flux_fill_mask": d.mask, "flux_redux_image": d.reference,
           "redux_replaces_prompt": True, "height": d.image.height, "width": d.image.width, "image_edit": d.paste}
    if input_image is not None:
        out["input_image"] = d.image
    return out


UNITS = [prepare_insert_anything]
