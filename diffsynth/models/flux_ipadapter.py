"""FLUX IP-Adapters: image tokens that the DiT's image queries attend to, besides the text and image.

Two checkpoint kinds, one module (`FluxIpAdapter`), internal names = InstantX's file names:

* InstantX FLUX.1-dev-IP-Adapter (`ip-adapter.bin`, nested `image_proj` / `ip_adapter` dicts): an MLP turns
  the 1152-d SigLIP pooled embedding into 128 tokens of 4096; one k/v pair (no bias, k RMS-normalised over
  the head) per DiT block (19 double + 38 single). Its attention output is added to the image tokens'
  attention output: double blocks from the image queries before RoPE (before `a_to_out`), single blocks
  from the queries after RoPE (before `proj_out`).
* XLabs flux-ip-adapter (`ip_adapter.safetensors`: `ip_adapter_proj_model.*`,
  `double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*`): one Linear turns the 768-d CLIP
  image embedding into 4 (or 16) tokens; k/v with bias, double blocks only; the output (from the image
  queries before RoPE) is added to the image stream after the whole double block, ungated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear import Linear

from ..ops.attention import attention
from ..ops.files import CheckpointError
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_prefix, plain_tensors


@dataclass
class IpAdapterConfig:
    kind: str              # "instantx" | "xlabs": where the output is injected (see module docstring)
    image_dim: int         # image-encoder embedding width (1152 SigLIP so400m, 768 CLIP ViT-L)
    context_dim: int       # token width (4096)
    hidden_size: int       # DiT width = k/v output (3072)
    num_tokens: int        # tokens per image (128 / 4)
    num_blocks: int        # k/v pairs: 57 (double then single blocks) / 19 (double blocks)
    proj_hidden: int = 0   # InstantX MLP hidden width (2 x image_dim); 0 = one Linear (XLabs)

    @property
    def kv_bias(self) -> bool:
        return self.kind == "xlabs"


class ImageProjection(nn.Module):
    """(B, image_dim) -> (B, num_tokens, context_dim): MLP (InstantX) or Linear (XLabs), then LayerNorm."""

    def __init__(self, c: IpAdapterConfig):
        super().__init__()
        self.num_tokens, self.context_dim = c.num_tokens, c.context_dim
        out = c.num_tokens * c.context_dim
        if c.proj_hidden:
            self.proj = nn.Sequential(Linear(c.image_dim, c.proj_hidden), nn.GELU(), Linear(c.proj_hidden, out))
        else:
            self.proj = Linear(c.image_dim, out)
        self.norm = nn.LayerNorm(c.context_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(emb).unflatten(-1, (self.num_tokens, self.context_dim)))


class IpKV(nn.Module):
    def __init__(self, context_dim: int, hidden: int, bias: bool):
        super().__init__()
        self.to_k_ip = Linear(context_dim, hidden, bias=bias)
        self.to_v_ip = Linear(context_dim, hidden, bias=bias)


class FluxIpAdapter(nn.Module):
    def __init__(self, config: IpAdapterConfig):
        super().__init__()
        self.config = config
        self.image_proj = ImageProjection(config)
        self.ip_adapter = nn.ModuleList(IpKV(config.context_dim, config.hidden_size, config.kv_bias)
                                        for _ in range(config.num_blocks))

    @property
    def dtype(self) -> torch.dtype:
        """Computation dtype: the weights' own, unless VRAM management stores them otherwise (fp8)."""
        return self.__dict__.get("compute_dtype") or self.image_proj.norm.weight.dtype

    def tokens(self, image_emb: torch.Tensor) -> torch.Tensor:
        """(B, n_images, image_dim) -> (B, n_images * num_tokens, context_dim): the images' tokens, in order."""
        if image_emb.shape[-1] != self.config.image_dim:
            raise ValueError(f"this IP-Adapter takes {self.config.image_dim}-d image embeddings, got "
                             f"{image_emb.shape[-1]}-d: load the image encoder it was trained with "
                             f"({'SigLIP so400m' if self.config.kind == 'instantx' else 'CLIP ViT-L/14'})")
        return self.image_proj(image_emb.to(self.dtype)).flatten(1, 2)

    def keys_values(self, tokens: torch.Tensor, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of every block (B, heads, T, head_dim); InstantX keys are RMS-normalised per head."""
        out = []
        for m in self.ip_adapter:
            k = m.to_k_ip(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
            v = m.to_v_ip(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
            if self.config.kind == "instantx":
                k = F.rms_norm(k.float(), k.shape[-1:], eps=1e-5).to(k.dtype)
            out.append((k, v))
        return out

    def block_index(self, kind: str, index: int, num_double: int) -> int | None:
        """Which k/v pair serves DiT block (kind, index); None when this adapter has none there."""
        i = index if kind == "double" else num_double + index
        if self.config.kind == "xlabs" and kind != "double":
            return None
        return i if i < self.config.num_blocks else None


def ip_attention(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """scale * softmax(q k^T / sqrt(d)) v for queries q (b, heads, n, d) over the image tokens."""
    k, v = kv
    return scale * attention(q, k.to(q.dtype), v.to(q.dtype))


# ----------------------------------------------------------------------------- checkpoint layouts

_XLABS_KV = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")


def ipadapter_from_xlabs(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs names -> internal (InstantX-style) names."""
    out = {}
    for key, t in sd.items():
        m = _XLABS_KV.match(key)
        if m:
            out[f"ip_adapter.{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"] = t
        elif key.startswith("ip_adapter_proj_model."):
            out["image_proj." + key[len("ip_adapter_proj_model."):]] = t
        else:
            raise CheckpointError(f"unexpected key {key!r} in an XLabs FLUX IP-Adapter")
    return out


def infer_ipadapter_config(kind: str, shapes: dict[str, tuple[int, ...]]) -> IpAdapterConfig:
    """Architecture from internal-named tensor shapes; clear errors for files that are not IP-Adapters."""
    try:
        context_dim = shapes["image_proj.norm.weight"][0]
        hidden, k_in = shapes["ip_adapter.0.to_k_ip.weight"]
        if kind == "instantx":
            proj_hidden, image_dim = shapes["image_proj.proj.0.weight"]
            out = shapes["image_proj.proj.2.weight"][0]
        else:
            proj_hidden = 0
            out, image_dim = shapes["image_proj.proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"not a complete {kind} FLUX IP-Adapter: missing {e.args[0]!r}") from None
    if k_in != context_dim or out % context_dim:
        raise CheckpointError(f"{kind} IP-Adapter shapes disagree: k/v take {k_in}-d tokens, the projection "
                              f"makes {out} values of {context_dim}-d tokens")
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("ip_adapter."))
    return IpAdapterConfig(kind, image_dim, context_dim, hidden, out // context_dim, blocks, proj_hidden)


def check_fits(adapter: FluxIpAdapter, dit) -> None:
    """The adapter must have been made for this DiT's width and depth."""
    c, d = adapter.config, dit.config
    blocks = d.num_double_blocks + (d.num_single_blocks if c.kind == "instantx" else 0)
    if c.hidden_size != d.hidden_size or c.num_blocks != blocks:
        raise ValueError(f"this {c.kind} IP-Adapter has {c.num_blocks} blocks of width {c.hidden_size}, the DiT needs "
                         f"{blocks} of width {d.hidden_size}: it was made for another model")


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    keys = refs.keys()
    if any(k.startswith("ip_adapter.") and ".to_k_ip." in k for k in keys):
        return "instantx"  # ip-adapter.bin (nested ip_adapter/image_proj dicts) or its flat safetensors form
    if has_prefix(keys, "ip_adapter_proj_model.") or any(".ip_adapter_double_stream_" in k for k in keys):
        return "xlabs"
    return None


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    sd = plain_tensors(det, options)
    if det.format == "xlabs":
        sd = ipadapter_from_xlabs(sd)
    config = infer_ipadapter_config(det.format, {k: tuple(v.shape) for k, v in sd.items()})
    return {"ipadapter": assign(FluxIpAdapter, config, sd, f"{det.format} IP-Adapter from {det.source}")}


COMPONENTS = (Component("ipadapter", "denoise", in_loop=True),)
FAMILIES = (Family("flux-ipadapter", "FLUX IP-Adapter (InstantX or XLabs)", detect, fills("ipadapter"), build),)
