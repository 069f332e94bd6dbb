"""What a model file registers in the component table, and the helpers its detector and builder use.

Each model file ends with its table entry: `COMPONENTS` (the pipeline attributes it introduces) and
`FAMILIES` (the kinds of checkpoint file it reads: a detector from key patterns and shapes, a builder).
`loading.components` collects them; nothing else lists a model. Builders construct on the meta device
and adopt the tensors straight from disk in the storage dtype (no copy, no init work).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..ops.files import CheckpointError, TensorRef, load_all
from ..ops.gguf import dequantize
from ..ops.quant import (FP8_DTYPES, apply_scales, install_gguf_weight, install_weight_scale, split_scales,
                         stored_low_precision)

Refs = Mapping[str, TensorRef]


@dataclass(frozen=True)
class Component:
    """A pipeline attribute holding a model."""
    name: str
    vram_group: str             # models of one group run together and share the VRAM budget in turn
    in_loop: bool = False       # runs inside the denoising loop: handed to model_fn, on the device then
    trainable: bool = True      # may be named in --trainable_models / --lora_base_model
    many: bool = False          # holds several models (a list in load order), e.g. ControlNets
    activation: str = ""        # activation estimate kind for the VRAM planner ("dit", "vae", "text")
    aliases: tuple[str, ...] = ()
    label: str = ""             # how errors name it when it is missing, with the file that usually holds it

    def describe(self) -> str:
        return self.label or f"the {self.name} model"


@dataclass
class Detected:
    """One model recognised inside a checkpoint file (a file may hold several)."""
    family: str                 # a `Family.name`: flux-dit | flux-vae | clip | t5 | ...
    format: str                 # bfl | diffusers | diffsynth | hf | ...
    refs: dict[str, TensorRef]  # keys relative to the model (outer prefixes removed)
    source: str
    config: dict | None = None  # config.json when the model came with one
    components: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self.refs.values())

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(str(r.dtype).replace("torch.", "") for r in self.refs.values()))

    def quant_types(self) -> dict[str, int]:
        return dict(Counter(str(r.extra) for r in self.refs.values() if isinstance(r.extra, str)))


@dataclass(frozen=True)
class BuildOptions:
    """`dtype`/`device`: storage (None dtype = the file's own); `compute_dtype` (the pipeline's) keeps small
    tensors precise under fp8 storage."""
    dtype: torch.dtype | None = None
    device: str | torch.device = "cpu"
    compute_dtype: torch.dtype | None = None
    processor_dir: str | None = None  # a Qwen2.5-VL model's processor files, when not beside its weights


Builder = Callable[[Detected, BuildOptions], "dict[str, nn.Module]"]


@dataclass(frozen=True)
class Family:
    """A kind of checkpoint file. Families are tried in the order `loading.components` lists their model files:
    a family whose files also carry another family's keys (a ControlNet carries DiT blocks) comes first."""
    name: str
    description: str
    detect: Callable[[Refs], str | None]           # the layout ("bfl", "diffusers", ...) or None
    components: Callable[[Refs], tuple[str, ...]]  # the attributes a detected file fills
    build: Builder | None = None                   # None: recognised, not loadable yet
    # Prefix under which this family sits inside a multi-model (ComfyUI) file.
    bundle_prefixes: tuple[str, ...] = ()
    # Large weight matrices that tolerate reduced-precision storage (fp8): the CLI's --offload-dtype applies
    # to files holding only such families; the VAE and CLIP stay in the compute dtype.
    low_precision_storage: bool = False
    # Renames a detected file's keys into the one layout the builder reads (e.g. CLIP without `text_model.`).
    normalize: Callable[[Refs], Refs] | None = None
    # The pipeline family that loads it: "flux" (FluxImagePipeline) or "flux2" (Flux2ImagePipeline).
    pipeline: str = "flux"
    # Its key names say "lora" (LoRA-Fusion's patcher, the timestep LoRA): such a file is this model, not a LoRA.
    lora_named: bool = False
    # The architecture read from shapes alone (no weight read), and what `diffsynth inspect` says of it.
    config: Callable[[Detected], Any] | None = None
    describe: Callable[[Detected], dict] | None = None


# ----------------------------------------------------------------------------- detector helpers

