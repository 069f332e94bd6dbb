"""The model variants' pipeline units, one module per variant; `UNITS` is their order in the pipeline.

Each variant module defines its `Unit`s (preprocessing, run once per call) and `StepUnit`s (edit every
DiT call) and lists them in its own `UNITS`; add the module's list here, in the position it needs.
Every unit is a no-op (returns {}) when its inputs are absent, so all of them are always present.
"""
from __future__ import annotations

from . import nexus_gen, step1x

UNITS: list = [*step1x.UNITS, *nexus_gen.UNITS]
