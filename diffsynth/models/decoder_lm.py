"""Decoder-only language model read as hidden states: FLUX.2's prompt encoders (Qwen3, Mistral) and the language
side of Qwen2.5-VL (Step1X-Edit, Nexus-Gen).

Parameter names are those of transformers' `Qwen3Model` / `MistralModel` / `Qwen2_5_VLTextModel` (a causal LM's
`model.*` keys without `model.`), so their files map onto this module unchanged. There is no LM head, and the final
norm (`norm`) is built only on request (`DecoderLM(config, final_norm=True)`): FLUX.2 reads the states inside the
stack (after layers 9/18/27 or 10/20/30), never the normed output, while Qwen2.5-VL's readers take the normed last
state. Written here rather than taken from transformers because importing its model code costs about 1.5 s of every
fresh process.

    forward:        ids (B, L) -> embed -> N x [x + attn(rms(x)), x + mlp(rms(x))]   the states after the layers asked
    forward_embeds: embeds (B, L, D), caller's cos/sin -> the same N layers -> norm   the last hidden state

Attention is causal with the padded keys masked, as transformers masks it for SDPA: query i sees the keys j <= i
whose attention_mask is 1, so (right padding) the padded positions get outputs too, and FLUX.2 reads them; a query
that sees no key (left padding) gets zeros from SDPA, as in transformers. RoPE in the rotate-half layout, at
positions 0..L-1 in `forward`; `forward_embeds` takes the tables from the caller (Qwen2.5-VL's multimodal RoPE:
mrope.py). Grouped-query attention; Qwen3 adds an RMS norm per head on q and k; Qwen2 has biases on q/k/v (not o).
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


def _rope_parameters(config: Mapping) -> Mapping:
    """The RoPE dict of a config.json: transformers 5's `rope_parameters` or 4's `rope_scaling` (which, when set,
    takes precedence, as transformers 5 reads old files). Only unscaled RoPE runs here: type "default", or Qwen2.5-VL's
    "mrope" (transformers 4's file; 5 rewrites it to "default" and keeps `mrope_section`), which turns the same
    frequencies, split over three position axes. A scaled type (linear, dynamic, yarn, llama3, longrope, ...) is
    refused, naming it."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, Mapping) or any(isinstance(v, Mapping) for v in rope.values()):
        raise ValueError(f"decoder config: RoPE parameters {rope!r} are not supported (one flat dict expected)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"decoder config: RoPE type {kind!r} is not supported (only the default, unscaled RoPE)")
    if rope.get("mrope_interleaved"):  # Qwen3-VL's layout: t/h/w frequencies alternate instead of forming sections
        raise ValueError("decoder config: interleaved multimodal RoPE is not supported (only Qwen2.5-VL's sections)")
    return rope


def rope_theta_of(config: Mapping) -> float:
    """The RoPE base of a config.json (see `_rope_parameters` for what is refused); transformers' 10000 if unset."""
    return float(_get(_rope_parameters(config), "rope_theta", _get(config, "rope_theta", 10_000.0)))


def mrope_section_of(config: Mapping) -> tuple[int, ...] | None:
    """Qwen2.5-VL's `mrope_section` (how many of the head_dim / 2 frequencies turn with the time, height and width
    positions), None for a plain RoPE config."""
    section = _rope_parameters(config).get("mrope_section")
    return None if section is None else tuple(int(n) for n in section)


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
    attention_bias: bool = False    # biases on q/k/v and o (transformers' `attention_bias`, e.g. Qwen3's)
    qkv_bias: bool = False          # biases on q/k/v only (Qwen2 / Qwen2.5-VL, wired into the architecture)
    hidden_act: str = "silu"
    sliding_window: int | None = None  # in effect (None: full attention); longer inputs are refused
    mrope_section: tuple[int, ...] | None = None  # Qwen2.5-VL: frequencies per t/h/w axis, for the caller's tables
    causal: bool = True             # False: every token sees every token (Nexus-Gen's merger layer)

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"decoder config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"decoder config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"decoder config: head_dim {self.head_dim} is odd (RoPE rotates pairs)")
        section = self.mrope_section
        if section is not None and (len(section) != 3 or sum(section) != self.head_dim // 2):
            raise ValueError(f"decoder config: mrope_section {list(section)} does not split head_dim / 2 = "
                             f"{self.head_dim // 2} frequencies into time, height and width sections")

    @classmethod
    def from_dict(cls, config: Mapping, qk_norm: bool, qkv_bias: bool = False) -> "DecoderConfig":
        """From a transformers config.json (Qwen3's, Mistral's, or a multimodal one's: its `text_config`, or the top
        level where there is none, as in Qwen2.5-VL's release); other keys are ignored. `qk_norm`: the model has
        Qwen3's per-head q/k norms; `qkv_bias`: Qwen2's q/k/v biases (the config says neither)."""
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
                   attention_bias=bool(_get(d, "attention_bias", False)), qkv_bias=qkv_bias,
                   hidden_act=_get(d, "hidden_act", "silu"), sliding_window=sliding_window_of(d, qwen),
                   mrope_section=mrope_section_of(d))


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
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = Linear(c.hidden_size, q_width, bias=qkv_bias)
        self.k_proj = Linear(c.hidden_size, kv_width, bias=qkv_bias)
        self.v_proj = Linear(c.hidden_size, kv_width, bias=qkv_bias)
        self.o_proj = Linear(q_width, c.hidden_size, bias=c.attention_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.qk_norm, self.causal = c.qk_norm, c.causal

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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and self.causal,
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
    """The decoder stack without its LM head; `config.num_hidden_layers` layers are built (build only the ones read:
    `dataclasses.replace(config, num_hidden_layers=max(layers))`), the final norm `norm` only with `final_norm`."""

    def __init__(self, config: DecoderConfig, final_norm: bool = False):
        super().__init__()
        self.config = config
        self.embed_tokens = zero_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if final_norm else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                layers: Sequence[int]) -> list[torch.Tensor]:
        """input_ids (B, L), attention_mask (B, L) of 1 (token) and 0 (padding; None: no padding) -> for each k in
        `layers`, the (B, L, hidden) state after k layers (0: the embeddings), never normed; transformers'
        `hidden_states[k]` for every k below its model's layer count (its last entry is the final-normed one). Runs
        max(layers) layers."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x)
        return self._states(x, cos, sin, attention_mask, layers)

    def forward_embeds(self, inputs_embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       attention_mask: torch.Tensor | None) -> torch.Tensor:
        """inputs_embeds (B, L, hidden), rotary tables cos/sin (B or 1, 1, L, head_dim) in the rotate-half layout
        (e.g. mrope.mrope_tables), attention_mask (B, L) as in `forward` -> the (B, L, hidden) state after all the
        layers, final-normed when `norm` is built: transformers' `last_hidden_state` given `inputs_embeds`."""
        n = inputs_embeds.shape[1]
        for name, table in (("cos", cos), ("sin", sin)):
            if table.dim() != 4 or tuple(table.shape[-2:]) != (n, self.config.head_dim):
                raise ValueError(f"decoder: rotary table {name} {tuple(table.shape)} does not fit {n} tokens of "
                                 f"head_dim {self.config.head_dim} (expected (B, 1, L, head_dim))")
        (x,) = self._states(inputs_embeds, cos, sin, attention_mask, [len(self.layers)])
        return x if self.norm is None else self.norm(x)

    def _states(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None,
                layers: Sequence[int]) -> list[torch.Tensor]:
        """x (B, L, hidden) through the first max(layers) layers -> the states after each k in `layers`."""
        layers = list(layers)
        last = max(layers, default=-1)
        if not layers or min(layers) < 0 or last > len(self.layers):
            raise ValueError(f"decoder: hidden states after layers {layers} requested; this model has "
                             f"{len(self.layers)} layers (0 = the embeddings)")
        b, n = x.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (b, n):
            raise ValueError(f"decoder: attention_mask {tuple(attention_mask.shape)} does not fit the inputs {(b, n)}")
        window = self.config.sliding_window
        if window is not None and n > window:
            raise ValueError(f"decoder: {n} tokens exceed the model's sliding window of {window} (not implemented)")
        mask = attention_mask_4d(attention_mask, n, x.device)
        states = {0: x}
        for i, layer in enumerate(self.layers[:last]):
            x = layer(x, cos, sin, mask)
            if i + 1 in layers:
                states[i + 1] = x
        return [states[k] for k in layers]
