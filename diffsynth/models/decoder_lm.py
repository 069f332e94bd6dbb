"""Decoder-only language model read as hidden states (Qwen3, Mistral): FLUX.2's prompt encoders.

Parameter names are those of transformers' `Qwen3Model` / `MistralModel` (a causal LM's `model.*` keys without
`model.`), so their files map onto this module unchanged. There is no final norm and no LM head: FLUX.2 reads the
states inside the stack (after layers 9/18/27 or 10/20/30), never the normed output. Written here rather than taken
from transformers because importing its model code costs about 1.5 s of every fresh process.

    ids (B, L) -> embed -> N x [x + attn(rms(x)), x + mlp(rms(x))]     the states after the layers asked for

Attention is causal with the padded keys masked, as transformers masks it for SDPA: query i sees the keys j <= i
whose attention_mask is 1, so (right padding) the padded positions get outputs too, and FLUX.2 reads them. RoPE in
the rotate-half layout at positions 0..L-1; grouped-query attention; Qwen3 adds an RMS norm per head on q and k.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear
from .clip_text import zero_embedding
from .flux_dit import RMSNorm  # fp32 statistics, cast back, then the weight: as transformers' Qwen3/Mistral norms

# FLUX.2 pads its prompts to this many tokens: a sliding window at least this wide never cuts one.
MIN_SLIDING_WINDOW = 512
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _get(config: Mapping, key: str, default):
    value = config.get(key)
    return default if value is None else value


def rope_theta_of(config: Mapping) -> float:
    """The RoPE base of a config.json: transformers 5's `rope_parameters`, or 4's `rope_scaling` + `rope_theta`
    (`rope_scaling`, when set, takes precedence, as transformers 5 reads old files). Only plain RoPE runs here:
    a scaled type (linear, dynamic, yarn, llama3, longrope, ...) is refused, naming it."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"decoder config: RoPE parameters {rope!r} are not supported (one flat dict expected)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"decoder config: RoPE type {kind!r} is not supported (only the default, unscaled RoPE)")
    return float(_get(rope, "rope_theta", _get(config, "rope_theta", 10_000.0)))


def sliding_window_of(config: Mapping, qwen: bool) -> int | None:
    """The attention window in effect, None for full attention. Qwen configs switch theirs on with
    `use_sliding_window` (transformers' default: off); Mistral's applies whenever set. One narrower than FLUX.2's
    prompts is refused: the window is not implemented here."""
    if not config.get("use_sliding_window", not qwen):
        return None
    window = config.get("sliding_window")
    if window is not None and window < MIN_SLIDING_WINDOW:
        raise ValueError(f"decoder config: sliding_window {window} is not supported (narrower than FLUX.2's "
                         f"{MIN_SLIDING_WINDOW}-token prompts; sliding-window attention is not implemented)")
    return window


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    qk_norm: bool = False           # Qwen3: RMS norm per head on q and k, before RoPE
    attention_bias: bool = False    # biases on q/k/v/o (Qwen2-style)
    hidden_act: str = "silu"
    sliding_window: int | None = None  # in effect (None: full attention); longer inputs are refused

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"decoder config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"decoder config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"decoder config: head_dim {self.head_dim} is odd (RoPE rotates pairs)")

    @classmethod
    def from_dict(cls, config: Mapping, qk_norm: bool) -> "DecoderConfig":
        """From a transformers config.json (Qwen3's, Mistral's, or a multimodal one's `text_config`); other keys are
        ignored. `qk_norm`: the model has Qwen3's per-head q/k norms (the config does not say)."""
        d = config.get("text_config") or config
        missing = [k for k in _REQUIRED if d.get(k) is None]
        if missing:
            raise ValueError(f"decoder config: missing {missing}")
        heads = d["num_attention_heads"]
        qwen = qk_norm or str(d.get("model_type", "")).startswith("qwen")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=_get(d, "num_key_value_heads", heads),
                   head_dim=_get(d, "head_dim", d["hidden_size"] // heads),
                   rms_norm_eps=float(_get(d, "rms_norm_eps", 1e-6)), rope_theta=rope_theta_of(d), qk_norm=qk_norm,
                   attention_bias=bool(_get(d, "attention_bias", False)), hidden_act=_get(d, "hidden_act", "silu"),
                   sliding_window=sliding_window_of(d, qwen))


def rope_tables(length: int, head_dim: int, theta: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, 1, L, head_dim) for positions 0..L-1 in `like`'s dtype and device. The frequencies are computed
    in fp32 on the CPU (where transformers computes its buffer), the angles in fp32 on the device."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    positions = torch.arange(length, device=like.device).float()
    freqs = positions[:, None] * inv_freq.to(like.device)   # (L, head_dim / 2)
    angles = torch.cat((freqs, freqs), dim=-1)[None, None]  # (1, 1, L, head_dim): both halves share a frequency
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, d) rotated: each pair is (x[i], x[i + d/2])."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def attention_mask_4d(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor | None:
    """(B, 1, L, L) bool, True where query i may see key j: j <= i and attention_mask[b, j] is 1. None where nothing
    is padded: SDPA's own causal mask then serves (as transformers leaves it, which lets CUDA pick flash kernels)."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(device=device, dtype=torch.bool)
    if bool(keep.all()):
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return causal[None, None] & keep[:, None, None, :]


class DecoderAttention(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_width, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, kv_width, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, kv_width, bias=c.attention_bias)
        self.o_proj = Linear(q_width, c.hidden_size, bias=c.attention_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm = c.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, d), k/v: (B, H_kv, L, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.heads:  # each k/v head serves `group` consecutive query heads
            group = self.heads // self.kv_heads
            k, v = (t[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(b, self.heads, n, -1)
                    for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.head_dim ** -0.5)  # (B, H, L, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DecoderMLP(nn.Module):
    """`down(silu(gate x) * up x)`."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.self_attn = DecoderAttention(c)
        self.mlp = DecoderMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """The decoder stack without its final norm and LM head; `config.num_hidden_layers` layers are built (build only
    the ones read: `dataclasses.replace(config, num_hidden_layers=max(layers))`)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = zero_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                layers: Sequence[int]) -> list[torch.Tensor]:
        """input_ids (B, L), attention_mask (B, L) of 1 (token) and 0 (padding; None: no padding) -> for each k in
        `layers`, the (B, L, hidden) state after k layers (0: the embeddings); transformers' `hidden_states[k]` for
        every k below its model's layer count (its last entry is the final-normed one). Runs max(layers) layers."""
        layers = list(layers)
        last = max(layers, default=-1)
        if not layers or min(layers) < 0 or last > len(self.layers):
            raise ValueError(f"decoder: hidden states after layers {layers} requested; this model has "
                             f"{len(self.layers)} layers (0 = the embeddings)")
        b, n = input_ids.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, n):
            raise ValueError(f"decoder: attention_mask {tuple(attention_mask.shape)} does not fit input_ids {(b, n)}")
        window = self.config.sliding_window
        if window is not None and n > window:
            raise ValueError(f"decoder: {n} tokens exceed the model's sliding window of {window} (not implemented)")
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(n, self.config.head_dim, self.config.rope_theta, x)
        mask = attention_mask_4d(attention_mask, n, x.device)
        states = {0: x}
        for i, layer in enumerate(self.layers[:last]):
            x = layer(x, cos, sin, mask)
            if i + 1 in layers:
                states[i + 1] = x
        return [states[k] for k in layers]
