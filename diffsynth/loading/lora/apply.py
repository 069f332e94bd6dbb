"""Applying a canonical LoRA: merge into weights, or hot-load as forward hooks that clear bit-exactly."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.limits import MAX_STRENGTH
from ...ops.quant import add_to_weight, quant_type
from ..vram import compute_spec
from .formats import CanonicalLoRA, LoRAReport, LoRAWeights, as_canonical, key_listing, naming_for


# ----------------------------------------------------------------------------- application

_HOOK = "_diffsynth_lora_hook"
_ADAPTERS = "_diffsynth_lora_adapters"
_SAVED_WEIGHT = "_diffsynth_lora_saved_weight"
_SAVED_INPUT = "_diffsynth_lora_saved_input"
_MERGER = "_diffsynth_lora_merger"  # a learned blend of the hot-loaded LoRAs' outputs (LoRA-Fusion)
_MERGEABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _HotLoRA:
    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    weight: float  # strength * alpha / rank

    def to_(self, device: torch.device) -> None:
        self.down, self.up = self.down.to(device), self.up.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)


@dataclass
class LoRAPlan:
    layers: list[tuple[str, nn.Module, LoRAWeights]] = field(default_factory=list)
    norms: list[tuple[str, nn.Module, torch.Tensor]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _find_module(named: dict[str, nn.Module], name: str) -> str | None:
    """`name` in `module.named_modules()`; also inside a wrapper (unique suffix) and CLIP without ``text_model.``."""
    candidates = [name] + ([name[len("text_model."):]] if name.startswith("text_model.") else [])
    for c in candidates:
        if c in named:
            return c
    for c in candidates:
        hits = [n for n in named if n.endswith("." + c)]
        if len(hits) == 1:
            return hits[0]
    return None


def _weight_shape(sub: nn.Module) -> tuple[int, ...]:
    """Logical weight shape; a GGUF layer keeps raw blocks in `.weight` and its real shape beside it."""
    w = getattr(sub, "weight", None)
    return getattr(sub, "weight_shape", None) or (tuple(w.shape) if isinstance(w, torch.Tensor) else ())


def plan_lora(module: nn.Module, lora: CanonicalLoRA, merge: bool,
              layers: dict[str, LoRAWeights] | None = None) -> LoRAPlan:
    """Match every layer/norm of `lora` to `module` without changing anything."""
    plan = LoRAPlan()
    named = dict(module.named_modules())
    for name, lw in (lora.layers if layers is None else layers).items():
        src = ", ".join(lw.source) or name
        found = _find_module(named, name)
        if found is None:
            plan.unmatched.append(f"{src} -> {name}: no such layer in {type(module).__name__}")
            continue
        sub = named[found]
        w = getattr(sub, "weight", None)
        shape = _weight_shape(sub)
        if len(shape) != 2:
            plan.unmatched.append(f"{src} -> {found}: not a linear layer")
            continue
        out_f, in_f = shape
        # Control LoRAs widen x_embedder (extra input channels); a plain LoRA on a widened x_embedder
        # leaves the extra channels alone (zero down columns).
        widen = lw.down.shape[1] > in_f and name == "x_embedder"
        if lw.down.shape[1] < in_f and name == "x_embedder" and lw.up.shape[0] == out_f:
            pad = lw.down.new_zeros(lw.rank, in_f - lw.down.shape[1])
            lw = LoRAWeights(torch.cat([lw.down, pad], 1), lw.up, lw.alpha, lw.bias_up, lw.source)
        if lw.up.shape[0] != out_f or (lw.down.shape[1] != in_f and not widen):
            plan.unmatched.append(f"{src} -> {found}: LoRA shape ({lw.up.shape[0]}, {lw.down.shape[1]}) "
                                  f"!= layer ({out_f}, {in_f})")
            continue
        if lw.bias_up is not None and getattr(sub, "bias", None) is None:
            plan.unmatched.append(f"{src} -> {found}: LoRA has a bias but the layer has none")
            continue
        if merge and (w.device.type == "meta" or quant_type(sub) is not None):
            plan.unmatched.append(f"{src} -> {found}: cannot merge into a {quant_type(sub) or w.dtype} weight "
                                  f"on {w.device} (GGUF-quantized or meta); use hotload=True")
            continue
        plan.layers.append((found, sub, lw))
    if layers is None:
        for pname, value in lora.norm_weights.items():
            mod_name, _, attr = pname.rpartition(".")
            found = _find_module(named, mod_name)
            p = getattr(named[found], attr, None) if found is not None else None
            if not isinstance(p, torch.Tensor) or p.shape != value.shape:
                plan.unmatched.append(
                    f"{pname}: no norm weight of shape {tuple(value.shape)} in {type(module).__name__}")
                continue
            plan.norms.append((f"{found}.{attr}", named[found], value))
    return plan


def widen_linear_input(module: nn.Module, new_in: int) -> nn.Parameter:
    """Give a linear layer `new_in` input features; the new input columns are zero. Returns the old weight."""
    old = module.weight
    if new_in < old.shape[1]:
        raise ValueError(f"cannot narrow a linear layer from {old.shape[1]} to {new_in} inputs")
    w = torch.zeros(old.shape[0], new_in, dtype=old.dtype, device=old.device)
    with torch.no_grad():
        w[:, : old.shape[1]] = old
    module.weight = nn.Parameter(w, requires_grad=old.requires_grad)
    if hasattr(module, "in_features"):
        module.in_features = new_in
    return old


@torch.no_grad()
def _merge(sub: nn.Module, lw: LoRAWeights, strength: float) -> None:
    w = sub.weight
    s = strength * lw.scale
    add_to_weight(sub, s * (lw.up.to(w.device, torch.float32) @ lw.down.to(w.device, torch.float32)))
    if lw.bias_up is not None:
        b = sub.bias
        b.copy_((b.float() + s * lw.bias_up.to(b.device, torch.float32)).to(b.dtype))


def _lora_hook(sub: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    outs = []
    for a in getattr(sub, _ADAPTERS):
        if a.down.device != x.device:
            a.to_(x.device)
        h = F.linear(x.to(a.down.dtype), a.down)
        outs.append((a.weight * F.linear(h, a.up, a.bias)).to(output.dtype))
    merger = getattr(sub, _MERGER, None)
    if merger is not None and outs:
        return merger(output, torch.stack(outs)).to(output.dtype)
    return sum(outs, output)


def set_lora_mergers(module: nn.Module, mergers: dict) -> list[str]:
    """Blend the hot-loaded LoRAs of `module`'s layers {name: merger(base, stacked outputs)} instead of
    summing them; returns the layer names that got one (those not found are left out)."""
    named = dict(module.named_modules())
    done = []
    for name, merger in mergers.items():
        if name in named:
            object.__setattr__(named[name], _MERGER, merger)  # not a submodule: its weights live elsewhere
            done.append(name)
    return done


def _attach(sub: nn.Module, lw: LoRAWeights, strength: float) -> None:
    device, dtype = compute_spec(sub)  # a cast layer computes in another dtype/device than it stores
    dtype = dtype if dtype in _MERGEABLE else torch.bfloat16
    device = device if device.type != "meta" else lw.down.device
    adapter = _HotLoRA(lw.down.to(device, dtype), lw.up.to(device, dtype),
                       None if lw.bias_up is None else lw.bias_up.to(device, dtype), strength * lw.scale)
    if getattr(sub, _HOOK, None) is None:
        setattr(sub, _ADAPTERS, [])
        setattr(sub, _HOOK, sub.register_forward_hook(_lora_hook, with_kwargs=True))
    getattr(sub, _ADAPTERS).append(adapter)


def _execute(plan: LoRAPlan, strength: float, hotload: bool, report: LoRAReport, prefix: str = "") -> None:
    for name, sub, lw in plan.layers:
        if lw.down.shape[1] > _weight_shape(sub)[1]:
            old = widen_linear_input(sub, lw.down.shape[1])
            if hotload and getattr(sub, _SAVED_INPUT, None) is None:
                setattr(sub, _SAVED_INPUT, (old, old.shape[1]))
            report.widened.append(prefix + name)
        (_attach if hotload else _merge)(sub, lw, strength)
        report.applied.append(prefix + name)
    for pname, sub, value in plan.norms:
        attr = pname.rpartition(".")[2]
        p = getattr(sub, attr)
        with torch.no_grad():
            if hotload:
                saved = getattr(sub, _SAVED_WEIGHT, None) or {}
                saved.setdefault(attr, p.detach().clone())
                setattr(sub, _SAVED_WEIGHT, saved)
            p.copy_(value.to(p.device, p.dtype))
        report.norms.append(prefix + pname)


class UnmatchedLoRAError(ValueError):
    """LoRA entries that match no layer (`problems`, one line each); nothing was applied."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(_unmatched(problems) + "\n(pass strict=False to apply the rest)")


