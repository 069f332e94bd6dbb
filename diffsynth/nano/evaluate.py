"""Does a generated image show what its prompt says? Colour, position and shape read back by plain geometry.

- colour: the nearest named colour to the median of the shape's pixels;
- position: the named anchor nearest to the shape's centroid (its Voronoi region);
- shape: the shape's width, as a fraction of its bounding box's width, in bands around 20 % and 80 % of its
  height: a square is full in both (1, 1), a circle is 0.8 in both, an apex-up triangle is 0.2 at the top and
  0.8 at the bottom. The profile, unlike the fill ratio of the bounding box, reads a square with softened
  corners as a square (a decoded square's fill ratio is 0.85-0.97, a circle's up to 0.85: measured).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import BACKGROUND, COLORS, POSITIONS
from ..ops.images import convert_image

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the shape
# Halfway between the ideal profiles: square (1, 1), circle (0.8, 0.8), triangle (0.2, 0.8), top/bottom 0.25.
SQUARE_WIDTH = 0.9  # mean of the two band widths above which a shape is a square
TRIANGLE_TAPER = 0.625  # top width / bottom width below which it is a triangle
BAND = 0.1  # half-height of each band, fraction of the shape's height


@dataclass(frozen=True)
class Reading:
    color: str | None
    position: str | None
    shape: str | None


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels must not stretch the bounding box)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        label += 1
        labels[y, x], stack, size = label, [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else mask


def nearest(value: np.ndarray, table: dict[str, tuple[float, ...]]) -> str:
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k], dtype=np.float64) - value) ** 2)))


def band_widths(mask: np.ndarray) -> tuple[float, float]:
    """Mean width of the mask's rows around 20 % and 80 % of its height, as fractions of its width."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    rows = box.sum(1) / box.shape[1]                                                   # (h,)
    h = len(rows)

    def band(center: float) -> float:
        lo = int(round((center - BAND) * h))
        return float(rows[max(lo, 0):max(int(round((center + BAND) * h)), lo + 1)].mean())
    return band(0.2), band(0.8)


def shape_from_widths(top: float, bottom: float) -> str:
    if top < TRIANGLE_TAPER * bottom:
        return "triangle"
    return "square" if (top + bottom) / 2 > SQUARE_WIDTH else "circle"


def read_image(image: Image.Image, colors: dict[str, tuple[int, int, int]] = COLORS) -> Reading:
    """What the image shows, or None fields when no shape is found."""
    rgb = np.asarray(convert_image(image), dtype=np.float64)
    distance = np.sqrt(((rgb - np.asarray(BACKGROUND, dtype=np.float64)) ** 2).sum(-1))
    mask = largest_component(distance > FOREGROUND_DISTANCE)
    if mask.sum() < 8:
        return Reading(None, None, None)
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    color = nearest(np.median(rgb[mask], axis=0), colors)
    anchors = {k: (x * w, y * h) for k, (x, y) in POSITIONS.items()}
    position = nearest(np.array([xs.mean() + 0.5, ys.mean() + 0.5]), anchors)
    return Reading(color, position, shape_from_widths(*band_widths(mask)))


def score(readings: list[Reading], truths: list[tuple[str, str, str]]) -> dict[str, float]:
    """Fraction of images whose colour / position / shape is right."""
    n = len(truths)
    return {
        "color": sum(r.color == t[0] for r, t in zip(readings, truths)) / n,
        "shape": sum(r.shape == t[1] for r, t in zip(readings, truths)) / n,
        "position": sum(r.position == t[2] for r, t in zip(readings, truths)) / n,
    }


EVAL_SEEDS = (0, 1)
EVAL_STEPS = 12  # sampling steps for the evaluation: 16-token images need few


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = EVAL_STEPS) -> list[Image.Image]:
    from .shapes import SIZE
    return [pipe(p, seed=s, height=SIZE, width=SIZE, num_inference_steps=steps, progress_bar_cmd=lambda x: x)
            for p, s in zip(prompts, seeds)]


def evaluate(pipe, triples: list[tuple[str, str, str]], seeds: tuple[int, ...] = EVAL_SEEDS,
             steps: int = EVAL_STEPS, colors: dict[str, tuple[int, int, int]] = COLORS,
             images_out: list[Image.Image] | None = None) -> dict:
    """Generate every triple with every seed and score what comes out (the images are appended to
    `images_out` when given)."""
    from .shapes import prompt
    cases = [(t, s) for t in triples for s in seeds]
    images = generate(pipe, [prompt(*t) for t, _ in cases], [s for _, s in cases], steps)
    if images_out is not None:
        images_out.extend(images)
    readings = [read_image(im, colors) for im in images]
    return {**score(readings, [t for t, _ in cases]), "images": len(cases), "seeds": list(seeds), "steps": steps,
            "misses": [f"{prompt(*t)} (seed {s}): read {r}" for (t, s), r in zip(cases, readings)
                       if (r.color, r.shape, r.position) != t]}
