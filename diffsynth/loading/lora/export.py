"""Writing LoRAs for other tools (kohya / ComfyUI, diffusers / PEFT) and describing LoRA files."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from typing import Mapping

import torch
from torch import nn

from ...models.flux_dit import swap_halves
from .apply import mlp_ratio_of, plan_lora
from .formats import (NAMINGS, CanonicalLoRA, DiTNaming, LoRAWeights, Target, convert_lora, fuse_parts, key_listing,
                      naming_for, read_lora_file)


# ----------------------------------------------------------------------------- export

def export_kohya(lora: CanonicalLoRA, strict: bool = True) -> dict[str, torch.Tensor]:
    """kohya / sd-scripts names (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``lora_te1_*``).

    Weights are written unchanged with each layer's own ``.alpha`` (the rank when it had none), so
    reading the file back gives the same LoRA exactly. Final-layer LoRAs get their scale folded into
    ``lora_up`` and alpha = rank, because diffusers ignores alpha there. FLUX.2's separate q/k/v LoRAs
    become one LoRA of BFL's fused ``qkv`` (block-diagonal, exact). LoRA biases and norm weights
    have no kohya form: ValueError (`strict=False`: warn and leave them out).
    """
    naming = NAMINGS[lora.family]
    out: dict[str, torch.Tensor] = {}
    problems = [f"{n}: norm weights have no kohya form" for n in lora.norm_weights]

    def put(key: str, lw: LoRAWeights, up: torch.Tensor, alpha: float | None) -> None:
        out[f"{key}.lora_down.weight"] = lw.down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(lw.rank if alpha is None else alpha))

    for name, bfl, lw in _bfl_layers(lora.layers, naming, problems):
        if bfl is None or lw.bias_up is not None:
            problems.append(f"{name}: " + ("no BFL name" if bfl is None else "LoRA bias has no kohya form"))
            continue
        up, alpha = lw.up, lw.alpha
        if name in naming.final_layers and lw.scale != 1.0:
            up, alpha = (up.float() * lw.scale).to(up.dtype), None
        if name == naming.final_layers[0]:
            up = swap_halves(up)
        put("lora_unet_" + bfl.replace(".", "_"), lw, up, alpha)
    for name, lw in lora.te_layers.items():
        if lw.bias_up is not None:
            problems.append(f"{name}: LoRA bias has no kohya form")
            continue
        put("lora_te1_" + name.replace(".", "_"), lw, lw.up, lw.alpha)
    if problems:
        msg = "cannot export to kohya format:" + key_listing(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


def _bfl_layers(layers: dict[str, LoRAWeights], naming: DiTNaming, problems: list[str]):
    """(internal name, BFL module name or None, LoRA) of every layer, with the separate layers BFL fuses
    (FLUX.2's q/k/v) joined into one block-diagonal LoRA (missing parts are zero blocks)."""
    internal = naming.bfl_blocks["double_blocks"][0]
    group_of = {(internal, part): (fused, i, len(parts))  # -> (BFL fused module, index, group size)
                for fused, parts in naming.bfl_split.items() for i, part in enumerate(parts)}
    groups: dict[str, list] = {}
    for name, lw in layers.items():
        m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", name)
        hit = group_of.get((m.group(1), m.group(3))) if m else None
        if hit is None:
            bfl = naming.internal_key_to_bfl(name + ".weight")
            yield name, None if bfl is None else bfl[: -len(".weight")], lw
            continue
        fused, i, n = hit
        groups.setdefault(f"double_blocks.{m.group(2)}.{fused}", []).append((Target("dit", name, (i, i + 1)), lw, n))
    for bfl, group in groups.items():
        unknown: dict[str, str] = {}
        lw = fuse_parts(bfl, [(t, lw) for t, lw, _ in group], [group[0][1].up.shape[0]] * group[0][2], unknown)
        if lw is None:
            problems.extend(f"{k}: {v}" for k, v in unknown.items())
        else:
            yield bfl, bfl, lw


def _to_diffusers_name(name: str, naming: DiTNaming) -> str | None:
    """Internal module name -> diffusers module name (None for fused layers and unknown names)."""
    m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", name)
    for kind, (internal, table) in naming.diffusers_blocks.items():
        if m and m.group(1) == internal:
            rest = {v: k for k, v in table.items()}.get(m.group(3))
            return f"{kind}.{m.group(2)}.{rest}" if rest else None
    return {v: k for k, v in naming.diffusers_top.items()}.get(name)


def _diffusers_pieces(name: str, lw: LoRAWeights, naming: DiTNaming):
    """(diffusers module, down, up, bias) for one internal layer; fused layers split exactly by rows.

    Each part keeps only the rank columns its rows use (a block-diagonal fused LoRA splits back into its
    original parts); a part whose rows are all zero is left out.
    """
    m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", name)
    kind = next((k for k, (internal, _) in naming.diffusers_blocks.items() if m and m.group(1) == internal), None)
    parts = naming.diffusers_fused.get((kind, m.group(3))) if kind else None
    if parts is None:
        path = _to_diffusers_name(name, naming)
        if path is None:
            raise ValueError(f"cannot export {name!r} to diffusers names")
        yield path, lw.down, lw.up, lw.bias_up
        return
    hidden = lw.down.shape[1]
    sizes = [hidden] * 3 + ([lw.up.shape[0] - 3 * hidden] if len(parts) == 4 else [])
    start = 0
    for part, size in zip(parts, sizes):
        rows = slice(start, start + size)
        start += size
        up, bias = lw.up[rows], None if lw.bias_up is None else lw.bias_up[rows]
        cols = (up != 0).any(dim=0)
        if not cols.any() and (bias is None or not bias.any()):
            continue
        if cols.any():
            up, down = up[:, cols], lw.down[cols]
        else:
            down = lw.down
        yield f"{kind}.{m.group(2)}.{part}", down.contiguous(), up.contiguous(), bias


def _bake(t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return t if t is None or scale == 1.0 else (t.float() * scale).to(t.dtype)


def _peft_config(ranks: dict[str, int], bias: bool) -> dict:
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{path}": rank for path, rank in ranks.items() if rank != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_bias": bias, "use_dora": False}


def export_peft(lora: CanonicalLoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers / PEFT format: ``transformer.<diffusers path>.lora_A.weight`` (+ ``text_encoder.*``).

    Each layer's alpha/rank is baked into ``lora_B`` so that alpha = rank everywhere, and the header
    metadata ``{"lora_adapter_metadata": json}`` carries the LoraConfig (r, lora_alpha, rank/alpha
    patterns, target_modules) per component, as diffusers' ``save_lora_weights`` writes it.
    """
    naming = NAMINGS[lora.family]
    sd: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for comp, layers in (("transformer", lora.layers), ("text_encoder", lora.te_layers)):
        ranks: dict[str, int] = {}
        bias = False
        for name, lw in layers.items():
            pieces = _diffusers_pieces(name, lw, naming) if comp == "transformer" else \
                [(name, lw.down, lw.up, lw.bias_up)]
            for path, down, up, b in pieces:
                sd[f"{comp}.{path}.lora_A.weight"] = down
                sd[f"{comp}.{path}.lora_B.weight"] = _bake(up, lw.scale)
                if b is not None:
                    sd[f"{comp}.{path}.lora_B.bias"] = _bake(b, lw.scale)
                    bias = True
                ranks[path] = down.shape[0]
        if ranks:
            config.update({f"{comp}.{k}": v for k, v in _peft_config(ranks, bias).items()})
    for pname, value in lora.norm_weights.items():
        path = _to_diffusers_name(pname.rpartition(".")[0], naming)
        if path is None:
            raise ValueError(f"cannot export norm weight {pname!r} to diffusers names")
        sd[f"transformer.{path}.weight"] = value
    return sd, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def save_lora(path: str | os.PathLike, sd: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA state dict to a safetensors file atomically."""
    from ...ops.files import save_safetensors
    save_safetensors(dict(sd), path, dict(metadata) if metadata else None)


# ----------------------------------------------------------------------------- inspection

def describe_lora(path_or_sd, model: nn.Module | object | None = None) -> dict:
    """What a LoRA file is: dialect, ranks, alphas, targeted layers, and what would not apply.

    `model` (a FluxDiT / Flux2DiT, any nn.Module, or their config) adds ``not_applied``: the entries that
    `apply_lora` would reject for that model, whose family's names the file is read in (FLUX.1's without
    a model). A config is instantiated on the meta device (no memory).
    """
    if isinstance(path_or_sd, Mapping):
        sd, metadata, name = dict(path_or_sd), {}, None
    else:
        sd, metadata = read_lora_file(path_or_sd)
        name = str(path_or_sd)
    ratio = mlp_ratio_of(model) if isinstance(model, nn.Module) else float(getattr(model, "mlp_ratio", 4.0))
    naming = naming_for(model)
    lora = convert_lora(sd, metadata, ratio, naming)
    every = {**lora.layers, **{f"text_encoder.{k}": v for k, v in lora.te_layers.items()}}
    info = {
        "file": name,
        "dialect": lora.dialect,
        "family": lora.family,
        "tensors": len(sd),
        "num_layers": len(lora.layers),
        "num_te_layers": len(lora.te_layers),
        "layers": sorted(every),
        "ranks": Counter(lw.rank for lw in every.values()),
        "alphas": Counter("none" if lw.alpha is None else lw.alpha for lw in every.values()),
        "norm_weights": sorted(lora.norm_weights),
        "bias": sorted(k for k, lw in every.items() if lw.bias_up is not None),
        "dtypes": Counter(str(t.dtype).replace("torch.", "") for t in sd.values()),
        "unknown": dict(lora.unknown),
    }
    if model is not None:
        if not isinstance(model, nn.Module):
            from ...models.flux2_dit import Flux2DiT
            from ...models.flux_dit import FluxDiT
            with torch.device("meta"):
                model = (Flux2DiT if naming.family == "flux2" else FluxDiT)(model)
        plan = plan_lora(model, lora, merge=False)
        info["not_applied"] = [f"{k}: {v}" for k, v in lora.unknown.items()] + plan.unmatched
    return info
