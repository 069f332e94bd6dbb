"""What a checkpoint is, from its key patterns and tensor shapes, and how to build the model from it.

A file may hold several models (a ComfyUI all-in-one checkpoint holds DiT, CLIP, T5 and VAE); each
becomes one `Detected` component. Detection is driven by the component table (`loading.components`):
each family's detector looks at key patterns and shapes, never at the exact key list, so a fine-tune
saved in any supported naming, any depth or width, fp8 or not, is recognised the same way, and a
file of a family this package cannot load yet is named as what it is.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.entry import BuildOptions, Detected
from ..ops.files import CheckpointError, TensorRef, read_config, scan, strip_prefix
from . import components as table

__all__ = ["Detected", "MODEL_PREFIXES", "build", "classify", "describe", "detect", "dit_config", "looks_like_lora",
           "pipeline_family"]

# Prefixes stripped from a single model (trainers and UIs add them).
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "pipe.dit.", "transformer.", "model.")


def classify(refs: dict[str, TensorRef]) -> tuple[table.Family, str, dict[str, TensorRef]] | None:
    """(family, format, refs without wrapper prefix) of a single model, or None."""
    for prefix in ("",) + MODEL_PREFIXES:
        sub = strip_prefix(refs, prefix) if prefix else refs
        if not sub:
            continue
        for family in table.FAMILIES:
            fmt = family.detect(sub)
            if fmt is not None:
                return family, fmt, dict(family.normalize(sub)) if family.normalize else sub
    return None


def looks_like_lora(keys) -> bool:
    """LoRA files carry low-rank pairs (lora_A/B, lora_down/up, XLabs `.down`/`.up` processors)."""
    return any(".lora_" in k or "_lora" in k or k.startswith("lora_") for k in keys)


def _lora_named_model(refs) -> bool:
    found = classify(refs)
    return found is not None and found[0].lora_named


def _bundle_prefixes() -> dict[str, table.Family]:
    return {p: f for f in table.FAMILIES for p in f.bundle_prefixes}


def detect(paths) -> list[Detected]:
    """Recognise every model inside a file, a list of shards, or a folder."""
    refs = scan(paths)
    source = str(paths if isinstance(paths, str) else list(map(str, paths)))
    if looks_like_lora(refs) and not _lora_named_model(refs):
        raise CheckpointError(f"{source} is a LoRA (low-rank weight pairs), not a model: apply it with "
                              f"pipe.load_lora(pipe.dit, path); `diffsynth inspect` names its dialect")
    config = read_config(paths)
    present = [p for p in _bundle_prefixes() if any(k.startswith(p) for k in refs)]
    bundle = len(present) >= 2
    groups = [strip_prefix(refs, p) for p in present] if bundle else [refs]
    found = []
    for sub in groups:
        result = classify(sub)
        if result is None:
            if bundle:
                continue
            known = ", ".join(f.description for f in table.FAMILIES)
            raise CheckpointError(f"{source}: not a recognised model file (known: {known}). "
                                  f"First keys: {sorted(refs)[:8]}")
        family, fmt, model_refs = result
        found.append(Detected(family.name, fmt, model_refs, source, None if bundle else config,
                              family.components(model_refs)))
    if not found:
        raise CheckpointError(f"{source}: no model recognised in this multi-model file")
    return found


def pipeline_family(sources) -> str:
    """"flux" or "flux2": the pipeline family (`Family.pipeline`) of the models in `sources` (files, folders or
    shard lists); a mix of both is an error naming one file of each."""
    kinds = {table.FAMILY_BY_NAME[d.family].pipeline: str(src) for src in sources for d in detect(src)}
    if len(kinds) > 1:
        raise ValueError(f"the models mix FLUX.1 and FLUX.2 files ({kinds['flux']} and {kinds['flux2']}): "
                         "give the files of one model")
    return next(iter(kinds), "flux")


def build(det: Detected, dtype: torch.dtype | None = None, device="cpu",
          compute_dtype: torch.dtype | None = None, processor_dir: str | None = None) -> dict[str, nn.Module]:
    """Build the detected model(s): {pipeline attribute: module}.

    `dtype`/`device` are the storage ones; `compute_dtype` (the pipeline's) keeps small tensors precise
    under fp8 storage. Scaled-fp8 scales are kept for the DiT and folded into the weights elsewhere.
    `processor_dir`: where a Qwen2.5-VL model's processor files are (default: beside its weights).
    """
    family = table.FAMILY_BY_NAME[det.family]
    if family.build is None:
        raise CheckpointError(f"{det.source} is a {family.description} ({det.format} layout); "
                              "this version of diffsynth recognises it but cannot load it yet")
    return family.build(det, BuildOptions(dtype, device, compute_dtype, processor_dir))


def dit_config(det: Detected):
    """A detected DiT's (FLUX.1 or FLUX.2) architecture, read from shapes alone."""
    family = table.FAMILY_BY_NAME[det.family]
    if family.config is None:
        raise ValueError(f"{det.source} is a {family.description}, not a DiT")
    return family.config(det)


def describe(det: Detected) -> dict:
    """What `diffsynth inspect` prints for one model."""
    info = {"family": det.family, "format": det.format, "components": list(det.components),
            "parameters": det.num_params, "dtypes": det.dtypes}
    quant = det.quant_types()
    if quant:
        info["quant_types"] = quant
    family = table.FAMILY_BY_NAME[det.family]
    if family.describe is not None:
        info["architecture"] = family.describe(det)
    return info
