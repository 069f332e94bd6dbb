"""VRAM management: weights stored in one place and format, computed in another, layer by layer.

Storage vs compute. `ModelConfig(offload_device=..., offload_dtype=...)` decides where and in which
dtype a model's weights live (CPU RAM, fp8, GGUF blocks, ...). The pipeline's `device`/`torch_dtype` is
where computation happens. When the two differ, every parameter-owning layer ("unit") of the model is
switched in place to a *cast* variant of its class: its forward fetches the weights to the compute
device and dtype for that call only. The module objects, their names, their state-dict keys and any
forward hooks (hot-loaded LoRAs) stay as they were, and `.weight` stays the stored tensor (so merging a
LoRA into it still works, see `quant.add_to_weight`).

Residency. `enable_vram_management` plans, per group of models that run together, which units stay on
the compute device ("resident", kept in their storage dtype) while the group runs; the others are
streamed from the storage device at every call. `load_models_to_device(names)` moves the residents of
the named models onto the device and every other model's residents back to storage.

The planner (`plan_vram`) is a pure function of layer sizes and a budget, and `plan_model` runs on
meta-device models, so the plan for the full 12B FLUX.1-dev can be inspected without weights.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import components
from ..ops.gguf import BLOCK_SIZES, quantized_nbytes
from ..ops.linear import Linear, linear
from ..ops.quant import quant_type, stored_low_precision, to_compute, weight_for_compute

GB = 1024 ** 3


# ----------------------------------------------------------------------------- cast layers

class Cast:
    """Mixin of the cast layer classes. `compute_device`/`compute_dtype` None means "follow the input"."""
    compute_device: torch.device | None = None
    compute_dtype: torch.dtype | None = None
    resident: bool = False

    def _target(self, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        dtype = self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)
        return self.compute_device or x.device, dtype

    def _weight(self, device, dtype) -> torch.Tensor:
        return weight_for_compute(self, device, dtype)


class CastLinear(Cast, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._target(x)
        return linear(x.to(dtype), self._weight(device, dtype), to_compute(self.bias, device, dtype))


class CastConv2d(Cast, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._target(x)
        return self._conv_forward(x.to(dtype), self._weight(device, dtype), to_compute(self.bias, device, dtype))


class CastEmbedding(Cast, nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        device, dtype = self._target(ids)
        return F.embedding(ids.to(device), self._weight(device, dtype), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class CastLayerNorm(Cast, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._target(x)
        return F.layer_norm(x.to(dtype), self.normalized_shape, to_compute(self.weight, device, dtype),
                            to_compute(self.bias, device, dtype), self.eps)


class CastGroupNorm(Cast, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self._target(x)
        return F.group_norm(x.to(dtype), self.num_groups, to_compute(self.weight, device, dtype),
                            to_compute(self.bias, device, dtype), self.eps)


class CastModule(Cast):
    """Any other module: its parameters (whole subtree) are swapped for compute copies during forward."""

    def forward(self, *args, **kwargs):
        device, dtype = self.compute_device, self.compute_dtype
        swapped = []
        try:
            for module in self.modules():
                for name, p in list(module._parameters.items()):
                    if p is None:
                        continue
                    if name == "weight" and (quant_type(module) or getattr(module, "scale_weight", None) is not None):
                        t = weight_for_compute(module, device or p.device, dtype or torch.float32)
                    else:
                        t = to_compute(p, device or p.device, dtype or p.dtype)
                    if t is not p:
                        swapped.append((module, name, p))
                        module._parameters[name] = t
            return super().forward(*args, **kwargs)
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p


LEAF_CASTS: dict[type, type] = {nn.Linear: CastLinear, Linear: CastLinear, nn.Conv2d: CastConv2d,
                                nn.Embedding: CastEmbedding, nn.LayerNorm: CastLayerNorm, nn.GroupNorm: CastGroupNorm}
_GENERIC: dict[type, type] = {}


def _cast_class(cls: type) -> type:
    if issubclass(cls, Cast):
        return cls
    if cls in LEAF_CASTS:
        return LEAF_CASTS[cls]
    if cls not in _GENERIC:
        _GENERIC[cls] = type(f"Cast{cls.__name__}", (CastModule, cls), {"__module__": __name__})
    return _GENERIC[cls]


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parameter-owning layers VRAM management moves as one piece, in registration order."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module) -> None:
        direct = any(p is not None for p in m._parameters.values())
        if isinstance(m, Cast) or type(m) in LEAF_CASTS or direct:
            if any(True for _ in m.parameters()):
                found.append((prefix, m))
            return
        for name, child in m._modules.items():
            if child is not None:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def resolve_device(device: str | torch.device) -> torch.device:
    """"cuda" -> "cuda:<current>", so that device comparisons in the hot path are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def install_cast(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Switch every unit of `model` to its cast class (in place) computing on `device` in `dtype`.

    Buffers that are not weights (position ids, ...) move to `device` once; they are small.
    """
    device = resolve_device(device)
    for _, m in units(model):
        cast_layer(m, device, dtype)
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None and name != "scale_weight" and b.device != device:
                m._buffers[name] = b.to(device)
    model.compute_dtype = dtype
    model.compute_device = device
    return model


def cast_layer(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Switch one layer to its cast class computing on `device` in `dtype` (its weights stay where they are)."""
    module.__class__ = _cast_class(type(module))
    module.compute_device, module.compute_dtype = resolve_device(device), dtype
    return module


def is_cast(model: nn.Module) -> bool:
    return any(isinstance(m, Cast) for m in model.modules())


def compute_spec(module: nn.Module, x: torch.Tensor | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype `module` computes (for hooks, e.g. hot-loaded LoRA, that hold own tensors)."""
    if isinstance(module, Cast) and module.compute_device is not None:
        return module.compute_device, module.compute_dtype
    if x is not None:
        return x.device, x.dtype
    p = next(module.parameters())
    return p.device, p.dtype


def needs_cast(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> bool:
    """True when some weight is stored on another device, in another float dtype, or quantized."""
    device = torch.device(device)
    for m in model.modules():
        if quant_type(m) is not None or getattr(m, "scale_weight", None) is not None:
            return True
    for p in model.parameters():
        if not _same_device(p.device, device) or (p.is_floating_point() and p.dtype != dtype):
            return True
    return False


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = lambda d: torch.cuda.current_device() if d.index is None else d.index  # noqa: E731
    return index(a) == index(b)


@torch.no_grad()
def replace_unit_tensors(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each parameter's data and weight scale of a unit replaced by `fn(tensor)`, in place (the Parameter objects,
    their hooks and state-dict keys stay; `fn` returns its argument to leave a tensor as it is)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                p.data = fn(p.data)
        scale = m._buffers.get("scale_weight")
        if scale is not None:
            m._buffers["scale_weight"] = fn(scale)


def move_unit(module: nn.Module, device: torch.device) -> None:
    """Move a unit's parameters and weight scales to `device`, in place (hooks and identities kept)."""
    replace_unit_tensors(module, lambda t: t if t.device == device else t.to(device))


PIN_CHUNK_BYTES = 256 << 20
PIN_ALIGN = 512


class PinnedArena:
    """Page-locked host memory handed out in pieces. A copy to the GPU from page-locked memory is a DMA
    transfer, several times faster than from ordinary (pageable) memory, which CUDA first stages through a
    bounce buffer. torch's pinned allocator rounds every request up to a power of two (up to twice the RAM of
    the weights), so tensors are packed into 256 MiB chunks instead; a larger tensor gets its own block."""

    def __init__(self, alloc=None, chunk_bytes: int = PIN_CHUNK_BYTES):
        self.alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self.chunk_bytes, self.chunk, self.used = chunk_bytes, None, 0

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.chunk_bytes:
            return self.alloc(nbytes)
        start = -(-self.used // PIN_ALIGN) * PIN_ALIGN
        if self.chunk is None or start + nbytes > self.chunk_bytes:
            self.chunk, start = self.alloc(self.chunk_bytes), 0
        self.used = start + nbytes
        return self.chunk[start:start + nbytes]

    def copy_in(self, t: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of `t` (same dtype, shape and values, contiguous)."""
        out = self.take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        return out.copy_(t)


def pin_streamed(model: nn.Module, resident: Iterable[str], arena: PinnedArena) -> int:
    """Move the CPU-stored weights of `model`'s streamed units (all but `resident`) into `arena`, in place
    (parameters keep their identity: hooks, LoRA merges and state-dict keys see the same objects).
    Returns the bytes moved (weight scales included)."""
    keep, moved = set(resident), 0

    def pin(t: torch.Tensor) -> torch.Tensor:
        nonlocal moved
        if t.device.type != "cpu" or t.is_pinned():
            return t
        moved += t.numel() * t.element_size()
        return arena.copy_in(t)

    for unit_name, unit in units(model):
        if unit_name not in keep:
            replace_unit_tensors(unit, pin)
    return moved


def pin_streamed_models(pipe) -> int:
    """Page-lock what `pipe` streams from CPU RAM to its CUDA device at every call. Returns bytes pinned; if
    the system refuses to lock more memory, warns and streams the rest from pageable memory (slower)."""
    loaded, total, arena = pipe.loaded_models(), 0, PinnedArena()
    for name, mm in pipe.vram_models.items():
        if mm.storage_device.type != "cpu" or mm.compute_device.type != "cuda":
            continue
        try:
            total += pin_streamed(loaded[name], mm.resident, arena)
        except RuntimeError as e:  # cudaHostAlloc failed: no more lockable RAM
            warnings.warn(f"could not page-lock the weights {name} streams from CPU RAM ({e}); the rest stream "
                          "from pageable memory (slower). enable_vram_management(pin_memory=False) skips this.")
            break
    return total


# ----------------------------------------------------------------------------- planner

@dataclass
class Layer:
    name: str
    nbytes: int             # stored size (what streaming moves per call)
    compute_nbytes: int = 0  # size of the transient compute-dtype copy, 0 when no cast is needed
    numel: int = 0


@dataclass
class VramPlan:
    budget_bytes: int
    resident: list[str]
    streamed: list[str]
    resident_bytes: int
    streamed_bytes: int      # moved host -> device per forward
    peak_bytes: int          # residents + largest per-call transient + activations
    min_peak_bytes: int      # the peak with nothing resident (what vram_limit=0 gives)
    activation_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def summary(self) -> str:
        g = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
        n = len(self.resident) + len(self.streamed)
        return (f"budget {g(self.budget_bytes)}: {len(self.resident)}/{n} layers resident ({g(self.resident_bytes)}), "
                f"{len(self.streamed)} streamed ({g(self.streamed_bytes)} per forward), "
                f"expected peak {g(self.peak_bytes)}{'' if self.fits else ' (over budget: minimum possible)'}")


def _as_layer(x) -> Layer:
    if isinstance(x, Layer):
        return x
    name, nbytes, *rest = x
    return Layer(name, int(nbytes), int(rest[0]) if rest else 0, int(rest[1]) if len(rest) > 1 else 0)


def plan_vram(layers: Sequence[Layer | tuple], budget_bytes: int, activation_bytes: int = 0,
              max_resident_numel: int | None = None) -> VramPlan:
    """Choose resident layers so that residents + the largest transient + activations fit `budget_bytes`.

    A layer's transient is what exists only during its call: its streamed copy (when not resident) plus
    its compute-dtype copy (when its storage dtype differs). Layers are taken first-fit in execution
    order against a reserve for the worst transient, so the plan never exceeds the budget; when not even
    one layer fits, nothing is resident and the peak is the minimum possible (`fits` is then False).
    `max_resident_numel` (num_persistent_param_in_dit in enable_vram_management) instead keeps layers in
    order until that many parameters are resident, ignoring the budget.
    """
    layers = [_as_layer(x) for x in layers]
    transient = lambda layer, resident: layer.compute_nbytes + (0 if resident else layer.nbytes)  # noqa: E731
    resident: set[str] = set()
    if max_resident_numel is not None:
        total = 0
        for layer in layers:
            if total + layer.numel > max_resident_numel:
                break
            total += layer.numel
            resident.add(layer.name)
    elif layers:
        everything = sum(x.nbytes for x in layers) + max(transient(x, True) for x in layers) + activation_bytes
        if everything <= budget_bytes:
            resident = {x.name for x in layers}
        else:
            reserve = max(transient(x, False) for x in layers) + activation_bytes
            used = 0
            for layer in layers:
                if used + layer.nbytes + reserve <= budget_bytes:
                    used += layer.nbytes
                    resident.add(layer.name)
    res = [x for x in layers if x.name in resident]
    streamed = [x for x in layers if x.name not in resident]
    peak = sum(x.nbytes for x in res) + activation_bytes + max(
        [transient(x, x.name in resident) for x in layers], default=0)
    min_peak = activation_bytes + max([transient(x, False) for x in layers], default=0)
    return VramPlan(int(budget_bytes), [x.name for x in res], [x.name for x in streamed],
                    sum(x.nbytes for x in res), sum(x.nbytes for x in streamed), peak, min_peak, activation_bytes)


def _elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def model_layers(model: nn.Module, compute_dtype: torch.dtype, storage_dtype: torch.dtype | None = None,
                 gguf_type: str | None = None) -> list[Layer]:
    """The units of `model` as planner layers (works on meta-device models).

    `storage_dtype` / `gguf_type` describe a hypothetical storage of the matrices (ndim >= 2 weights)
    instead of the tensors' own; the small tensors (biases, norms) then count in compute dtype. With
    `gguf_type`, matrices whose rows are not whole blocks stay in compute dtype (as city96 files keep them).
    """
    hypothetical = storage_dtype is not None or gguf_type is not None
    out, seen = [], set()
    for name, unit in units(model):
        nbytes = compute = numel = 0
        for m in unit.modules():
            for pname, p in m._parameters.items():
                if p is None or id(p) in seen:  # tied weights (T5's shared embedding) count once
                    continue
                seen.add(id(p))
                if pname == "weight" and quant_type(m) is not None:  # already GGUF blocks
                    count, stored, cast = _numel(m.weight_shape), p.numel(), True
                elif hypothetical and p.ndim >= 2 and gguf_type is not None \
                        and p.shape[-1] % BLOCK_SIZES[gguf_type][0] == 0:
                    count, stored, cast = p.numel(), quantized_nbytes(gguf_type, tuple(p.shape)), True
                else:
                    dtype = p.dtype
                    if hypothetical:
                        low = storage_dtype is not None and stored_low_precision(p.shape)
                        dtype = storage_dtype if low else compute_dtype
                    count, stored = p.numel(), p.numel() * _elem_size(dtype)
                    cast = p.is_floating_point() and dtype != compute_dtype
                numel += count
                nbytes += stored
                compute += count * _elem_size(compute_dtype) if cast else 0
        out.append(Layer(name, nbytes, compute, numel))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_model(model: nn.Module, budget_bytes: int, compute_dtype: torch.dtype = torch.bfloat16,
               storage_dtype: torch.dtype | None = None, gguf_type: str | None = None,
               activation_bytes: int = 0, max_resident_numel: int | None = None) -> VramPlan:
    """`plan_vram` over a model's units (meta-device models work: only shapes and dtypes are read)."""
    return plan_vram(model_layers(model, compute_dtype, storage_dtype, gguf_type), budget_bytes,
                     activation_bytes, max_resident_numel)


# ----------------------------------------------------------------------------- activation estimates

def estimate_activation_bytes(name: str, model: nn.Module, height: int = 1024, width: int = 1024,
                              batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                              text_tokens: int = 512) -> int:
    """Rough peak activation memory of one forward (order of magnitude; the vram_buffer covers the rest).
    The estimate's kind comes from the component table (`Component.activation`)."""
    e = _elem_size(dtype)
    kind = components.component(name.split(".")[0]).activation
    if kind == "dit":
        c = model.config
        tokens = (height // 16) * (width // 16) + text_tokens
        return batch * tokens * ((8 * c.hidden_size + 3 * c.mlp_hidden) * e + 16 * c.hidden_size)
    if kind == "vae":
        return batch * height * width * 128 * e * 6
    if kind == "text":
        d = getattr(getattr(model, "config", None), "d_model", None) or getattr(
            getattr(model, "config", None), "hidden_size", 768)
        return batch * text_tokens * d * 24 * 4
    return 0


# ----------------------------------------------------------------------------- pipeline integration



@dataclass
class ManagedModel:
    storage_device: torch.device
    compute_device: torch.device
    compute_dtype: torch.dtype
    offloadable: bool                       # stored off the compute device (ModelConfig.offload_device)
    resident: list[str] = field(default_factory=list)
    onloaded: bool = False


def device_free_bytes(device: torch.device) -> int:
    """Free memory on `device` (CUDA: mem_get_info's free bytes; CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil
        return psutil.virtual_memory().available
    raise ValueError(f"cannot query free memory of {device}; pass vram_limit explicitly")


def register_model(pipe, name: str, model: nn.Module, storage_device, compute_device, compute_dtype) -> None:
    """Record a freshly loaded model; install cast layers when its storage differs from computation."""
    storage = resolve_device(storage_device if storage_device is not None else compute_device)
    compute = resolve_device(compute_device)
    offloadable = pipe.offload.get(name, (None, None))[0] is not None
    if needs_cast(model, compute, compute_dtype) or offloadable:
        install_cast(model, compute, compute_dtype)
        pipe.vram_models[name] = ManagedModel(storage, compute, compute_dtype, offloadable)


def groups(loaded: dict[str, nn.Module]) -> list[list[str]]:
    """Loaded model names grouped as the component table says (models of a group run together; each group
    gets the whole budget in turn). `controlnet.0` belongs to the `controlnet` component."""
    out = []
    for group in components.vram_groups():
        names = [n for n in loaded if n.split(".")[0] in group]
        if names:
            out.append(names)
    return out


def group_layers(pipe, names: Iterable[str], storage_dtype=None, gguf_type=None) -> list[Layer]:
    layers = []
    loaded = pipe.loaded_models()
    for name in names:
        model = loaded.get(name)
        if model is not None:
            layers += [Layer(f"{name}.{x.name}", x.nbytes, x.compute_nbytes, x.numel)
                       for x in model_layers(model, pipe.torch_dtype, storage_dtype, gguf_type)]
    return layers


def plan_pipeline(pipe, budget_bytes: int, num_persistent_param_in_dit: int | None = None,
                  height: int = 1024, width: int = 1024, batch: int = 1, only_offloadable: bool = True,
                  storage_dtype=None, gguf_type=None) -> dict[tuple[str, ...], VramPlan]:
    plans = {}
    loaded = pipe.loaded_models()
    for group in groups(loaded):
        names = [n for n in group
                 if not only_offloadable or (n in pipe.vram_models and pipe.vram_models[n].offloadable)]
        if not names:
            continue
        act = sum(estimate_activation_bytes(n, loaded[n], height, width, batch, pipe.torch_dtype) for n in names)
        persistent = num_persistent_param_in_dit if names == ["dit"] else None
        plans[tuple(names)] = plan_vram(group_layers(pipe, names, storage_dtype, gguf_type), budget_bytes, act,
                                        persistent)
    return plans


def offload_all(pipe) -> None:
    for name, mm in pipe.vram_models.items():
        _set_onloaded(pipe, name, mm, False)


def _set_onloaded(pipe, name: str, mm: ManagedModel, on: bool) -> None:
    if mm.onloaded == on or not mm.resident:
        mm.onloaded = on
        return
    model = pipe.loaded_models()[name]
    target = mm.compute_device if on else mm.storage_device
    wanted = set(mm.resident)
    for unit_name, unit in units(model):
        if unit_name in wanted:
            move_unit(unit, target)
    mm.onloaded = on


def check_gigabytes(name: str, value: float | None) -> None:
    """A memory size in GB: None or a finite number >= 0 (a negative limit would silently mean 0)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number of GB >= 0 (0 keeps nothing resident), got {value!r}")


def enable_vram_management(pipe, vram_limit: float | None = None, vram_buffer: float = 0.5,
                           num_persistent_param_in_dit: int | None = None,
                           pin_memory: bool = True) -> dict[tuple[str, ...], VramPlan]:
    """DiffSynth-Studio's semantics; returns the plans (also kept in `pipe.vram_plans`). `pin_memory`:
    page-lock the CPU-stored weights that stream to a CUDA device at every call (see PinnedArena)."""
    check_gigabytes("vram_limit", vram_limit)
    check_gigabytes("vram_buffer", vram_buffer)
    loaded = pipe.loaded_models()
    for name, model in loaded.items():
        if name not in pipe.vram_models:
            register_model(pipe, name, model, _param_device(model), pipe.device, pipe.torch_dtype)
    offload_all(pipe)
    for mm in pipe.vram_models.values():
        mm.resident = []
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    if vram_limit is None:
        available = device_free_bytes(pipe.device)
    else:
        permanent = sum(_bytes_on(m, pipe.device) for n, m in loaded.items()
                        if not (n in pipe.vram_models and pipe.vram_models[n].offloadable))
        available = int(vram_limit * GB) - permanent
    budget = max(0, available - int(vram_buffer * GB))
    plans = plan_pipeline(pipe, budget, num_persistent_param_in_dit)
    for group, plan in plans.items():
        for name in group:
            mm = pipe.vram_models[name]
            prefix = name + "."
            mm.resident = [r[len(prefix):] for r in plan.resident if r.startswith(prefix)]
            keep = set(mm.resident)
            for unit_name, unit in units(loaded[name]):
                unit.resident = unit_name in keep
    if pin_memory and pipe.device.type == "cuda":
        pin_streamed_models(pipe)
    pipe.vram_plans = plans
    pipe.vram_management_enabled = True
    return plans


def load_models_to_device(pipe, names: Sequence[str]) -> None:
    """Residents of `names` onto the compute device; every other managed model's residents to storage."""
    if not getattr(pipe, "vram_management_enabled", False):
        return
    names = {n for n in pipe.vram_models if n in names or n.split(".")[0] in names}
    for name, mm in pipe.vram_models.items():  # offload first so that onloading has room
        if name not in names:
            _set_onloaded(pipe, name, mm, False)
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    for name, mm in pipe.vram_models.items():
        if name in names:
            _set_onloaded(pipe, name, mm, True)


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _bytes_on(model: nn.Module, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if _same_device(p.device, device))