def _unmatched(problems: list[str]) -> str:
    return f"{len(problems)} LoRA entries match no layer of the model:" + key_listing(problems)


def _check(problems: list[str], strict: bool, report: LoRAReport) -> None:
    if not problems:
        return
    if strict:
        raise UnmatchedLoRAError(problems)
    warnings.warn(_unmatched(problems) + "\n(strict=False: applying the rest)", stacklevel=3)
    report.skipped.extend(problems)


def mlp_ratio_of(module: nn.Module) -> float:
    return float(getattr(getattr(module, "config", None), "mlp_ratio", 4.0))


def check_strength(alpha, name: str = "LoRA alpha (strength)") -> None:
    """A finite LoRA strength within +-MAX_STRENGTH (1e30 merged into weights made the output non-finite)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{name} must be a finite number, got {alpha!r}")
    if abs(alpha) > MAX_STRENGTH:
        raise ValueError(f"{name} must be in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {alpha!r}")


def apply_lora(module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False,
               strict: bool = True) -> LoRAReport:
    """Apply the DiT part of `lora` (canonical, state dict or path) to `module` at strength `alpha`.

    Merge (default): ``W += alpha * scale * up @ down`` in fp32, written back in the weight's dtype.
    `hotload=True`: base weights stay untouched; a forward hook adds ``alpha * scale * up(down(x))``,
    several LoRAs stack, and `clear_lora` restores the module bit for bit. Norm replacements and a
    widened ``x_embedder`` (BFL Control-LoRA) are applied in both modes. Anything that matches no layer
    raises ValueError listing it before the model is touched (`strict=False`: warn and apply the rest).
    Text-encoder layers are not applied here: use `load_lora_into_pipeline` or
    ``apply_lora(text_encoder, lora.text_encoder_part())``.
    """
    check_strength(alpha)
    lora = as_canonical(lora, mlp_ratio_of(module), naming_for(module))
    report = LoRAReport("hotload" if hotload else "merge")
    plan = plan_lora(module, lora, merge=not hotload)
    _check([f"{k}: {v}" for k, v in lora.unknown.items()] + plan.unmatched, strict, report)
    if lora.te_layers:
        warnings.warn(f"{len(lora.te_layers)} text-encoder LoRA layers not applied by apply_lora "
                      "(use load_lora_into_pipeline)", stacklevel=2)
    _execute(plan, alpha, hotload, report)
    return report


def load_lora_into_pipeline(pipe, module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False,
                            strict: bool = True) -> LoRAReport:
    """`FluxImagePipeline.load_lora`: DiT layers go to `module`, CLIP layers to ``pipe.text_encoder_1``.

    `lora` is a file path (safetensors / torch file), a `ModelConfig`, a state dict or a `CanonicalLoRA`. Everything is
    matched first; with `strict`, any unmatched entry raises ValueError and nothing is applied.
    """
    check_strength(alpha)
    lora = as_canonical(lora, mlp_ratio_of(module), naming_for(module))
    report = LoRAReport("hotload" if hotload else "merge")
    dit_plan = plan_lora(module, lora, merge=not hotload)
    problems = [f"{k}: {v}" for k, v in lora.unknown.items()] + dit_plan.unmatched
    te_plan = None
    if lora.te_layers:
        te = getattr(pipe, "text_encoder_1", None)
        if te is None:
            problems += [f"{', '.join(lw.source) or n} -> {n}: the pipeline has no text_encoder_1 (CLIP) loaded"
                         for n, lw in lora.te_layers.items()]
        else:
            te_plan = plan_lora(te, lora, merge=not hotload, layers=lora.te_layers)
            problems += te_plan.unmatched
    _check(problems, strict, report)
    _execute(dit_plan, alpha, hotload, report)
    if te_plan is not None:
        _execute(te_plan, alpha, hotload, report, prefix="text_encoder_1.")
    return report


def clear_lora(module: nn.Module) -> None:
    """Remove every hot-loaded LoRA from `module` and undo its norm replacements and input widening.

    Merged LoRAs are part of the weights and stay.
    """
    for sub in module.modules():
        handle = getattr(sub, _HOOK, None)
        if handle is not None:
            handle.remove()
            delattr(sub, _HOOK)
            delattr(sub, _ADAPTERS)
        saved = getattr(sub, _SAVED_WEIGHT, None)
        if saved is not None:
            with torch.no_grad():
                for attr, value in saved.items():
                    getattr(sub, attr).copy_(value)
            delattr(sub, _SAVED_WEIGHT)
        saved_input = getattr(sub, _SAVED_INPUT, None)
        if saved_input is not None:
            sub.weight, in_features = saved_input
            if hasattr(sub, "in_features"):
                sub.in_features = in_features
            delattr(sub, _SAVED_INPUT)