def has_prefix(keys, *prefixes: str) -> bool:
    return any(k.startswith(p) for p in prefixes for k in keys)


def has_key(keys, *names: str) -> bool:
    return any(n in keys for n in names)


def fills(*names: str) -> Callable[[Refs], tuple[str, ...]]:
    return lambda refs: names


def shapes(refs: Refs) -> dict[str, tuple[int, ...]]:
    return {k: tuple(r.shape) for k, r in refs.items()}


def meta_tensors(det: Detected) -> dict[str, torch.Tensor]:
    """A detected model's weights as meta tensors (shapes only, nothing read): for converters and config
    inference that run before any weight is loaded."""
    return {k: torch.empty(r.shape, device="meta") for k, r in split_scales(det.refs)[0].items()}


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0; for meta tensors (config inference) the shape alone, built directly: torch's meta
    kernel for cat imports torch._dynamo on first use, ~2 s of every fresh process's load."""
    if tensors[0].is_meta:
        rows = sum(t.shape[0] for t in tensors)
        return torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device="meta")
    return torch.cat(tensors, 0)


# ----------------------------------------------------------------------------- builder helpers

def assign(model_cls, config, state_dict: dict[str, torch.Tensor], name: str,
           quantized: dict[str, str] | None = None, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Construct on the meta device and adopt the tensors as parameters (no copy, no init work).

    `quantized` {key: GGUF type}: those entries are raw GGUF blocks that stay quantized (Linear weights);
    `scales` {weight key: scale}: scaled-fp8 weights keep their scale beside them.
    """
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{name}: weights do not fit the inferred architecture; "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [f"{k}: {tuple(t.shape)} in the file, {expected[k]} expected" for k, t in state_dict.items()
             if k not in (quantized or {}) and tuple(t.shape) != expected[k]]
    if wrong:  # the architecture is read from a few tensors: the others must agree with it
        raise CheckpointError(f"{name}: {len(wrong)} tensor(s) disagree with the architecture the other tensors "
                              f"describe (a damaged or mixed file?): {wrong[:6]}")
    raw = {k: state_dict.pop(k) for k in (quantized or {})}
    for key, t in raw.items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(module, nn.Linear) and key.endswith(".weight"):
            install_gguf_weight(module, t, quantized[key], tuple(module.weight.shape))
        else:  # only Linear layers compute from blocks; anything else is dequantized once here
            dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
            state_dict[key] = dequantize(t, quantized[key], dtype).reshape(expected[key])
    model.load_state_dict(state_dict, assign=True, strict=False)
    for key, s in (scales or {}).items():
        install_weight_scale(model.get_submodule(key.rsplit(".", 1)[0]), s)
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise CheckpointError(f"{name}: tensors never loaded: {left[:8]}")
    return model.eval().requires_grad_(False)


def load_tensors(det: Detected, options: BuildOptions) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(weight refs, scaled-fp8 scale refs, tensors) of a detected model, read into the storage dtype.

    With fp8 storage, only matrices are stored in fp8 (`stored_low_precision`); biases, norm scales and
    convolution kernels (~0.1% of a transformer's bytes) use the compute dtype instead. Scaled-fp8 weights and
    GGUF blocks keep their file format.
    """
    dtype, compute = options.dtype, options.compute_dtype
    refs, scale_refs = split_scales(det.refs)
    small = compute if compute is not None and dtype in FP8_DTYPES else dtype
    sd = load_all({k: (r, None if k in scale_refs else (dtype if stored_low_precision(r.shape) else small))
                   for k, r in refs.items()}, options.device)
    return refs, scale_refs, sd


def plain_tensors(det: Detected, options: BuildOptions) -> dict[str, torch.Tensor]:
    """The tensors of a model that computes from plain weights (scaled-fp8 scales folded in)."""
    _, scale_refs, sd = load_tensors(det, options)
    apply_scales(sd, scale_refs, options.dtype, keep=lambda k, s: False)
    return sd


def hf_model(load: Callable, det: Detected, options: BuildOptions) -> nn.Module:
    """A transformers model through `load(state_dict, config_dict, dtype)`: the tensors are already in their
    storage dtype (small ones precise under fp8), which the model keeps."""
    sd = plain_tensors(det, options)
    return load(sd, det.config, None if options.dtype is not None else torch.float32).to(options.device)
