"""Disk cache of what the frozen encoders produce: VAE latents (x0) and text embeddings, one file per row.

The file name is a hash of everything the tensors depend on (the identity of every image file of the row, e.g.
reference images too, the row's --extra_inputs values, target size, prompt, T5 length, the model files' identity,
dtype), so a changed image, caption, input or model never reuses a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import torch
from tqdm import tqdm

from ..ops.files import file_identity, remove_stale_temps, save_safetensors
from .data import ImageDataset, Sample
from .module import FluxTrainingModule, cached_keys


def file_stamp(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_mtime_ns, st.st_size]


def cache_key(sample: Sample, size: tuple[int, int], t5_sequence_length: int, model_tag: str,
              extra_inputs: Sequence[str] = ()) -> str:
    files = {k: [file_stamp(p) for p in ([v] if isinstance(v, str) else v)] for k, v in sorted(sample.files.items())}
    extras = {k: sample.extras.get(k) for k in sorted(extra_inputs) if k not in sample.files}
    ident = [*files["image"][0], list(size), sample.prompt, t5_sequence_length, model_tag]
    if len(files) > 1 or extras:  # (rows of the image alone keep the keys of earlier caches)
        ident.append([files, extras])
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:32]


def models_tag(files: list[str], dtype: torch.dtype) -> str:
    """The models part of a cache key: the identity of every model file (not the path strings: a model file
    replaced at the same path must not reuse the old model's latents) and the compute dtype."""
    return json.dumps([[file_identity(f) for f in files], str(dtype)])


def cache_paths(samples: list[Sample], sizes: list[tuple[int, int]], cache_dir: str, t5_sequence_length: int,
                model_tag: str, extra_inputs: Sequence[str] = ()) -> list[str]:
    return [os.path.join(cache_dir, cache_key(s, size, t5_sequence_length, model_tag, extra_inputs) + ".safetensors")
            for s, size in zip(samples, sizes)]


@torch.no_grad()
def build_cache(module: FluxTrainingModule, dataset: ImageDataset, paths: list[str], rank: int = 0,
                world: int = 1, show_progress: bool = True) -> int:
    """Encode the rows whose cache file is missing (rows split across processes). Returns how many."""
    if rank == 0 and paths:  # half-written entries of killed runs (only those whose process is gone)
        remove_stale_temps(os.path.dirname(paths[0]))
    todo = [i for i in range(rank, len(paths), world) if not os.path.isfile(paths[i])]
    for i in tqdm(todo, desc="caching latents and text embeddings", disable=not show_progress or not todo):
        inputs = module.prepare_sample(dataset[i], seed=0)
        # a unit with nothing to do for this row (no reference image) leaves its outputs out; it runs again when
        # the row is read back, as a no-op
        save_safetensors({k: inputs[k].detach() for k in cached_keys(module.units()) if k in inputs}, paths[i])
    return len(todo)
