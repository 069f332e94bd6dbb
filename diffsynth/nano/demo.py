"""What `diffsynth demo` / `make demo` show: one image for a default prompt and a captioned grid."""
from __future__ import annotations

from PIL import Image, ImageDraw

DEFAULT_PROMPT = "a blue triangle on the left"
# Held-out prompts (never seen in training) first, then trained ones.
GRID_PROMPTS = (
    "a red circle on the left", "a blue triangle on the top", "a yellow triangle in the center",
    "a green square on the left", "a white triangle on the bottom", "a red square in the center",
)
CELL, LINE, COLUMNS = 128, 12, 3
CAPTION = 2 * LINE + 2  # two lines: a whole prompt is wider than a cell


def make_grid(images: list[Image.Image], captions: list[str], columns: int = COLUMNS) -> Image.Image:
    """Images enlarged to CELL pixels (nearest: the model's own pixels) with their prompt underneath."""
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), (0, 0, 0))
    pen = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + CAPTION)
        grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(wrap(pen, caption.removeprefix("a "), CELL - 4)[:2]):
            pen.text((x + 2, y + CELL + 1 + j * LINE), line, fill=(220, 220, 220))
    return grid


def wrap(pen: ImageDraw.ImageDraw, text: str, width: float) -> list[str]:
    """Words greedily into lines no wider than `width` pixels (a longer single word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and pen.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines
