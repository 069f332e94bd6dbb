"""CLIP text transformer (CLIP-L's text tower, as FLUX.1 uses it): token ids -> final-layer-norm hidden states.

Parameter names are those transformers 5 writes for `CLIPTextModel` (`embeddings.*`, `encoder.layers.N.*`,
`final_layer_norm.*`), so its files and LoRAs map onto this module unchanged. Written here rather than taken from
transformers because importing transformers' model code costs about 2 s of every fresh process.

    ids (B, L) -> token + position embeddings -> N x [x + attn(ln1(x)), x + mlp(ln2(x))] -> final LN -> (B, L, D)

Attention is causal, as CLIP was trained; no padding mask (FLUX pools the state at the first EOS token).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def check_layer_config(c, what: str) -> None:
    """What ClipLayer needs of a config: a known activation, a width the heads divide."""
    if c.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{what} config: hidden_act {c.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"{what} config: hidden_size {c.hidden_size} is not a multiple of num_attention_heads "
                         f"{c.num_attention_heads}")


def zero_embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding starting at zeros: its weights come from a file. (Its random init on the meta device would
    import torch._dynamo, 1.5 s of a fresh process.)"""
    return nn.Embedding(num, dim, _weight=torch.zeros(num, dim))


@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        check_layer_config(self, "CLIP text")

    @classmethod
    def from_dict(cls, config: Mapping) -> "ClipTextConfig":
        """From a config.json (CLIPTextConfig, or a full CLIPConfig whose `text_config` holds it); other keys are
        ignored."""
        d = config.get("text_config", config)
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


class ClipEmbeddings(nn.Module):
    def __init__(self, c: ClipTextConfig):
        super().__init__()
        self.token_embedding = zero_embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = zero_embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class ClipAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections; causal in the text tower, bidirectional in vision
    towers (SigLIP)."""

    def __init__(self, c, causal: bool = True):
        super().__init__()
        self.heads, self.causal = c.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """The pre-LN layer of CLIP's towers and SigLIP's: x + attn(ln1(x)), then x + mlp(ln2(x)). `c`: a config with
    hidden_size, intermediate_size, num_attention_heads, hidden_act and layer_norm_eps."""

    def __init__(self, c, causal: bool = True):
        super().__init__()
        self.self_attn = ClipAttention(c, causal)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = ClipMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    """`layers`: the towers' stack of ClipLayers (causal in the text tower, bidirectional in the vision ones)."""

    def __init__(self, c, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(c, causal) for _ in range(c.num_hidden_layers))


class ClipTextModel(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, hidden) final-layer-norm states."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP text encoder: {input_ids.shape[1]} tokens, at most "
                             f"{self.config.max_position_embeddings} fit its position table")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
