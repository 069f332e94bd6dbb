"""Training outputs: the trainable weights only, prefix removed, in the chosen key format, written atomically.

LoRA formats: "diffsynth" (PEFT names as trained: `blocks.0.attn.a_to_qkv.lora_A.default.weight`, read by
`pipe.load_lora`), "kohya" (`lora_unet_*` + `.alpha`, ComfyUI / diffusers; what DiffSynth-Studio's
`--align_to_opensource_format` asks for) and "diffusers" (`transformer.*.lora_A.weight` + adapter metadata).
Full fine-tunes: "diffsynth" (internal names, `pipe.dit.load_state_dict`) or "bfl" (original FLUX names).
A model of a list component that is saved under its list name (prefix `pipe.`) is named as in DiffSynth-Studio,
`controlnet.models.0.*`, which their validate scripts read (`pipe.controlnet.models[0]`).
"""
from __future__ import annotations

import json
import re

import torch

from ..loading import components as table
from ..ops.files import save_safetensors

# `controlnet.0.` (our module path) -> `controlnet.models.0.` (DiffSynth-Studio's MultiControlNet path)
_LIST_ENTRY = re.compile(r"^(%s)\.(\d+)\." % "|".join(re.escape(c.name) for c in table.COMPONENTS if c.many))


def remove_prefix(sd: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(sd)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def studio_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys that start with a list component's entry (`controlnet.0.`) get DiffSynth-Studio's `.models.`."""
    return {_LIST_ENTRY.sub(r"\1.models.\2.", k): v for k, v in sd.items()}


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def convert_output(sd: dict[str, torch.Tensor], lora_format: str = "diffsynth", full_format: str = "diffsynth",
                   family: str = "flux") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of one output file. `sd` has the prefix already removed; `family` ("flux" or
    "flux2", the trained DiT's) picks the key tables of the kohya / PEFT / BFL names."""
    metadata: dict[str, str] = {}
    lora = {k: v for k, v in sd.items() if is_lora_key(k)}
    full = {k: v for k, v in sd.items() if not is_lora_key(k)}
    out: dict[str, torch.Tensor] = {}
    if lora and lora_format != "diffsynth":
        from ..loading.lora import NAMINGS, export_kohya, export_peft, lora_from_peft_model_state
        canonical = lora_from_peft_model_state(lora, naming=NAMINGS[family])
        if lora_format == "kohya":
            lora = export_kohya(canonical)
        else:
            lora, metadata = export_peft(canonical)
    if full and full_format == "bfl":
        from ..models import flux2_dit, flux_dit
        full = (flux2_dit if family == "flux2" else flux_dit).dit_to_bfl(full)
    out.update(full)
    out.update(lora)
    return out, metadata


_RUN_FIELDS = ("trainable_models", "learning_rate", "guidance")
_LORA_FIELDS = ("lora_base_model", "lora_rank", "lora_target_modules", "lora_format")


def training_info(args) -> dict:
    """What an output file's header records about its run: the LoRA fields only when a LoRA was trained,
    the full-weight format only when weights were fully trained (a reader must not guess from empty fields)."""
    names = _RUN_FIELDS + (_LORA_FIELDS if args.lora_base_model else ())
    names += ("full_format",) if args.trainable_models else ()
    return {k: getattr(args, k) for k in names}


def save_output(sd: dict[str, torch.Tensor], path: str, prefix: str | None, lora_format: str, full_format: str,
                dtype: torch.dtype | None, info: dict | None = None, family: str = "flux") -> None:
    """Remove the prefix, convert, cast floating tensors to `dtype`, and write `path` atomically."""
    tensors, metadata = convert_output(studio_names(remove_prefix(sd, prefix)), lora_format, full_format, family)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": "pt", **metadata}
    if info:
        metadata["diffsynth_training"] = json.dumps(info, sort_keys=True, default=str)
    save_safetensors(tensors, path, metadata)
