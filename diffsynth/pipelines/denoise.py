"""One denoiser evaluation: the model inputs the units produced -> velocity.

`model_fn` builds a `DiTCall` from the base inputs, lets every `StepUnit` edit it with the inputs its
signature names (extra latent channels, reference tokens, ControlNet residuals, attention additions,
an attention mask, edits of the predicted velocity), then calls the DiT with keywords. An input that
neither the base call nor any step unit takes is an error, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from ..models.flux_dit import Extensions, patchify, unpatchify
from ..models.flux_dit_cache import CachedStep
from .units import StepUnit

# The DiT's text inputs, as the prompt-encoding units (CLIP+T5, Step1X, Redux) write them.
PROMPT_OUTPUTS = ("prompt_emb", "pooled_prompt_emb", "text_ids")


@dataclass
class ControlNetContext:
    """What the ControlNets read instead of the prompt (InfiniteYou's identity tokens)."""
    prompt_emb: torch.Tensor                   # (B, L, 4096)
    text_ids: torch.Tensor                     # (B, L, 3)
    guidance: torch.Tensor                     # (B,)


@dataclass
class DiTCall:
    """Everything one DiT evaluation takes; step units add to it."""
    latents: torch.Tensor                      # (B, 16, h, w)
    timestep: torch.Tensor                     # (B,) sigma
    prompt_emb: torch.Tensor                   # (B, L, 4096)
    pooled_prompt_emb: torch.Tensor            # (B, 768)
    text_ids: torch.Tensor                     # (B, L, 3)
    image_ids: torch.Tensor                    # (B, h/2 * w/2, 3)
    guidance: torch.Tensor | None = None       # (B,) for guidance-distilled DiTs
    channels: list[torch.Tensor] = field(default_factory=list)   # (B, c, h, w) after the latents (Fill, FLEX)
    ref: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # packed tokens, ids (Kontext)
    residuals: list[Callable] = field(default_factory=list)      # (kind, index) -> (B, N, hidden) | None
    attention: list[Callable] = field(default_factory=list)      # see models.flux_dit.Extensions
    mask: torch.Tensor | None = None
    output: list[Callable] = field(default_factory=list)         # velocity (B, 16, h, w) -> velocity (EliGen inpaint)
    controlnet_context: ControlNetContext | None = None          # None: the ControlNets read the prompt

    def extensions(self) -> Extensions:
        residuals = tuple(self.residuals)

        def residual(kind: str, index: int):
            parts = [r for r in (f(kind, index) for f in residuals) if r is not None]
            return sum(parts[1:], parts[0]) if parts else None
        return Extensions(residual if residuals else None, tuple(self.attention), self.mask)


def model_fn(models: SimpleNamespace, latents, timestep, prompt_emb, pooled_prompt_emb, text_ids, image_ids,
             guidance=None, *, step_units: Sequence[StepUnit] = (), step_index: int = 0, cache_states=None,
             **variant_inputs) -> torch.Tensor:
    """One DiT evaluation: latents (B, 16, h, w) and sigma (B,) -> velocity (B, 16, h, w).

    `models`: the in-loop models by attribute (dit, controlnet, ...). `variant_inputs` go to the step
    units that name them; one that no step unit takes raises. `cache_states`: one TeaCache/First-Block-
    Cache state per CFG branch in the batch (None: no cache).
    """
    taken = {p for u in step_units for p in u.params}
    unknown = sorted(variant_inputs.keys() - taken)
    if unknown:
        raise TypeError(f"model_fn got inputs that no denoising step takes: {unknown}")
    call = DiTCall(latents, timestep, prompt_emb, pooled_prompt_emb, text_ids, image_ids, guidance)
    for u in step_units:
        u.fn(models, call, step_index, **{p: variant_inputs[p] for p in u.params if p in variant_inputs})
    velocity = run_dit(models.dit, call, None if cache_states is None else CachedStep(cache_states, step_index))
    for edit in call.output:
        velocity = edit(velocity)
    return velocity


def run_dit(dit, call: DiTCall, cache: CachedStep | None = None) -> torch.Tensor:
    _, _, h, w = call.latents.shape
    x = call.latents if not call.channels else torch.cat([call.latents, *[c.to(call.latents) for c in call.channels]], 1)
    if x.shape[1] * 4 != dit.config.in_channels:
        raise ValueError(f"this DiT takes {dit.config.in_channels // 4} latent channels, the call has {x.shape[1]}: "
                         "a variant DiT (Fill, Canny/Depth, FLEX) needs its condition input")
    ref = ref_ids = None
    if call.ref:
        ref = torch.cat([t for t, _ in call.ref], 1)
        ref_ids = torch.cat([i for _, i in call.ref], -2)
    guidance = call.guidance if dit.config.guidance_embed else None
    out = dit(img=patchify(x), img_ids=call.image_ids, txt=call.prompt_emb, txt_ids=call.text_ids,
              timestep=call.timestep, pooled=call.pooled_prompt_emb, guidance=guidance, ref=ref, ref_ids=ref_ids,
              ext=call.extensions(), cache=cache)
    return unpatchify(out, h, w)


def batch_cfg_inputs(shared: dict, posi: dict, nega: dict, batched: Sequence[str]) -> dict | None:
    """Model inputs with the positive and negative branch stacked along the batch (positive first), built
    once per call; None when the branches' values cannot be stacked (different shapes, non-tensors)."""
    merged = {**shared, **posi}
    for key, value in posi.items():
        other = nega.get(key)
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or other.shape != value.shape:
                return None
            merged[key] = torch.cat([value, other])
        elif value is not other:  # non-tensors batch only when both branches share the object
            return None
    for key in batched:
        if isinstance(merged.get(key), torch.Tensor):
            merged[key] = torch.cat([merged[key], merged[key]])
        elif key in merged:
            return None
    return merged
