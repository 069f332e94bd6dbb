"""InfiniteYou's image projector (`image_proj_model.bin`): a Perceiver resampler turning one 512-d ArcFace
face embedding into 8 identity tokens (1, 8, 4096) that InfuseNet (a FLUX ControlNet) reads as its text.

Layout (the checkpoint's own key names under `image_proj.`):
* `latents` (1, queries, dim): the learned queries; `proj_in` (embedding 512 -> dim);
* `layers.i.0`: cross-attention of the queries over [embedding tokens, queries] (`norm1` on the embedding
  tokens, `norm2` on the queries, `to_q`, `to_kv` (k and v concatenated), `to_out`, no biases);
* `layers.i.1`: feed-forward LayerNorm -> Linear -> GELU -> Linear (indices 0, 1, 3; no biases);
* `proj_out` (dim -> 4096) and `norm_out` (LayerNorm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.files import CheckpointError
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_key, has_prefix, plain_tensors

HEAD_DIM = 64  # the shapes give heads x head_dim only; InfiniteYou's resampler uses 64-d heads


@dataclass
class ProjectorConfig:
    dim: int = 1280
    depth: int = 4
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = heads * HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (b, n, dim) embedding tokens, latents (b, q, dim) -> (b, q, dim)."""
        x, latents = self.norm1(x), self.norm2(latents)
        split = lambda t: t.unflatten(-1, (self.heads, HEAD_DIM)).transpose(1, 2)  # noqa: E731  (b, h, n, d)
        q = split(self.to_q(latents))
        k, v = map(split, self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1))
        # softmax in fp32 as the reference does (bf16 logits of 64-d heads lose digits)
        weight = torch.softmax((q @ k.transpose(-2, -1)).float() * HEAD_DIM ** -0.5, -1).to(v.dtype)
        return self.to_out((weight @ v).transpose(1, 2).flatten(2))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class InfiniteYouProjector(nn.Module):
    def __init__(self, config: ProjectorConfig | None = None):
        super().__init__()
        self.config = c = config or ProjectorConfig()
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim ** 0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.heads), feed_forward(c.dim, c.ff_mult)]) for _ in range(c.depth))
        self.source = ""  # the checkpoint path: the face models are looked up beside it

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """embedding (b, n, 512) ArcFace embedding(s) -> (b, num_queries, output_dim) identity tokens."""
        latents = self.latents.to(embedding.dtype).expand(embedding.shape[0], -1, -1)
        x = self.proj_in(embedding)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def projector_from_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """image_proj_model.bin holds {"image_proj": {...}}, read flat as `image_proj.*`; the inner keys are ours."""
    prefix = "image_proj."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if any(
        k.startswith(prefix) for k in sd) else dict(sd)


def infer_projector_config(shapes: dict[str, tuple[int, ...]]) -> ProjectorConfig:
    missing = [k for k in ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight",
                           "layers.0.1.1.weight") if k not in shapes]
    if missing:
        raise CheckpointError(f"not a complete InfiniteYou projector: missing {missing}")
    _, queries, dim = shapes["latents"]
    inner = shapes["layers.0.0.to_q.weight"][0]
    if inner % HEAD_DIM:
        raise CheckpointError(f"InfiniteYou projector: attention width {inner} is not a multiple of {HEAD_DIM}-d heads")
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
    return ProjectorConfig(dim=dim, depth=depth, heads=inner // HEAD_DIM, num_queries=queries,
                           embedding_dim=shapes["proj_in.weight"][1], output_dim=shapes["proj_out.weight"][0],
                           ff_mult=shapes["layers.0.1.1.weight"][0] // dim)


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """InfiniteYou's image_proj_model.bin: a Perceiver resampler under `image_proj.` (no IP-Adapter layers)."""
    keys = refs.keys()
    for prefix in ("image_proj.", ""):
        if has_key(keys, prefix + "latents") and has_key(keys, prefix + "proj_in.weight") and \
                has_prefix(keys, prefix + "layers.0.0.to_kv.") and not has_prefix(keys, "ip_adapter."):
            return "infiniteyou"
    return None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = projector_from_file(plain_tensors(det, options))
    config = infer_projector_config({k: tuple(v.shape) for k, v in sd.items()})
    model = assign(InfiniteYouProjector, config, sd, f"InfiniteYou projector from {det.source}")
    model.source = det.source
    return {"image_proj_model": model}


COMPONENTS = (Component("image_proj_model", "image_encoder"),)  # face embedding -> identity tokens
FAMILIES = (Family("infiniteyou-projector", "InfiniteYou image projector", detect, fills("image_proj_model"), build),)
