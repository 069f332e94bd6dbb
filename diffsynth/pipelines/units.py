"""Units: the small steps a pipeline runs, shared by inference and training.

A `Unit` runs before denoising: `fn(pipe, **named_inputs) -> dict of named outputs`. The runner passes
each function exactly the inputs its signature names (defaults apply when an input is absent), so units
compose without a monolithic call. How it sees the CFG branches:

* shared (default): reads and writes the shared values.
* `per_branch`: runs once for the positive side and, under CFG, once for the negative side, each
  reading its own branch values (`prompt` is the branch's text) and writing into its own branch dict.
* `both_branches`: runs once with `branches` = [positive values, negative values (CFG only)] and returns
  one dict per branch (batched encoders, inputs whose negative side depends on the positive one).

A unit declares its `outputs` (checked); which of them go to the denoiser (`model_inputs`), which shared
ones carry the batch dimension (`batched`: repeated when both CFG branches run as one batch) and which a
training cache may store (`cacheable`: the unit is skipped when all of them come from the cache). A unit
with `active` runs only when that predicate holds, and then replaces the units named in `replaces`
(e.g. another text encoder replacing CLIP+T5 `encode_prompt`).

A `StepUnit` runs inside the denoising loop, at every DiT evaluation: `fn(models, call, step, **inputs)`
edits the `DiTCall` (extra channels, reference tokens, residuals, attention additions) from the model
inputs its signature names; `models` are the pipeline's in-loop models by attribute (dit, controlnet, ...).

Order is declared, not positional (`order_units`): a unit runs after the units that produce the inputs its
signature names (for a value that several units write, those that only write it come before those that also
read it, e.g. `check_shape` after a unit that sets a default size); `needs` adds values a unit reads through
its branch dicts (an encoder's tokens that it extends); `after` names units that must run first, for what
the data does not show (the order in which step units edit the same `DiTCall` field). Units that declare
`image_inputs` take images there: training reads those dataset columns as image files; what a training batch
stacks per sample is declared too (`Unit.per_sample`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Callable


def _params(fn: Callable, skip: int) -> list[str]:
    return list(inspect.signature(fn).parameters)[skip:]


@dataclass(frozen=True)
class Unit:
    fn: Callable[..., dict]
    per_branch: bool = False
    both_branches: bool = False
    models: tuple[str, ...] = ()       # pipeline attributes this unit needs on the compute device
    # attributes it reads only for some inputs, moving them itself (e.g. the VAE encoder for an image input):
    # not moved up front, so a text-to-image call never moves them
    uses: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    model_inputs: tuple[str, ...] = ()
    batched: tuple[str, ...] = ()
    cacheable: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    active: Callable | None = None     # (pipe) -> bool
    image_inputs: tuple[str, ...] = ()  # inputs that are images (dataset columns read as image files)
    stack: tuple[str, ...] = ()        # shared outputs that differ per training sample, besides `batched`
    needs: tuple[str, ...] = ()        # values read through the branch dicts (not in the signature)
    after: tuple[str, ...] = ()        # units (by name) that must run first when present

    @property
    def name(self) -> str:
        return self.fn.__name__

    @cached_property  # read at every call; the signature never changes
    def params(self) -> list[str]:
        return _params(self.fn, 2 if self.both_branches else 1)

    @property
    def per_sample(self) -> tuple[str, ...]:
        """Outputs a training batch stacks, one row (or one `.stack` item) per sample: the branch outputs (the
        prompt's), those carrying the batch (`batched`) and `stack`; every other value is shared by the batch."""
        return self.outputs if self.per_branch or self.both_branches else (*self.batched, *self.stack)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every pipeline attribute the unit may read."""
        return self.models + self.uses

    def inputs(self, values: dict) -> dict:
        return {p: values[p] for p in self.params if p in values}

    def _checked(self, out: dict) -> dict:
        extra = out.keys() - set(self.outputs)
        if extra:
            raise RuntimeError(f"unit {self.name} returned undeclared outputs {sorted(extra)}")
        return out


@dataclass(frozen=True)
class StepUnit:
    fn: Callable[..., None]            # (models, call: DiTCall, step: int, **inputs) -> None
    after: tuple[str, ...] = ()        # step units (by name) that must edit the DiTCall first when present

    @property
    def name(self) -> str:
        return self.fn.__name__

    @cached_property  # read at every DiT evaluation
    def params(self) -> list[str]:
        return _params(self.fn, 3)


def unit(per_branch: bool = False, both_branches: bool = False, models: tuple[str, ...] = (),
         uses: tuple[str, ...] = (), outputs: tuple[str, ...] = (), model_inputs: tuple[str, ...] = (),
         batched: tuple[str, ...] = (), cacheable: tuple[str, ...] = (), replaces: tuple[str, ...] = (),
         active: Callable | None = None, image_inputs: tuple[str, ...] = (), needs: tuple[str, ...] = (),
         after: tuple[str, ...] = (), stack: tuple[str, ...] = ()) -> Callable[[Callable], Unit]:
    def wrap(fn: Callable) -> Unit:
        undeclared = set(model_inputs) | set(batched) | set(cacheable) | set(stack)
        if not undeclared <= set(outputs):
            raise ValueError(f"unit {fn.__name__}: {sorted(undeclared - set(outputs))} are not among its outputs")
        u = Unit(fn, per_branch=per_branch, both_branches=both_branches, models=models, uses=uses,
                 outputs=outputs, model_inputs=model_inputs, batched=batched, cacheable=cacheable,
                 replaces=replaces, active=active, image_inputs=image_inputs, needs=needs, after=after, stack=stack)
        if not set(image_inputs) <= set(u.params):
            raise ValueError(f"unit {fn.__name__}: image inputs {sorted(set(image_inputs) - set(u.params))} "
                             "are not among its parameters")
        return u
    return wrap


def step_unit(after: tuple[str, ...] = ()) -> Callable[[Callable], StepUnit]:
    return lambda fn: StepUnit(fn, after)


def image_inputs(units) -> tuple[str, ...]:
    """The image inputs the units declare, in unit order."""
    return tuple(dict.fromkeys(p for u in units if isinstance(u, Unit) for p in u.image_inputs))


def _reads(u: Unit) -> set[str]:
    return set(u.params) | set(u.needs)


def order_units(units: list) -> list:
    """`units` (Unit and StepUnit) in an order that satisfies what they declare (see the module docstring);
    otherwise in the given order. Raises on a cycle, naming the units in it."""
    units = list(units)
    by_name = {u.name: i for i, u in enumerate(units)}
    before: dict[int, set[int]] = {i: {by_name[n] for n in u.after if n in by_name} for i, u in enumerate(units)}
    pre = [(i, u) for i, u in enumerate(units) if isinstance(u, Unit)]
    for i, u in pre:
        for value in _reads(u):
            writers = [(j, w) for j, w in pre if j != i and value in w.outputs]
            if value in u.outputs:  # u rewrites the value: after the units that only write it
                writers = [(j, w) for j, w in writers if value not in _reads(w)]
            before[i] |= {j for j, _ in writers}
    order, done = [], set()
    while len(order) < len(units):
        ready = [i for i in range(len(units)) if i not in done and before[i] <= done]
        if not ready:
            stuck = sorted(units[i].name for i in range(len(units)) if i not in done)
            raise ValueError(f"the units' declared order has a cycle among {stuck}")
        order.append(ready[0])
        done.add(ready[0])
    return [units[i] for i in order]


def active_units(pipe, units: list) -> list[Unit]:
    """The preprocessing units that run for `pipe`: inactive ones and replaced ones dropped."""
    units = [u for u in units if isinstance(u, Unit) and (u.active is None or u.active(pipe))]
    replaced = {r for u in units if u.active is not None for r in u.replaces}
    return [u for u in units if u.name not in replaced]


def run_units(pipe, units: list[Unit], shared: dict, posi: dict, nega: dict, cfg: bool) -> None:
    """Run `units` in order, updating the three dicts in place."""
    for u in units:
        pipe.load_models_to_device(u.models)
        branches = [posi, nega] if cfg else [posi]
        if u.both_branches:
            outs = u.fn(pipe, [{**shared, **b} for b in branches], **u.inputs(shared))
            if len(outs) != len(branches):
                raise RuntimeError(f"unit {u.name} returned {len(outs)} branch results for {len(branches)} branches")
            for b, out in zip(branches, outs):
                b.update(u._checked(out))
        elif u.per_branch:
            for b in branches:
                b.update(u._checked(u.fn(pipe, **u.inputs({**shared, **b}))))
        else:
            shared.update(u._checked(u.fn(pipe, **u.inputs(shared))))
