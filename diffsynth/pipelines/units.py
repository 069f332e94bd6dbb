"""Units: the small preprocessing steps a pipeline runs before denoising, shared by inference and training.

A unit is a function `fn(pipe, **named_inputs) -> dict of named outputs`. The runner passes each
function exactly the inputs its signature names (defaults apply when an input is absent), so units
compose without a monolithic call. A unit marked `per_branch` runs once for the positive side and,
under CFG, once for the negative side, each reading its own branch values (`prompt` is the branch's
text) and writing into its own branch dict.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Unit:
    fn: Callable[..., dict]
    per_branch: bool = False
    models: tuple[str, ...] = ()  # pipeline attributes this unit needs on the compute device

    @property
    def name(self) -> str:
        return self.fn.__name__

    def inputs(self, values: dict) -> dict:
        params = list(inspect.signature(self.fn).parameters)[1:]  # first parameter is the pipeline
        return {p: values[p] for p in params if p in values}


def unit(per_branch: bool = False, models: tuple[str, ...] = ()) -> Callable[[Callable], Unit]:
    return lambda fn: Unit(fn, per_branch, models)


def run_units(pipe, units: list[Unit], shared: dict, posi: dict, nega: dict, cfg: bool) -> None:
    """Run `units` in order, updating the three dicts in place."""
    for u in units:
        pipe.load_models_to_device(u.models)
        if not u.per_branch:
            shared.update(u.fn(pipe, **u.inputs(shared)))
            continue
        for branch in (posi, nega) if cfg else (posi,):
            branch.update(u.fn(pipe, **u.inputs({**shared, **branch})))
