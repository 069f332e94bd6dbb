"""Training data: metadata files, up-front row validation, resize rules, aspect-ratio buckets, batch order.

A dataset is a folder (`--dataset_base_path`) plus a metadata file: `metadata.csv` (`image,prompt[,extra]`),
a `.json` list of objects, or `.jsonl`. Without a metadata file the folder's `metadata.*` is used, or
else every image with a same-named `.txt` caption. Every row is checked before training starts; all
problems are reported together in one `DatasetError`; every image is decoded once for that.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..pipelines.checks import check_text
from ..pipelines.common_units import SIZE_MULTIPLE
from ..ops.images import convert_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_NAMES = ("metadata.csv", "metadata.json", "metadata.jsonl")
MAX_LISTED = 30
MASK_INPUTS = ("flux_fill_mask", "flex_inpaint_mask")  # read as grayscale (white = repaint)


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names every bad row."""


@dataclass
class Sample:
    """One validated metadata row. `files[key]` holds absolute paths (a list when the cell was a list)."""
    row: int  # 1-based row number in the metadata file
    prompt: str
    files: dict[str, str | list[str]]
    size: tuple[int, int]  # (width, height) of the main image on disk
    extras: dict = field(default_factory=dict)  # non-file extra columns, passed through as is


# ----------------------------------------------------------------------------- metadata files

def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); DatasetError naming it when it is in another encoding."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: this {what} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                           "save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)") from None


