"""The model variants' pipeline units, one module per variant, each listing its units in `UNITS`.

Every module of this package is a variant: its units are collected here and placed among the core units by
what they declare (`units.order_units`), so adding a variant is adding its module. Every unit is a no-op
(returns {}) when its inputs are absent, so all of them are always present.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..units import image_inputs

VARIANTS = tuple(importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
                 if not m.name.startswith("_"))
UNITS: list = [u for module in VARIANTS for u in module.UNITS]

# Unit inputs that are images: training reads these dataset columns as image files.
IMAGE_INPUTS = image_inputs(UNITS)
