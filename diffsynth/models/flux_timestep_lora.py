"""Timestep LoRA (DiffSynth-Studio 2.0's FLUX.1-dev-Timestep-LoRA, e.g. DiffSynth-Studio/MultiAlign-FLUX.1-dev).

A LoRA whose rank-r features are modulated by the denoising timestep. For a target linear layer y = W x:

    y += alpha * B((A x) * gamma(e) + beta(e)),    e = sinusoidal embedding (256, cos half first) of sigma * 1000

with gamma, beta: Linear(256 -> r) per layer. The file holds PEFT names on the diffusers DiT:
`base_model.model.<diffusers layer>.{lora_A, lora_B, lora_time_gamma, lora_time_beta}.*`; the q/k/v pieces
land on their slices of this project's fused projections (`attn.a_to_qkv`, `single_blocks.N.to_qkv_mlp`, ...).
The layers are hooked only while one DiT evaluation runs (`attach` ... `detach`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .flux_dit import DIFFUSERS_DOUBLE, DIFFUSERS_FUSED, DIFFUSERS_SINGLE, timestep_embedding
from .entry import BuildOptions, Component, Detected, Family, assign, fills, plain_tensors

PREFIX = "base_model.model."
PARTS = ("lora_A.weight", "lora_B.weight", "lora_time_gamma.weight", "lora_time_gamma.bias",
         "lora_time_beta.weight", "lora_time_beta.bias")
EMBEDDING_DIM = 256
DEFAULT_ALPHA = 2.0  # DiffSynth-Studio's load_timestep_lora default
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TimestepLoRAConfig:
    layers: tuple[tuple[str, int, int, int], ...]  # (diffusers layer name, in features, out features, rank)


def target(layer: str) -> tuple[str, int] | None:
    """(this project's linear layer, index of the piece among the fused ones) of a diffusers DiT layer name."""
    m = _BLOCK.match(layer)
    if m is None:
        return None
    kind, index, rest = m.groups()
    block = f"{'blocks' if kind == 'transformer_blocks' else 'single_blocks'}.{index}"
    for (fused_kind, ours), pieces in DIFFUSERS_FUSED.items():
        if fused_kind == kind and rest in pieces:
            return f"{block}.{ours}", pieces.index(rest)
    plain = DIFFUSERS_DOUBLE if kind == "transformer_blocks" else DIFFUSERS_SINGLE
    return (f"{block}.{plain[rest]}", 0) if rest in plain else None


def layer_names(keys) -> list[str]:
    """The diffusers layer names of a timestep-LoRA file's keys, in file order."""
    return list(dict.fromkeys(k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in keys
                              if k.startswith(PREFIX) and ".lora_" in k))


def infer_timestep_lora_config(shapes: dict[str, tuple[int, ...]]) -> TimestepLoRAConfig:
    layers = []
    for name in layer_names(shapes):
        missing = [p for p in PARTS if f"{PREFIX}{name}.{p}" not in shapes]
        if missing:
            raise ValueError(f"timestep LoRA layer {name} lacks {missing}")
        rank, n_in = shapes[f"{PREFIX}{name}.lora_A.weight"]
        layers.append((name, n_in, shapes[f"{PREFIX}{name}.lora_B.weight"][0], rank))
    unknown = [n for n, *_ in layers if target(n) is None]
    if unknown:
        raise ValueError(f"timestep LoRA layers that are no FLUX DiT linear layer: {unknown[:5]}")
    return TimestepLoRAConfig(tuple(layers))


def module_key(layer: str) -> str:
    return layer.replace(".", "___")


def from_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File keys -> this module's state-dict keys."""
    out = {}
    for k, v in sd.items():
        layer, part = k[len(PREFIX):].rsplit(".lora_", 1)
        out[f"layers.{module_key(layer)}.lora_{part}"] = v
    return out


class TimestepLoRALayer(nn.Module):
    def __init__(self, n_in: int, n_out: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(n_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, n_out, bias=False)
        self.lora_time_gamma = nn.Linear(EMBEDDING_DIM, rank)
        self.lora_time_beta = nn.Linear(EMBEDDING_DIM, rank)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(x.to(self.lora_A.weight.dtype))
        e = embedding.to(h.dtype)
        per_row = (e.shape[0],) + (1,) * (h.dim() - 2) + (-1,)  # one timestep per batch row, all tokens
        h = h * self.lora_time_gamma(e).view(per_row) + self.lora_time_beta(e).view(per_row)
        return self.lora_B(h)


class FluxTimestepLoRA(nn.Module):
    def __init__(self, config: TimestepLoRAConfig):
        super().__init__()
        self.config = config
        self.alpha = DEFAULT_ALPHA
        self.layers = nn.ModuleDict({module_key(n): TimestepLoRALayer(i, o, r) for n, i, o, r in config.layers})
        # our linear layer -> [(module key, first output column)]
        self.targets: dict[str, list[tuple[str, int]]] = {}
        for name, _, n_out, _ in config.layers:
            layer, piece = target(name)
            self.targets.setdefault(layer, []).append((module_key(name), piece * n_out))
        self._handles: list = []
        self._embedding: torch.Tensor | None = None

    def check(self, dit: nn.Module) -> None:
        """Every target is a linear layer of `dit` wide enough for its pieces."""
        named = dict(dit.named_modules())
        for layer, pieces in self.targets.items():
            weight = getattr(named.get(layer), "weight", None)
            if weight is None:
                raise ValueError(f"the timestep LoRA targets {layer}, which this DiT lacks (a deeper DiT's LoRA?)")
            for key, start in pieces:
                lora = self.layers[key]
                if lora.lora_A.in_features != weight.shape[1] or start + lora.lora_B.out_features > weight.shape[0]:
                    raise ValueError(f"timestep LoRA layer {key.replace('___', '.')} does not fit {layer} "
                                     f"{tuple(weight.shape)}")

    def attach(self, dit: nn.Module, sigma: torch.Tensor) -> None:
        """Hook the target layers of `dit` for one evaluation at `sigma` (B,)."""
        self.detach()
        self._embedding = timestep_embedding(sigma * 1000)
        named = dict(dit.named_modules())
        for layer, pieces in self.targets.items():
            self._handles.append(named[layer].register_forward_hook(self._hook(pieces)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._embedding = [], None

    def _hook(self, pieces: list[tuple[str, int]]):
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            for key, start in pieces:
                delta = self.alpha * self.layers[key](args[0], self._embedding.to(args[0].device))
                output = output + F.pad(delta.to(output.dtype), (start, output.shape[-1] - start - delta.shape[-1]))
            return output
        return add


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """DiffSynth-Studio's timestep LoRA: PEFT names with per-layer timestep modulation (`lora_time_gamma`)."""
    return "peft" if any(k.startswith("base_model.model.") and ".lora_time_gamma." in k for k in refs.keys()) else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = plain_tensors(det, options)
    config = infer_timestep_lora_config({k: tuple(v.shape) for k, v in sd.items()})
    return {"timestep_lora": assign(FluxTimestepLoRA, config, from_file(sd), f"timestep LoRA from {det.source}")}


COMPONENTS = (Component("timestep_lora", "denoise", in_loop=True, trainable=False),)  # hooks DiT layers per evaluation
FAMILIES = (Family("flux-timestep-lora", "FLUX timestep LoRA", detect, fills("timestep_lora"), build, lora_named=True),)