def read_metadata(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv (header row), .json (list of objects) or .jsonl (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"metadata file not found: {path}")
    ext = path.suffix.lower()
    if ext not in (".csv", ".json", ".jsonl"):
        raise DatasetError(f"{path}: metadata must be .csv, .json or .jsonl, got {ext or 'no extension'!r}")
    text = read_text(path, "metadata file")
    try:
        if ext == ".csv":
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        elif ext == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot be parsed ({type(e).__name__}: {e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected a list of objects (one per image)")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def caption_rows(base: Path) -> list[dict]:
    """Rows for a folder of images with `.txt` captions next to them (no metadata file)."""
    rows = []
    for p in sorted(base.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            txt = p.with_suffix(".txt")
            rows.append({"image": str(p.relative_to(base)),
                         "prompt": read_text(txt, "caption file").strip() if txt.is_file() else None})
    if not rows:
        raise DatasetError(f"{base}: no metadata file ({', '.join(METADATA_NAMES)}) and no images")
    return rows


def find_rows(base_path: str, metadata_path: str | None) -> tuple[list[dict], str]:
    """(rows, where they came from)."""
    base = Path(base_path)
    if not base.is_dir():
        raise DatasetError(f"--dataset_base_path {base_path!r} is not a folder")
    if metadata_path:
        return read_metadata(metadata_path), str(metadata_path)
    for name in METADATA_NAMES:
        if (base / name).is_file():
            return read_metadata(base / name), str(base / name)
    return caption_rows(base), f"{base}/*.txt captions"


# ----------------------------------------------------------------------------- validation

def resolve_file(base: str, value: str) -> str:
    """Absolute path of a metadata cell; ValueError when it escapes `base`."""
    real_base = os.path.realpath(base)
    path = os.path.realpath(os.path.join(real_base, value))
    if os.path.commonpath([path, real_base]) != real_base:
        raise ValueError(f"{value!r} points outside --dataset_base_path")
    return path


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of a readable image file; ValueError describing what is wrong otherwise."""
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{os.path.basename(path)!r} is not a {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} image")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        return open_image(path).size  # a full decode: verify() passes truncated JPEGs, which would crash training
    except Exception as e:  # PIL raises many types for damaged files
        raise ValueError(f"{path} cannot be read as an image ({type(e).__name__}: {e})") from None


def open_image(path: str) -> Image.Image:
    """The decoded image the way it is meant to be seen: its EXIF orientation applied (phone cameras store a
    portrait photo as landscape pixels plus an orientation tag; trained as stored, it would lie on its side)."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)  # a new image either way: usable after the file is closed


def check_row(row: dict, base: str, file_keys: list[str]) -> Sample:
    """One row -> Sample; ValueError listing everything wrong with it."""
    problems, files = [], {}
    prompt = row.get("prompt")
    if prompt is None:
        problems.append("no 'prompt'")
    else:
        try:  # the check generation runs: a row the pipeline would refuse is refused before training
            check_text("prompt", prompt)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    size = (0, 0)
    for key in file_keys:
        value = row.get(key)
        if value in (None, "", []):
            problems.append(f"no {key!r}")
            continue
        paths = []
        for v in value if isinstance(value, list) else [value]:
            try:
                p = resolve_file(base, str(v))
                s = image_size(p)
                paths.append(p)
                if key == "image" and not isinstance(value, list):
                    size = s
            except ValueError as e:
                problems.append(f"{key}: {e}")
        files[key] = paths if isinstance(value, list) else (paths[0] if paths else None)
    if isinstance(row.get("image"), list):
        problems.append("'image' must be a single file")
    if problems:
        raise ValueError("; ".join(problems))
    extras = {k: v for k, v in row.items() if k not in ("prompt", *file_keys) and k is not None}
    return Sample(row=0, prompt=prompt, files=files, size=size, extras=extras)


def validate_rows(rows: list[dict], base: str, file_keys: list[str], source: str) -> list[Sample]:
    """Check every row; raise one DatasetError naming all bad rows."""
    columns = {k for row in rows for k in row if k is not None}
    absent = [k for k in ("prompt", *file_keys) if k not in columns]
    if absent:
        raise DatasetError(f"{source}: no {', '.join(map(repr, absent))} column (columns: {sorted(columns)})")
    samples, bad = [], []
    for i, row in enumerate(rows, start=1):
        try:
            sample = check_row(row, base, file_keys)
        except ValueError as e:
            bad.append(f"row {i}: {e}")
            continue
        sample.row = i
        samples.append(sample)
    if bad:
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(f"{len(bad)} of {len(rows)} rows in {source} are unusable:\n  "
                           + "\n  ".join(bad[:MAX_LISTED]) + more)
    return samples


def load_samples(base_path: str, metadata_path: str | None, file_keys: list[str]) -> list[Sample]:
    rows, source = find_rows(base_path, metadata_path)
    return validate_rows(rows, base_path, file_keys, source)


# ----------------------------------------------------------------------------- sizes

def floor_to(v: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, int(v) // multiple * multiple)


def dynamic_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """DiffSynth-Studio's dynamic resolution: shrink (keeping the aspect) to at most `max_pixels`, floor to 16."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = width * scale, height * scale
    return floor_to(width), floor_to(height)


def bucket_sizes(max_pixels: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets: for each height (multiple of `step`) the widest width within max_pixels."""
    out, h = [], step
    while h * step <= max_pixels:
        w = (max_pixels // h) // step * step
        if max(w / h, h / w) <= max_ratio:
            out.append((w, h))
        h += step
    if not out:
        raise ValueError(f"--max_pixels {max_pixels} is too small for buckets of step {step}")
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (ties: the larger one)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def target_size(size: tuple[int, int], height: int | None, width: int | None, max_pixels: int,
                buckets: list[tuple[int, int]] | None) -> tuple[int, int]:
    """(width, height) a sample trains at: fixed, its own dynamic size, or its aspect bucket."""
    if height is not None:
        return width, height
    if buckets is not None:
        return nearest_bucket(*size, buckets)
    return dynamic_size(*size, max_pixels)


def crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover (width, height), keeping the aspect, then centre-crop (masks stay grayscale)."""
    image = image if image.mode == "L" else convert_image(image)
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.LANCZOS)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


# ----------------------------------------------------------------------------- dataset and order

class ImageDataset(torch.utils.data.Dataset):
    """Item i: prompt, images cropped to the sample's target size, extra columns; or cached tensors."""

    def __init__(self, samples: list[Sample], sizes: list[tuple[int, int]], extra_inputs: list[str],
                 height: int | None, width: int | None, max_pixels: int, cache_paths: list[str] | None = None):
        self.samples, self.sizes, self.extra_inputs = samples, sizes, extra_inputs
        self.height, self.width, self.max_pixels = height, width, max_pixels
        self.cache_paths = cache_paths

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, path: str, size: tuple[int, int] | None, mode: str = "RGB") -> Image.Image:
        im = convert_image(open_image(path), mode)
        w, h = size or target_size(im.size, self.height, self.width, self.max_pixels, None)
        return crop_resize(im, w, h)

    def load_files(self, i: int, key: str):
        value = self.samples[i].files[key]
        size = self.sizes[i] if key == "image" else None
        mode = "L" if key in MASK_INPUTS else "RGB"
        return [self._image(p, size, mode) for p in value] if isinstance(value, list) else self._image(value, size, mode)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        w, h = self.sizes[i]
        item = {"index": i, "prompt": s.prompt, "width": w, "height": h}
        if self.cache_paths is not None:
            from safetensors.torch import load_file
            item["cached"] = load_file(self.cache_paths[i])
        else:
            item["image"] = self.load_files(i, "image")
        for key in self.extra_inputs:
            item[key] = self.load_files(i, key) if key in s.files else s.extras.get(key)
        return item


def epoch_batches(sizes: list[tuple[int, int]], repeat: int, batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """Every batch of one epoch (all processes): a seeded shuffle of rows x repeat, grouped by size."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(np.tile(np.arange(len(sizes)), repeat)).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        groups.setdefault(sizes[i], []).append(i)
    batches = [g[j:j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def shard_batches(batches: list[list[int]], rank: int, world: int, multiple: int = 1) -> list[list[int]]:
    """This process's batches. Every process gets the same count, a multiple of `multiple` (gradient
    accumulation), by wrapping around to the first batches when the epoch does not divide evenly."""
    per_rank = -(-len(batches) // world)
    per_rank = -(-per_rank // multiple) * multiple
    padded = [batches[k % len(batches)] for k in range(per_rank * world)]
    return padded[rank::world]
