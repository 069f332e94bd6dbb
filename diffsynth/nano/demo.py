"""What `diffsynth demo` / `make demo` show: one image for a default prompt and a captioned grid."""
from __future__ import annotations

from PIL import Image, ImageDraw

DEFAULT_PROMPT = "a blue triangle on the left"
# Held-out prompts (never seen in training) first, then trained ones.
GRID_PROMPTS = (
    "a red circle on the left", "a blue triangle on the top", "a yellow triangle in the center",
    "a green square on the left", "a white triangle on the bottom", "a red square in the center",
)
CELL, CAPTION, COLUMNS = 128, 14, 3


def make_grid(images: list[Image.Image], captions: list[str], columns: int = COLUMNS) -> Image.Image:
    """Images enlarged to CELL pixels (nearest: the model's own pixels) with their prompt underneath."""
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + CAPTION)), (0, 0, 0))
    pen = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + CAPTION)
        grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        pen.text((x + 2, y + CELL + 1), caption.removeprefix("a "), fill=(220, 220, 220))
    return grid
