"""LoRA-Encoder (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev): a LoRA file -> one prompt token that evokes it.

For every DiT layer the encoder knows (19 x 10 double-block + 38 x 3 single-block linears in FLUX.1), a
learned query of L tokens x in_features goes through the layer's low-rank update (x A^T B^T, the LoRA's
alpha/rank folded in), then LayerNorm(out_features) and a Linear per layer kind to the token width. A
learned special token is prepended to all of them, one CLIP-style encoder layer (pre-LN, quick-GELU) mixes
them, and the special token (LayerNorm, Linear) is the result (B=1, 1, width).

Checkpoint names (kept as ours): `embedder.model_dict.<layer with . as ___>.{x, layer_norm.*}`,
`embedder.proj_dict.<kind>.*`, `encoders.N.{attn.to_q|to_k|to_v|to_out, layer_norm1, layer_norm2, fc1, fc2}.*`,
`special_embeds`, `final_layer_norm.*`, `final_linear.*`. Layers a LoRA does not touch get a zero update.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.attention import attention
from ..ops.files import CheckpointError
from ..ops.linear import Linear
from .clip_text import quick_gelu
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_key, has_prefix, plain_tensors, shapes

# Internal layer-name suffixes the encoder may know, longest first (a name's kind is its matching suffix).
LAYER_KINDS = ("attn.a_to_qkv", "attn.a_to_out", "attn.b_to_qkv", "attn.b_to_out", "norm1_a.linear",
               "norm1_b.linear", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "to_qkv_mlp", "proj_out", "norm.linear")


def layer_kind(name: str) -> str:
    for kind in LAYER_KINDS:
        if name.endswith("." + kind):
            return kind
    raise CheckpointError(f"LoRA-Encoder layer {name!r} is not a known DiT layer")


@dataclass
class LoRAEncoderConfig:
    layers: tuple[tuple[str, int, int], ...]   # (internal layer name, in_features, out_features), in order
    queries: int = 16                          # query tokens per layer
    width: int = 4096
    ff: int = 8192
    heads: int = 32
    num_layers: int = 1
    special: int = 1


class LayerQuery(nn.Module):
    def __init__(self, queries: int, dim_in: int, dim_out: int):
        super().__init__()
        self.x = nn.Parameter(torch.empty(1, queries, dim_in))
        self.layer_norm = nn.LayerNorm(dim_out)

    def forward(self, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.x @ down.T @ up.T)  # (1, L, out)


class LoRAEmbedder(nn.Module):
    def __init__(self, c: LoRAEncoderConfig):
        super().__init__()
        self.model_dict = nn.ModuleDict({n.replace(".", "___"): LayerQuery(c.queries, i, o) for n, i, o in c.layers})
        outs = {layer_kind(n): o for n, _, o in c.layers}
        self.proj_dict = nn.ModuleDict({k.replace(".", "___"): Linear(o, c.width) for k, o in outs.items()})


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer with quick-GELU (CLIP's)."""

    def __init__(self, width: int, ff: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        for name in ("to_q", "to_k", "to_v", "to_out"):
            setattr(self.attn, name, Linear(width, width))
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.fc1, self.fc2 = Linear(width, ff), Linear(ff, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm1(x)
        q, k, v = (getattr(self.attn, n)(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for n in ("to_q", "to_k", "to_v"))
        x = x + self.attn.to_out(attention(q, k, v).transpose(1, 2).flatten(2))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(quick_gelu(h))


class FluxLoRAEncoder(nn.Module):
    def __init__(self, config: LoRAEncoderConfig):
        super().__init__()
        self.config = config
        self.embedder = LoRAEmbedder(config)
        self.encoders = nn.ModuleList(EncoderLayer(config.width, config.ff, config.heads)
                                      for _ in range(config.num_layers))
        self.special_embeds = nn.Parameter(torch.empty(1, config.special, config.width))
        self.final_layer_norm = nn.LayerNorm(config.width)
        self.final_linear = Linear(config.width, config.width)

    def forward(self, lora) -> torch.Tensor:
        """A `CanonicalLoRA` -> (1, special, width)."""
        dtype = self.special_embeds.dtype
        tokens = [self.special_embeds]
        for name, dim_in, dim_out in self.config.layers:
            w = lora.layers.get(name)
            if w is None:  # an untouched layer: zero update
                down, up = self.special_embeds.new_zeros(1, dim_in), self.special_embeds.new_zeros(dim_out, 1)
            else:
                if tuple(w.down.shape[1:]) + tuple(w.up.shape[:1]) != (dim_in, dim_out):
                    raise ValueError(f"LoRA layer {name} maps {w.down.shape[1]} -> {w.up.shape[0]} features, the "
                                     f"LoRA-Encoder expects {dim_in} -> {dim_out}: a LoRA for another model")
                down, up = (w.down.to(dtype) * w.scale).to(self.special_embeds.device), w.up.to(self.special_embeds)
            out = self.embedder.model_dict[name.replace(".", "___")](down, up)
            tokens.append(self.embedder.proj_dict[layer_kind(name).replace(".", "___")](out))
        x = torch.cat(tokens, 1)
        for layer in self.encoders:
            x = layer(x)
        return self.final_linear(self.final_layer_norm(x[:, :self.config.special]))


def infer_lora_encoder_config(shapes: dict[str, tuple[int, ...]]) -> LoRAEncoderConfig:
    layers, queries = [], set()
    for key, s in shapes.items():
        if key.startswith("embedder.model_dict.") and key.endswith(".x"):
            name = key[len("embedder.model_dict."):-len(".x")]
            out = shapes.get(f"embedder.model_dict.{name}.layer_norm.weight")
            if out is None:
                raise CheckpointError(f"LoRA-Encoder: {key} has no layer_norm")
            layers.append((name.replace("___", "."), s[2], out[0]))
            queries.add(s[1])
    if not layers:
        raise CheckpointError("LoRA-Encoder: no embedder.model_dict.*.x queries")
    order = {"blocks": 0, "single_blocks": 1}
    layers.sort(key=lambda entry: (order.get(entry[0].split(".")[0], 2), int(entry[0].split(".")[1]),
                                   LAYER_KINDS.index(layer_kind(entry[0]))))
    width = shapes["special_embeds"][2]
    n = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("encoders."))
    if len(queries) != 1:
        raise CheckpointError(f"LoRA-Encoder: layers disagree on the number of query tokens {sorted(queries)}")
    return LoRAEncoderConfig(tuple(layers), queries=queries.pop(), width=width,
        ff=shapes["encoders.0.fc1.weight"][0], heads=max(1, width // 128), num_layers=n,
        special=shapes["special_embeds"][1])


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if has_key(keys, "special_embeds") and has_prefix(keys, "embedder.model_dict.") else None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    config = infer_lora_encoder_config(shapes(det.refs))
    return {"lora_encoder": assign(FluxLoRAEncoder, config, plain_tensors(det, options),
                                   f"LoRA-Encoder from {det.source}")}


COMPONENTS = (Component("lora_encoder", "prompt_tokens"),)
FAMILIES = (Family("flux-lora-encoder", "FLUX LoRA-Encoder", detect, fills("lora_encoder"), build),)
