"""flux-nano's world: one coloured shape on a dark-gray background, and the prompts that describe it.

Grammar: ``a {color} {shape} on the {left|right|top|bottom}`` and ``a {color} {shape} in the center``.
A fixed set of (color, shape, position) triples is held out of training; they are the test set.
Drawing is pure (a function of the triple and a seed), so datasets rebuild byte for byte.
"""
from __future__ import annotations

import csv
import io
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from ..ops.files import save_image
from .text import write_bytes

SIZE = 64  # image side in pixels: 8x8 latents, 16 DiT tokens
BACKGROUND = (48, 48, 48)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "white": (240, 240, 240),
}
# Colours the base model never sees, for "train your own" LoRAs (their words are in the tokenizers).
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"purple": (150, 50, 210), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
EXTRA_SHAPES = ("diamond", "cross")
# Anchor of each position as fractions of the side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
# Every colour twice, every shape and position at least twice, so all words stay in training.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"), ("green", "square", "right"), ("blue", "triangle", "top"),
    ("yellow", "circle", "bottom"), ("white", "square", "center"), ("red", "triangle", "right"),
    ("green", "circle", "top"), ("blue", "square", "bottom"), ("yellow", "triangle", "center"),
    ("white", "circle", "left"),
)
SHAPE_SIDE = 0.34  # nominal shape size as a fraction of the image side
JITTER = 0.05  # +- position jitter, fraction of the side
SIZE_JITTER = 0.15  # +- relative size jitter
AUTOENCODER_SIDES = (0.26, 0.42)  # the grammar's sides (SHAPE_SIDE +- SIZE_JITTER) with a margin
SUPERSAMPLE = 4  # drawn larger then reduced: anti-aliased edges


def prompt(color: str, shape: str, position: str) -> str:
    where = "in the center" if position == "center" else f"on the {position}"
    return f"a {color} {shape} {where}"


def grammar() -> tuple[str, ...]:
    """The prompts flux-nano draws, as patterns (`{a|b}`: one of the words)."""
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)
    sides = "|".join(p for p in POSITIONS if p != "center")
    return f"a {{{colors}}} {{{shapes}}} on the {{{sides}}}", f"a {{{colors}}} {{{shapes}}} in the center"


def all_triples() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, POSITIONS))


def train_triples() -> list[tuple[str, str, str]]:
    return [t for t in all_triples() if t not in HELD_OUT]


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar (and the extra LoRA concepts) uses: each becomes one token."""
    words = ["a", "on", "in", "the", *COLORS, *EXTRA_COLORS, *SHAPES, *EXTRA_SHAPES, *POSITIONS]
    return tuple(dict.fromkeys(words))


def polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on (cx, cy) with bounding box side `side`."""
    r = side / 2
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # apex up; the bounding box is side x side
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r / 3
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {shape!r}")


def draw(rgb: tuple[int, int, int], shape: str, center: tuple[float, float], side: float,
         size: int = SIZE) -> Image.Image:
    """One shape of colour `rgb` with its bounding box centred at `center` (pixels), side `side` (pixels)."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), BACKGROUND)
    pen = ImageDraw.Draw(image)
    cx, cy, s = center[0] * k, center[1] * k, side * k
    if shape == "circle":
        pen.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=rgb)
    else:
        pen.polygon(polygon(shape, cx, cy, s), fill=rgb)
    return image.resize((size, size), Image.Resampling.BOX)


@dataclass(frozen=True)
class Example:
    color: str
    shape: str
    position: str
    seed: int

    @property
    def prompt(self) -> str:
        return prompt(self.color, self.shape, self.position)

    def image(self, size: int = SIZE) -> Image.Image:
        """The drawing, jittered in place and size by `seed` (same example -> same pixels)."""
        rng = random.Random(f"{self.color}/{self.shape}/{self.position}/{self.seed}")
        ax, ay = POSITIONS[self.position]
        center = ((ax + rng.uniform(-JITTER, JITTER)) * size, (ay + rng.uniform(-JITTER, JITTER)) * size)
        side = SHAPE_SIDE * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
        rgb = {**COLORS, **EXTRA_COLORS}[self.color]
        return draw(rgb, self.shape, center, side, size)


def random_image(rng: random.Random, size: int = SIZE) -> Image.Image:
    """A shape of a palette colour (the grammar's and the LoRA ones), any of the shapes, anywhere, about the
    grammar's size: the autoencoder's training data.

    Why a palette and why these sizes: every GroupNorm of this narrow autoencoder has one or two channels per
    group, so each channel is normalized over the image on its own and a colour must be coded by which
    channels flip sign; a few colours learn that code, continuous random colours did not (measured: grey
    blobs at the right place). The normalization's statistics depend on the fraction of the image the shape
    covers: shapes between 0.2 and 0.9 of the side left colour at chance after 400 steps, shapes of the
    grammar's sizes (AUTOENCODER_SIDES) read back right at 400 (measured)."""
    rgb = rng.choice([*COLORS.values(), *EXTRA_COLORS.values()])
    side = rng.uniform(*AUTOENCODER_SIDES) * size
    center = (rng.uniform(side / 2, size - side / 2), rng.uniform(side / 2, size - side / 2))
    return draw(rgb, rng.choice(SHAPES + EXTRA_SHAPES), center, side, size)


def write_dataset(folder: str | Path, examples: list[Example], size: int = SIZE) -> Path:
    """PNG files + metadata.csv (image, prompt) in the layout the trainer reads. Returns the csv path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(tqdm(examples, desc="drawing the dataset", leave=False)):
        name = f"images/{i:05d}.png"
        save_image(ex.image(size), folder / name)
        rows.append((name, ex.prompt))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("image", "prompt"))
    writer.writerows(rows)
    path = folder / "metadata.csv"
    write_bytes(path, buf.getvalue().encode())
    return path
