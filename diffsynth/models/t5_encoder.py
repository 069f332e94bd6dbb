"""T5 encoder stack (T5-v1.1-XXL, as FLUX.1 uses it): token ids -> final-RMS-norm hidden states.

Parameter names are those of transformers' `T5EncoderModel` (`shared`, `encoder.block.N.layer.{0,1}.*`,
`encoder.final_layer_norm`), so its files map onto this module unchanged. Written here rather than taken from
transformers because importing transformers' model code costs about 2 s of every fresh process.

    ids (B, L) -> embed -> N x [x + attn(rms(x)) with relative position bias, x + ff(rms(x))] -> rms -> (B, L, D)

Block 0 owns the bucketed relative-position bias table; every block adds the same bias. No attention scaling
(T5 folds it into its initialisation), no padding mask (as BFL's and diffusers' FLUX pipelines call it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear
from .clip_text import ACTIVATIONS, zero_embedding


@dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 config: feed_forward_proj {self.feed_forward_proj!r} is not supported; expected "
                             f"'<act>' or 'gated-<act>' with <act> one of {sorted(ACTIVATIONS)}")

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # T5 v1.1's tanh GELU

    @classmethod
    def from_dict(cls, config: Mapping) -> "T5EncoderConfig":
        """From a T5 config.json; decoder and training keys are ignored."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """(L, L) bucket of key position minus query position, bidirectional: half the buckets per sign, the
    first half of those exact, the rest logarithmic up to `max_distance`."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    sign = (rel > 0).long() * half
    rel = rel.abs()
    log = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return sign + torch.where(rel < exact, rel, log.clamp(max=half - 1))


class T5RMSNorm(nn.Module):
    """Scale-only RMS norm, statistics in fp32; the result is cast to a 16-bit weight's dtype first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, c: T5EncoderConfig, has_bias_table: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.heads, self.c = c.num_heads, c
        self.q, self.k, self.v = (Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, c.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = zero_embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, heads, L, L) additive bias (block 0 only)."""
        buckets = relative_position_buckets(length, self.c.relative_attention_num_buckets,
                                            self.c.relative_attention_max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, H, L, d_kv)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, c: T5EncoderConfig, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_bias_table)
        self.layer_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForward(nn.Module):
    """`wo(act(wi_0 x) * wi_1 x)` (gated) or `wo(act(wi x))`."""

    def __init__(self, c: T5EncoderConfig):
        super().__init__()
        names = ("wi_0", "wi_1") if c.is_gated_act else ("wi",)
        for name in names:
            setattr(self, name, Linear(c.d_model, c.d_ff, bias=False))
        self.wo = Linear(c.d_ff, c.d_model, bias=False)
        self.act, self.gated = ACTIVATIONS[c.dense_act_fn], c.is_gated_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, c: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5FeedForward(c)
        self.layer_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """In fp16, T5-XXL's activations overflow: keep them finite (transformers does the same)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, c: T5EncoderConfig, has_bias_table: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(c, has_bias_table), T5FeedForwardLayer(c)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, c: T5EncoderConfig, shared: nn.Embedding):
        super().__init__()
        self.embed_tokens = shared  # tied to T5EncoderModel.shared
        self.block = nn.ModuleList(T5Block(c, has_bias_table=i == 0) for i in range(c.num_layers))
        self.final_layer_norm = T5RMSNorm(c.d_model, c.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = zero_embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, d_model)."""
        x = self.shared(input_ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], x.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
