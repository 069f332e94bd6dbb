"""Split training (DiffSynth-Studio 2.0's `--task sft:data_process` then `--task sft:train`).

The first command runs the preprocessing units (text encoders, VAE encoder, reference images) over the dataset and
writes what they produce into `--output_path`: one training-cache file per row under `rows/` (the files
`--cache_dir` writes) and `split_cache.json`, which records the rows (prompt, files, image size, extra columns),
their cache files, and the arguments the cached tensors depend on. The second command gets that folder as
`--dataset_base_path`, loads only the models that train (the DiT), and reads the rows back: the run is the one a
single `--cache_dir` command makes (same rows, sizes, batches, noise and LoRA initialisation for the same seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ops.files import save_text
from .data import DatasetError, Sample, bucket_sizes, target_size

MANIFEST = "split_cache.json"
ROWS = "rows"
VERSION = 1
# The arguments the cached tensors depend on: the second command must give the same (or leave the default).
CACHED_ARGS = ("t5_sequence_length", "extra_inputs")


@dataclass
class SplitCache:
    """The rows of a data_process folder, as the training half reads them."""
    folder: Path
    samples: list[Sample]
    paths: list[str]
    family: str
    dtype: str
    sizes: list[tuple[int, int]]


def sample_sizes(samples: list[Sample], args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (width, height) each row trains at: fixed, its own dynamic size, or its aspect bucket (batch_size > 1)."""
    buckets = bucket_sizes(args.max_pixels, args.bucket_step) if args.batch_size > 1 and args.height is None else None
    return [target_size(s.size, args.height, args.width, args.max_pixels, buckets) for s in samples]


def rows_folder(output: str | Path) -> Path:
    return Path(output) / ROWS


def write_manifest(folder: str | Path, args: argparse.Namespace, family: str, dtype: torch.dtype,
                   samples: list[Sample], sizes: list[tuple[int, int]], paths: list[str]) -> Path:
    """`split_cache.json` in `folder` (atomically): the rows, their cache files (relative) and target sizes."""
    folder = Path(folder)
    rows = [{**dataclasses.asdict(s), "target_size": list(size), "cache": str(Path(p).relative_to(folder))}
            for s, size, p in zip(samples, sizes, paths)]
    record = {"version": VERSION, "family": family, "dtype": str(dtype).removeprefix("torch."),
              "args": {k: getattr(args, k) for k in CACHED_ARGS}, "rows": rows}
    path = folder / MANIFEST
    save_text(json.dumps(record, indent=1, ensure_ascii=False), path)
    return path


def read_split_cache(args: argparse.Namespace) -> SplitCache:
    """The rows of the `--dataset_base_path` folder that `--task sft:data_process` wrote; DatasetError when it is
    not one, or when this run's arguments would train other tensors than the cached ones."""
    folder = Path(args.dataset_base_path)
    path = folder / MANIFEST
    if not path.is_file():
        studio = any(folder.glob("*/*.pth"))
        raise DatasetError(f"--task sft:train: {folder} holds no {MANIFEST}; give the --output_path of a "
                           "`--task sft:data_process` run of this package" +
                           (" (the .pth files there are DiffSynth-Studio 2.0's own format: run its first command "
                            "with this package)" if studio else ""))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("version") != VERSION:
            raise DatasetError(f"{path}: version {record.get('version')!r}, this package reads {VERSION}: run "
                               "--task sft:data_process again")
        samples = [Sample(row=r["row"], prompt=r["prompt"], files=r["files"], size=tuple(r["size"]),
                          extras=r["extras"]) for r in record["rows"]]
        paths = [str(folder / r["cache"]) for r in record["rows"]]
        sizes = [tuple(r["target_size"]) for r in record["rows"]]
        saved_args, family, dtype = record["args"], record["family"], record["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path} cannot be read ({type(e).__name__}: {e}): run --task sft:data_process again")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"{folder}: {len(missing)} cached rows are missing (e.g. {missing[0]}): run "
                           "--task sft:data_process again")
    differ = [f"--{k} {getattr(args, k)!r} (now) vs {v!r} (cached)" for k, v in saved_args.items()
              if getattr(args, k) != v]
    if sample_sizes(samples, args) != sizes:
        differ.append("the training sizes: give the --height/--width/--max_pixels/--batch_size/--bucket_step of the "
                      "data_process run")
    if differ:
        raise DatasetError(f"{folder} was preprocessed with other arguments: {'; '.join(differ)}")
    return SplitCache(folder, samples, paths, family, dtype, sizes)
