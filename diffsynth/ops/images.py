"""User images into the modes the models take, by their real value range: the one place images are converted.

PIL's `convert` clips wide images to 0..255: a 16-bit depth map (mode I;16, or I as some readers give it)
comes out nearly all white and a float image (mode F, values in 0..1) black. `convert_image` first scales
such an image to 8 bits by its range, so every reader (input and condition images, masks, training data,
vision encoders) sees what the file shows.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "F", *_SIXTEEN_BIT)


def value_range(image: Image.Image) -> tuple[float, float]:
    """The range that maps to black..white: the format's for 16-bit images; 0..1 for floats in it; 0..255
    or else 0..65535 for 32-bit integers in them (8- and 16-bit data); otherwise (depth in metres, signed
    values) the image's own min..max."""
    if image.mode in _SIXTEEN_BIT:
        return 0.0, 65535.0
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    spans = (1.0,) if image.mode == "F" else (255.0, 65535.0)
    span = next((s for s in spans if low >= 0 and high <= s), None)
    return (0.0, span) if span is not None else (low, high)


def to_8bit(image: Image.Image) -> Image.Image:
    """A wide (I;16, I, F) grayscale image as mode L, scaled by `value_range`."""
    low, high = value_range(image)
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def convert_image(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """`image.convert(mode)`, wide images scaled by their range first (see the module docstring)."""
    if image.mode in WIDE_MODES:
        image = to_8bit(image)
    return image.convert(mode)  # a new image even in the same mode: callers may close the original


def check_image(value, name: str) -> Image.Image:
    """`value` is a PIL image whose pixels decode: a path gets the hint to open it, a truncated or damaged
    file fails here naming the argument (decoding is lazy: it would otherwise fail deep inside a model)."""
    if not isinstance(value, Image.Image):
        hint = " (open it first: PIL.Image.open(path))" if isinstance(value, (str, os.PathLike)) else ""
        raise TypeError(f"{name} must be a PIL image{hint}, got {type(value).__name__}")
    try:
        value.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} cannot be decoded ({type(e).__name__}: {e})") from None
    return value


def image_list(value, name: str) -> list[Image.Image]:
    """A PIL image or a non-empty list/tuple of them, each checked by `check_image`."""
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    if not images:
        raise ValueError(f"{name} is an empty list: give a PIL image or a non-empty list of PIL images")
    return [check_image(im, f"{name}[{i}]" if isinstance(value, (list, tuple)) else name)
            for i, im in enumerate(images)]
