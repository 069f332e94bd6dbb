"""The model variants' pipeline units, one module per variant; `UNITS` is their order in the pipeline
(after the core units; `FIRST_UNITS` run before them).

Each variant module defines its `Unit`s (preprocessing, run once per call) and `StepUnit`s (edit every
DiT call) and lists them in its own `UNITS`; add the module's list here, in the position it needs.
Every unit is a no-op (returns {}) when its inputs are absent, so all of them are always present.
"""
from __future__ import annotations

from . import (controlnet, eligen, fill_control, flex, infiniteyou, insert_anything, ipadapter, kontext, nexus_gen,
               prompt_tokens, redux, step1x, timestep_lora)

# Units that run before the core units: they set the size and the input image the core units read.
FIRST_UNITS: list = [*insert_anything.UNITS]

# prompt_tokens appends tokens before eligen prepends its entity prompts (whose mask counts them as global)
UNITS: list = [*step1x.UNITS, *nexus_gen.UNITS, *redux.UNITS, *kontext.UNITS, *flex.UNITS, *fill_control.UNITS,
               *controlnet.UNITS, *infiniteyou.UNITS, *ipadapter.UNITS, *prompt_tokens.UNITS, *eligen.UNITS,
               *timestep_lora.UNITS]

# Unit inputs that are images: training reads these dataset columns as image files.
IMAGE_INPUTS = ("kontext_images", "flex_inpaint_image", "flex_inpaint_mask", "flex_control_image",
                "flux_fill_image", "flux_fill_mask", "flux_control_image", "flux_redux_image",
                "step1x_reference_image", "nexus_gen_reference_image", "infinityou_id_image", *insert_anything.INPUTS)
