"""Where the web UI may read and write: its output folder and the folders named on the command line.

Every path that comes from the page (a typed folder, a chosen LoRA) is resolved (symlinks followed) and
must lie inside one of those roots; uploads are copied in as data (images are decoded, LoRAs must be
safetensors, whose reader never runs code) and never executed or unpickled.
"""
from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..ops.files import publish, save_image, temp_path
from ..ops.images import convert_image

LORA_SUFFIX = ".safetensors"  # the only LoRA format the UI accepts: pickled .bin/.pt files can run code


class OutsideError(ValueError):
    """A path from the page that is not inside the UI's folders."""


@dataclass
class Sandbox:
    """output: the folder the UI writes (images/, loras/, datasets/, train/); readable: more folders it may
    read (given on the command line)."""
    output: Path
    readable: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.output = Path(self.output).resolve()
        self.readable = [Path(p).resolve() for p in self.readable]
        for sub in ("images", "loras", "datasets", "train"):
            (self.output / sub).mkdir(parents=True, exist_ok=True)

    @property
    def roots(self) -> list[Path]:
        return [self.output, *self.readable]

    def inside(self, path: str | Path, what: str) -> Path:
        """`path` resolved; OutsideError unless it lies inside one of the roots (a relative path is taken
        relative to the output folder)."""
        text = str(path).strip()
        if not text:
            raise OutsideError(f"{what}: no path given")
        candidate = Path(text).expanduser()
        resolved = (candidate if candidate.is_absolute() else self.output / candidate).resolve()
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            raise OutsideError(f"{what}: {text} is outside the folders this UI may use "
                               f"({', '.join(str(r) for r in self.roots)}); start `diffsynth ui --folder DIR` "
                               "to add one")
        return resolved

    def lora_files(self) -> dict[str, Path]:
        """{label: file} of every LoRA the UI offers: uploaded ones, trained ones (each checkpoint), and those
        in the readable folders. Labels are paths from the folder above their root (loras/x.safetensors)."""
        found: dict[str, Path] = {}
        for root in (self.output / "loras", self.output / "train", *self.readable):
            for path in sorted(root.rglob(f"*{LORA_SUFFIX}")):
                if "cache" in path.relative_to(root).parts:  # the trainer's cached inputs, not LoRAs
                    continue
                found[str(path.relative_to(root.parent))] = path
        return found

    def new_image_path(self, seed: int) -> Path:
        """A fresh file name under images/ (never an existing file)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1000):
            path = self.output / "images" / f"{stamp}-seed{seed}{f'-{i}' if i else ''}.png"
            if not path.exists():
                return path
        raise FileExistsError(f"no free image name in {self.output / 'images'}")


def write_new(path: Path, data: bytes) -> None:
    """Write a new file in one step (a temp file published by a hard link): never replaces a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(str(path))
    try:
        Path(tmp).write_bytes(data)
        publish(tmp, str(path), overwrite=False)
    finally:
        Path(tmp).unlink(missing_ok=True)


def slug(text: str, what: str) -> str:
    """A safe single folder name from page input: letters, digits, - and _ only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip()).strip("-")
    if not name:
        raise ValueError(f"{what}: give a name of letters, digits, - or _ (got {text!r})")
    return name[:64]


def add_lora(sandbox: Sandbox, upload: str) -> Path:
    """Copy an uploaded LoRA into loras/ after checking it is a readable safetensors file."""
    from ..ops.files import scan_safetensors
    source = Path(upload)
    if source.suffix.lower() != LORA_SUFFIX:
        raise ValueError(f"{source.name}: only .safetensors LoRA files are accepted (pickled .bin/.pt/.ckpt files "
                         "can run code when read)")
    scan_safetensors(str(source))  # header and layout only: a damaged or foreign file fails here
    target = sandbox.output / "loras" / f"{slug(source.stem, 'LoRA file name')}{LORA_SUFFIX}"
    write_new(target, source.read_bytes())  # FileExistsError names the file when one has that name
    return target


def read_image(path: str, what: str):
    """An uploaded image decoded to RGB (a damaged file is a ValueError naming `what`)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return convert_image(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what}: cannot be read as an image ({type(e).__name__})") from None


def captions_for(count: int, text: str) -> list[str]:
    """One caption per image: one line per image in order, or a single line for all of them."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"captions: give one line per image ({count}) or a single line for all; got {len(lines)}")
    return lines


def write_upload_dataset(sandbox: Sandbox, name: str, uploads: list[str], captions: str) -> Path:
    """Uploaded images (re-encoded as PNG: only pixels are kept) + metadata.csv under datasets/NAME/."""
    if not uploads:
        raise ValueError("training images: upload some images or give a folder")
    folder = sandbox.output / "datasets" / slug(name, "dataset name")
    if folder.exists():
        raise FileExistsError(f"dataset {folder.name} already exists in {folder.parent}: choose another name")
    rows = [(f"images/{i:05d}.png", caption)
            for i, caption in enumerate(captions_for(len(uploads), captions))]
    images = [read_image(path, f"training image {Path(path).name}") for path in uploads]
    for (name_, _), image in zip(rows, images):
        save_image(image, folder / name_, overwrite=False)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("image", "prompt"), *rows])
    write_new(folder / "metadata.csv", buf.getvalue().encode())
    return folder
