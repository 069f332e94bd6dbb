"""The component table: every model the pipeline can hold, and every kind of checkpoint file.

Each model file registers its own entry (`models.entry`): `COMPONENTS`, the pipeline attributes it fills
(`dit`, `text_encoder_1`, `controlnet`, ...) and how they run, and `FAMILIES`, the kinds of checkpoint
file it reads (`flux-dit`, `flux-vae`, `clip`, ...) with their detector and builder. This module collects
them, in the order of `MODEL_FILES`; the registry (detection and building), VRAM management (groups),
training (trainable names, aliases), the CLI and the pipelines read the collected tables.

Adding a model = its model file with its entry + one line in `MODEL_FILES` (+ its pipeline units).
Families whose loader does not exist yet are still recognised (build=None), so that such a file is
reported as what it is instead of being misread as another model.
"""
from __future__ import annotations

from ..models import (clip_vision, flux2_dit, flux2_text_encoder, flux2_vae, flux_controlnet, flux_dit,
                      flux_infiniteyou, flux_ipadapter, flux_lora_encoder, flux_lora_patcher, flux_redux,
                      flux_text_encoders, flux_timestep_lora, flux_value_control, flux_vae, nexus_gen, qwen_vl, siglip,
                      step1x)
from ..models.entry import Component, Family

__all__ = ["Component", "Family", "COMPONENTS", "FAMILIES", "MODEL_FILES", "component", "in_loop_names", "vram_groups"]

# Detection tries the families in this order: a file that also carries another family's keys comes before it
# (ControlNets, Step1X and Nexus-Gen's decoder carry FLUX DiT blocks; FLUX.2's DiT and VAE extend FLUX.1's
# layouts; Nexus-Gen's LLM is a Qwen2.5-VL with extra heads). Components are listed in the same order.
MODEL_FILES = (
    flux_controlnet, flux_ipadapter, flux_lora_encoder, flux_value_control, flux_lora_patcher, flux_timestep_lora,
    flux_redux, flux_infiniteyou, siglip, clip_vision, nexus_gen, qwen_vl, step1x, flux2_dit, flux_dit, flux2_vae,
    flux_vae, flux_text_encoders, flux2_text_encoder,
)

COMPONENTS: tuple[Component, ...] = tuple(c for m in MODEL_FILES for c in getattr(m, "COMPONENTS", ()))
FAMILIES: tuple[Family, ...] = tuple(f for m in MODEL_FILES for f in m.FAMILIES)

COMPONENT_BY_NAME = {c.name: c for c in COMPONENTS}
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
ALIASES = {a: c.name for c in COMPONENTS for a in c.aliases}


def component(name: str) -> Component:
    name = ALIASES.get(name, name)
    if name not in COMPONENT_BY_NAME:
        raise KeyError(f"{name!r} is not a model of the pipeline; known: {', '.join(COMPONENT_BY_NAME)}")
    return COMPONENT_BY_NAME[name]


def in_loop_names() -> tuple[str, ...]:
    return tuple(c.name for c in COMPONENTS if c.in_loop)


def vram_groups() -> tuple[tuple[str, ...], ...]:
    """Component names grouped by `vram_group`, in table order."""
    groups: dict[str, list[str]] = {}
    for c in COMPONENTS:
        groups.setdefault(c.vram_group, []).append(c.name)
    return tuple(tuple(g) for g in groups.values())
