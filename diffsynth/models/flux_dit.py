"""The FLUX.1 rectified-flow transformer (double-stream + single-stream blocks).

Module names are this project's internal naming (the one DiffSynth-Studio's training interface uses:
`blocks.N.attn.a_to_qkv`, `single_blocks.N.to_qkv_mlp`, ...). In every name `a` is the image
stream and `b` the text stream. Converters from the BFL and diffusers layouts live at the bottom.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention
from ..ops.attention_mask import GroupMask, query_tail, select_batch
from ..ops.linear import Linear
from ..ops.norms import norm_modulate, rms_norm
from ..ops.parallel import context_parallel_enabled, interleave_shards, run_split_blocks, shard_linears, world_size
from ..ops.files import strip_first_prefix
from ..ops.gguf import dequantize, is_quantized
from ..ops.quant import apply_scales
from .entry import (BuildOptions, Component, Detected, Family, assign, cat_rows, fills, has_prefix, load_tensors,
                    meta_tensors)


@dataclass
class FluxDiTConfig:
    in_channels: int = 64
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    context_dim: int = 4096
    pooled_dim: int = 768
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- math helpers

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first. `t` is already on the 0..1000 scale."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotation table (L, head_dim/2, 2) of (cos, sin) per channel pair for position ids (L, n_axes)."""
    pos = ids.to(torch.float64)
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(pos[:, axis, None] * inv[None])
    angles = torch.cat(angles, -1)
    return torch.stack([angles.cos(), angles.sin()], -1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, heads, L, D) by `table`, in fp32 as the reference does."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor fuses the real form into one kernel but lowers complex poorly
        a, b = pairs.unbind(-1)
        cos, sin = table.unbind(-1)
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1)
    else:  # eager: one complex product instead of five elementwise passes
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table))
    return out.flatten(-2).to(x.dtype)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, channel-major inside a patch."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`; height/width are the latent sizes."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, batch: int = 1, index: int = 0, device=None) -> torch.Tensor:
    """Position ids (B, H/2*W/2, 3) = (index, row, col) on the packed grid of a (height, width) latent."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)



def gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * y, in one pass."""
    return torch.addcmul(x, gate[:, None], y)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLPEmbedder(nn.Sequential):
    """Linear -> SiLU -> Linear, named `.0`/`.2` so checkpoints and LoRA targets are stable."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__(Linear(in_dim, hidden), nn.SiLU(), Linear(hidden, hidden))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(t * 1000).to(dtype))


class AdaNorm(nn.Module):
    """LayerNorm without affine whose shift/scale(/gate) come from the conditioning vector."""

    def __init__(self, hidden: int, n_chunks: int):
        super().__init__()
        self.linear = Linear(hidden, n_chunks * hidden)
        self.n_chunks = n_chunks

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.n_chunks, dim=-1)




def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def token_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, L, H, D), a view. The DiTs run q/k norms and RoPE in this layout (as diffusers), where
    each head's channels are contiguous, so no copy is made before them; attention gets transposed views, and
    torch's CPU attention lays its output out as (B, L, H, D), so merging the heads back copies nothing."""
    return x.unflatten(-1, (heads, -1))


def rope_tokens(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`apply_rope` for (B, L, H, D) tokens."""
    return apply_rope(x, table[:, None])


def attend_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Attention over (B, L, H, D) tokens -> (B, L, H, D)."""
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


class JointAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        head_dim = hidden // heads
        self.a_to_qkv = Linear(hidden, 3 * hidden)
        self.b_to_qkv = Linear(hidden, 3 * hidden)
        self.norm_q_a, self.norm_k_a = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_q_b, self.norm_k_b = RMSNorm(head_dim), RMSNorm(head_dim)
        self.a_to_out = Linear(hidden, hidden)
        self.b_to_out = Linear(hidden, hidden)

    def qkv(self, x: torch.Tensor, proj: nn.Linear, norm_q: RMSNorm, norm_k: RMSNorm):
        """(B, L, H, D) queries and keys (RMS-normed) and values."""
        q, k, v = (token_heads(t, self.heads) for t in proj(x).chunk(3, dim=-1))
        return norm_q(q), norm_k(k), v

    def forward(self, img, txt, rope, mask=None, extra: Callable | None = None):
        """`extra(q_img)`: attention output (B, H, N_img, D) added to the image tokens' own (IP-Adapter);
        it receives the image queries (B, H, N_img, D) before RoPE."""
        q_a, k_a, v_a = self.qkv(img, self.a_to_qkv, self.norm_q_a, self.norm_k_a)
        q_b, k_b, v_b = self.qkv(txt, self.b_to_qkv, self.norm_q_b, self.norm_k_b)
        q, k, v = torch.cat([q_b, q_a], 1), torch.cat([k_b, k_a], 1), torch.cat([v_b, v_a], 1)
        out = attend_tokens(rope_tokens(q, rope), rope_tokens(k, rope), v, mask)
        n_txt = txt.shape[1]
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        if extra is not None:
            img_out = img_out + extra(q_a.transpose(1, 2)).transpose(1, 2)
        return self.a_to_out(img_out.flatten(2)), self.b_to_out(txt_out.flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__(Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), Linear(mlp_hidden, hidden))


class DoubleBlock(nn.Module):
    """Image and text streams with separate weights, joined only inside attention."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1_a, self.norm1_b = AdaNorm(hidden, 6), AdaNorm(hidden, 6)
        self.attn = JointAttention(hidden, heads)
        self.ff_a, self.ff_b = FeedForward(hidden, mlp_hidden), FeedForward(hidden, mlp_hidden)

    def forward(self, img, txt, vec, rope, mask=None, extra: Callable | None = None):
        a_shift, a_scale, a_gate, a_shift2, a_scale2, a_gate2 = self.norm1_a(vec)
        b_shift, b_scale, b_gate, b_shift2, b_scale2, b_gate2 = self.norm1_b(vec)
        img_attn, txt_attn = self.attn(norm_modulate(img, a_shift, a_scale), norm_modulate(txt, b_shift, b_scale),
                                       rope, mask, extra)
        img = gated(img, a_gate, img_attn)
        img = gated(img, a_gate2, self.ff_a(norm_modulate(img, a_shift2, a_scale2)))
        txt = gated(txt, b_gate, txt_attn)
        txt = gated(txt, b_gate2, self.ff_b(norm_modulate(txt, b_shift2, b_scale2)))
        if txt.dtype == torch.float16:  # fp16 text activations overflow otherwise
            txt = txt.clip(-65504, 65504)
        return img, txt


class SingleBlock(nn.Module):
    """One stream over [text, image]; attention and MLP run in parallel from one fused projection."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden = heads, hidden, mlp_hidden
        head_dim = hidden // heads
        self.norm = AdaNorm(hidden, 3)
        self.to_qkv_mlp = Linear(hidden, 3 * hidden + mlp_hidden)
        self.norm_q_a, self.norm_k_a = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj_out = Linear(hidden + mlp_hidden, hidden)

    def forward(self, x, vec, rope, mask=None, context=None, extra: Callable | None = None):
        """`context`: tokens before x that serve only as keys/values; their outputs are not computed.
        `extra(q)`: attention output (B, H, n, D) added to the block's own, from the queries after RoPE."""
        n = x.shape[1]
        full = x if context is None else torch.cat([context, x], dim=1)
        shift, scale, gate = self.norm(vec)
        h = self.to_qkv_mlp(norm_modulate(full, shift, scale))
        out = self.attend(h[..., : 3 * self.hidden], rope, mask, n, extra)
        mlp = F.gelu(h[:, -n:, 3 * self.hidden:], approximate="tanh")
        del h  # the fused projection, the block's largest buffer, is freed before the concatenation
        return gated(x, gate, self.proj_out(torch.cat([out, mlp], dim=-1)))

    def attend(self, qkv, rope, mask, n: int, extra: Callable | None = None):
        """Attention of the last `n` tokens over all of them."""
        q, k, v = (token_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        q, k = rope_tokens(self.norm_q_a(q[:, -n:]), rope[-n:]), rope_tokens(self.norm_k_a(k), rope)
        out = attend_tokens(q, k, v, query_tail(mask, n))
        if extra is not None:
            out = out + extra(q.transpose(1, 2)).transpose(1, 2)
        return out.flatten(2)


class FinalNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = Linear(hidden, 2 * hidden)

    def forward(self, x, vec):
        scale, shift = self.linear(F.silu(vec)).chunk(2, dim=-1)
        return norm_modulate(x, shift, scale)


# ----------------------------------------------------------------------------- the model

class FluxDiT(nn.Module):
    def __init__(self, config: FluxDiTConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config or FluxDiTConfig(**kwargs)
        if config.hidden_size % config.num_heads or sum(config.axes_dim) != config.head_dim:
            raise ValueError(f"inconsistent DiT config: hidden {config.hidden_size}, heads {config.num_heads}, "
                             f"axes_dim {config.axes_dim} must sum to head_dim {config.head_dim}")
        h = config.hidden_size
        self.x_embedder = Linear(config.in_channels, h)
        self.context_embedder = Linear(config.context_dim, h)
        self.time_embedder = TimestepEmbedder(h)
        self.guidance_embedder = TimestepEmbedder(h) if config.guidance_embed else None
        self.pooled_text_embedder = MLPEmbedder(config.pooled_dim, h)
        self.blocks = nn.ModuleList(
            DoubleBlock(h, config.num_heads, config.mlp_hidden) for _ in range(config.num_double_blocks))
        self.single_blocks = nn.ModuleList(
            SingleBlock(h, config.num_heads, config.mlp_hidden) for _ in range(config.num_single_blocks))
        self.final_norm_out = FinalNorm(h)
        self.final_proj_out = Linear(h, config.out_channels)
        self.gradient_checkpointing = False
        self.tensor_parallel = False

    @property
    def dtype(self) -> torch.dtype:
        """Computation dtype: the weights' own, unless VRAM management stores them otherwise (fp8, GGUF)."""
        return self.__dict__.get("compute_dtype") or self.x_embedder.weight.dtype

    def conditioning(self, timestep, pooled, guidance=None) -> torch.Tensor:
        """Vector driving every modulation: time + pooled text (+ distilled guidance).

        `timestep` is sigma in [0, 1] and `guidance` the raw value (e.g. 3.5); both are scaled by 1000.
        """
        dtype = self.dtype
        vec = self.time_embedder(timestep, dtype) + self.pooled_text_embedder(pooled.to(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this DiT has a guidance embedder (FLUX.1-dev-like): pass `guidance`")
            vec = vec + self.guidance_embedder(guidance, dtype)
        return vec

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor):
        ids = torch.cat([txt_ids, img_ids], dim=-2)
        if ids.ndim == 3:
            ids = ids[0]  # positions are shared by the batch
        return rope_frequencies(ids, self.config.axes_dim, self.config.theta)

    def run_blocks(self, img, txt, vec, rope, ext: "Extensions" = None, start: int = 0):
        """Double then single blocks over image tokens `img` (target first, then any reference tokens).

        `start` skips the first double blocks (First-Block-Cache runs block 0 on its own). Under context
        parallelism (ops/parallel.py) each process runs the blocks on its share of the tokens.
        """
        ext = ext or Extensions()
        if context_parallel_enabled() or self.tensor_parallel:
            _check_splittable(ext)
        return run_split_blocks(lambda t, i, r: self._blocks(i, t, vec, r, ext, start), txt, img, rope)

    def _blocks(self, img, txt, vec, rope, ext: "Extensions", start: int):
        for i, block in enumerate(self.blocks):
            if i < start:
                continue
            img, txt = self._call(block, img, txt, vec, rope, ext.mask, ext.attention_for("double", i))
            img = ext.add_residual("double", i, img)
        n_img = img.shape[1]
        x = torch.cat([txt, img], dim=1)
        last = len(self.single_blocks) - 1
        for i, block in enumerate(self.single_blocks):
            extra = ext.attention_for("single", i)
            if i == last:  # nothing reads its text outputs: text is only keys/values
                x = self._call(block, x[:, -n_img:], vec, rope, ext.mask, x[:, :-n_img], extra)
            else:
                x = self._call(block, x, vec, rope, ext.mask, None, extra)
            x = torch.cat([x[:, :-n_img], ext.add_residual("single", i, x[:, -n_img:])], dim=1)
        return x[:, -n_img:]

    @torch.no_grad()
    def shard_tensor_parallel(self) -> None:
        """Tensor parallelism over the process group (inference): each rank keeps 1/N of the heads and MLP
        channels of every block. The fused q/k/v(/mlp) projections are reordered so that a column split
        gives each rank whole heads; attention outputs, MLP outputs and the single blocks' fused output
        projection are row-parallel (one all-reduce each). Embedders, modulations and the final layer stay
        whole on every rank."""
        world, c = world_size(), self.config
        if c.num_heads % world or c.mlp_hidden % world:
            raise ValueError(f"tensor parallelism over {world} processes needs the head count ({c.num_heads}) and "
                             f"the MLP width ({c.mlp_hidden}) to be multiples of {world}")
        h, m = c.hidden_size, c.mlp_hidden
        for block in self.blocks:
            for proj in (block.attn.a_to_qkv, block.attn.b_to_qkv):
                _interleave(proj, (h, h, h), world)
            block.attn.heads //= world
        for block in self.single_blocks:
            _interleave(block.to_qkv_mlp, (h, h, h, m), world)
            block.proj_out.weight.copy_(interleave_shards(block.proj_out.weight, (h, m), world, dim=1))
            block.heads, block.hidden, block.mlp_hidden = block.heads // world, h // world, m // world
        stream = ("attn.a_to_qkv", "attn.b_to_qkv", "ff_a.0", "ff_b.0")
        shard_linears(self, colwise=[f"blocks.*.{n}" for n in stream] + ["single_blocks.*.to_qkv_mlp"],
                      rowwise=[f"blocks.*.{n}" for n in ("attn.a_to_out", "attn.b_to_out", "ff_a.2", "ff_b.2")]
                      + ["single_blocks.*.proj_out"])
        self.tensor_parallel = True

    def _call(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def final(self, img, vec):
        return self.final_proj_out(self.final_norm_out(img, vec))

    def embed(self, img, img_ids, txt, txt_ids, timestep, pooled, guidance=None):
        """Everything before the blocks: (image tokens, text tokens, conditioning vector, rope tables)."""
        vec = self.conditioning(timestep, pooled, guidance)
        img = self.x_embedder(img.to(self.dtype))
        txt = self.context_embedder(txt.to(self.dtype))
        return img, txt, vec, self.rope(txt_ids, img_ids)

    def forward(self, img, img_ids, txt, txt_ids, timestep, pooled, guidance=None, *,
                ref: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None,
                ext: "Extensions | None" = None, cache=None):
        """Velocity of the packed latents.

        img (B, N, in_channels) packed latents with ids (B, N, 3); txt (B, L, context_dim) with ids
        (B, L, 3); timestep (B,) sigma; pooled (B, pooled_dim); guidance (B,) (guidance-distilled DiTs).
        ref (B, M, in_channels) with ids (B, M, 3): reference tokens (Kontext) appended after the target
        ones; they take part in attention and are dropped from the output. `ext`: per-block residuals,
        attention additions and the attention mask. `cache`: a step cache (flux_dit_cache) that may skip
        the block stack. Returns (B, N, out_channels).
        """
        n = img.shape[1]
        if ref is not None:
            if ref_ids is None:
                raise ValueError("reference tokens need their position ids (ref_ids)")
            img, img_ids = torch.cat([img, ref.to(img.dtype)], 1), torch.cat([img_ids, ref_ids.to(img_ids)], -2)
        ext = (ext or Extensions()).for_target(n)
        img, txt, vec, rope = self.embed(img, img_ids, txt, txt_ids, timestep, pooled, guidance)
        out = self.run_blocks(img, txt, vec, rope, ext) if cache is None else cache.run(self, img, txt, vec, rope, ext)
        return self.final(out[:, :n], vec)


def _interleave(proj: nn.Linear, parts: tuple[int, ...], world: int) -> None:
    proj.weight.copy_(interleave_shards(proj.weight, parts, world))
    if proj.bias is not None:
        proj.bias.copy_(interleave_shards(proj.bias, parts, world))


def _check_splittable(ext: "Extensions") -> None:
    """What the parallel modes cannot split yet: full-sequence masks, residuals and attention additions."""
    used = [name for name, on in (("an attention mask (EliGen)", ext.mask is not None),
                                  ("per-block residuals (ControlNet)", ext.residual is not None),
                                  ("attention additions (IP-Adapter)", bool(ext.attention))) if on]
    if used:
        raise NotImplementedError(f"parallel inference does not support {', '.join(used)} yet: "
                                  "run this call without --parallel / parallel=")


@dataclass
class Extensions:
    """What variants add to one DiT evaluation (all optional).

    residual(kind, index) -> (B, N_target, hidden) or None: added to the target image tokens after
        double/single block `index` ("double"/"single"), e.g. ControlNet samples.
    attention: callables (kind, index, q, rows) -> (b, heads, n, head_dim) or None, summed into the image
        tokens' attention output (double blocks: the image queries before RoPE; single blocks: the queries
        after RoPE), e.g. IP-Adapter keys/values. `rows` (None = all) are the batch rows `q` holds.
    mask: attention mask over [text, image] tokens: additive or boolean (B|1, heads|1, L, L), or a GroupMask
        (EliGen's regional mask in factored form, applied a block of query rows at a time).
    """
    residual: Callable | None = None
    attention: tuple[Callable, ...] = ()
    mask: torch.Tensor | GroupMask | None = None
    n_target: int | None = None
    batch_rows: torch.Tensor | None = None  # set by `rows`: a step cache runs a subset of the batch

    def for_target(self, n: int) -> "Extensions":
        return replace(self, attention=tuple(self.attention), n_target=n)

    def rows(self, rows: torch.Tensor) -> "Extensions":
        """The same extensions for the batch rows `rows` only."""
        return replace(self, mask=select_batch(self.mask, rows), batch_rows=rows)

    def add_residual(self, kind: str, index: int, img: torch.Tensor) -> torch.Tensor:
        r = None if self.residual is None else self.residual(kind, index)
        if r is None:
            return img
        if self.batch_rows is not None and r.shape[0] > 1:
            r = r[self.batch_rows]
        n = self.n_target or img.shape[1]
        if n == img.shape[1]:
            return img + r.to(img.dtype)
        return torch.cat([img[:, :n] + r.to(img.dtype), img[:, n:]], 1)

    def attention_for(self, kind: str, index: int) -> Callable | None:
        if not self.attention:
            return None
        hooks, rows = self.attention, self.batch_rows

        def extra(q: torch.Tensor) -> torch.Tensor:
            outs = [o for o in (h(kind, index, q, rows) for h in hooks) if o is not None]
            return sum(outs[1:], outs[0]) if outs else torch.zeros_like(q)
        return extra


# ----------------------------------------------------------------------------- checkpoint formats

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

BFL_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_embedder.timestep_embedder.0", "time_in.out_layer": "time_embedder.timestep_embedder.2",
    "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
    "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2",
    "vector_in.in_layer": "pooled_text_embedder.0", "vector_in.out_layer": "pooled_text_embedder.2",
    "final_layer.linear": "final_proj_out", "final_layer.adaLN_modulation.1": "final_norm_out.linear",
}
BFL_DOUBLE = {
    "img_mod.lin": "norm1_a.linear", "txt_mod.lin": "norm1_b.linear",
    "img_attn.qkv": "attn.a_to_qkv", "txt_attn.qkv": "attn.b_to_qkv",
    "img_attn.proj": "attn.a_to_out", "txt_attn.proj": "attn.b_to_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q_a.weight", "img_attn.norm.key_norm.scale": "attn.norm_k_a.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_q_b.weight", "txt_attn.norm.key_norm.scale": "attn.norm_k_b.weight",
    "img_mlp.0": "ff_a.0", "img_mlp.2": "ff_a.2", "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2",
}
BFL_SINGLE = {
    "linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "norm_q_a.weight", "norm.key_norm.scale": "norm_k_a.weight",
}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); ours is (scale, shift). The swap is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return cat_rows([b, a])


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src:
            return dst
        if key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


# Block lists of each layout: (name on the other side, per-block key table), and the top-level table.
_FROM_BFL = ({"double_blocks": ("blocks", BFL_DOUBLE), "single_blocks": ("single_blocks", BFL_SINGLE)}, BFL_TOP)
_TO_BFL = ({"blocks": ("double_blocks", _invert(BFL_DOUBLE)),
            "single_blocks": ("single_blocks", _invert(BFL_SINGLE))}, _invert(BFL_TOP))


def _map_key(key: str, mapping) -> str | None:
    blocks, top = mapping
    m = re.match(r"(\w+)\.(\d+)\.(.+)", key)
    if m and m.group(1) in blocks:
        kind, idx, rest = m.groups()
        target, table = blocks[kind]
        name = _rename(rest, table)
        return None if name is None else f"{target}.{idx}.{name}"
    return _rename(key, top)


def bfl_key_to_internal(key: str) -> str | None:
    """Map one BFL DiT key (prefix already stripped) to the internal name; None when unknown."""
    return _map_key(key, _FROM_BFL)


def internal_key_to_bfl(key: str) -> str | None:
    return _map_key(key, _TO_BFL)


def dit_from_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_first_prefix(sd, BFL_PREFIXES)
    out, unknown = {}, []
    for k, v in sd.items():
        name = bfl_key_to_internal(k)
        if name is None:
            unknown.append(k)
            continue
        out[name] = swap_halves(v) if name.startswith("final_norm_out.linear") else v
    if unknown:
        raise ValueError(f"unknown keys in BFL FLUX DiT checkpoint: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def dit_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        name = internal_key_to_bfl(k)
        if name is None:
            raise ValueError(f"cannot export {k!r} to BFL key names")
        out[name] = swap_halves(v) if k.startswith("final_norm_out.linear") else v
    return out


DIFFUSERS_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_embedder.timestep_embedder.0",
    "time_text_embed.timestep_embedder.linear_2": "time_embedder.timestep_embedder.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_embedder.timestep_embedder.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_embedder.timestep_embedder.2",
    "time_text_embed.text_embedder.linear_1": "pooled_text_embedder.0",
    "time_text_embed.text_embedder.linear_2": "pooled_text_embedder.2",
    "context_embedder": "context_embedder", "x_embedder": "x_embedder",
    "norm_out.linear": "final_norm_out.linear", "proj_out": "final_proj_out",
}
DIFFUSERS_DOUBLE = {
    "norm1.linear": "norm1_a.linear", "norm1_context.linear": "norm1_b.linear",
    "attn.to_out.0": "attn.a_to_out", "attn.to_add_out": "attn.b_to_out",
    "attn.norm_q": "attn.norm_q_a", "attn.norm_k": "attn.norm_k_a",
    "attn.norm_added_q": "attn.norm_q_b", "attn.norm_added_k": "attn.norm_k_b",
    "ff.net.0.proj": "ff_a.0", "ff.net.2": "ff_a.2", "ff_context.net.0.proj": "ff_b.0", "ff_context.net.2": "ff_b.2",
}
DIFFUSERS_SINGLE = {
    "norm.linear": "norm.linear", "proj_out": "proj_out", "attn.norm_q": "norm_q_a", "attn.norm_k": "norm_k_a",
}
# Fused internal projections and the diffusers pieces they concatenate, in order.
DIFFUSERS_FUSED = {
    ("transformer_blocks", "attn.a_to_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("transformer_blocks", "attn.b_to_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("single_transformer_blocks", "to_qkv_mlp"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def dit_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_first_prefix(sd, ("transformer.",))
    out, used = {}, set()
    blocks: dict[tuple[str, str], set] = {}
    for k in sd:
        m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", k)
        if m:
            blocks.setdefault((m.group(1), m.group(2)), set()).add(k)
    for (kind, idx), keys in blocks.items():
        prefix = f"{kind}.{idx}."
        internal = f"{'blocks' if kind == 'transformer_blocks' else 'single_blocks'}.{idx}."
        for (fkind, fused), parts in DIFFUSERS_FUSED.items():
            if fkind != kind:
                continue
            for p in ("weight", "bias"):
                names = [f"{prefix}{part}.{p}" for part in parts]
                if all(n in sd for n in names):
                    out[f"{internal}{fused}.{p}"] = cat_rows([sd[n] for n in names])
                    used.update(names)
        table = DIFFUSERS_DOUBLE if kind == "transformer_blocks" else DIFFUSERS_SINGLE
        for k in keys - used:
            name = _rename(k[len(prefix):], table)
            if name is not None:
                out[internal + name] = sd[k]
                used.add(k)
    for k in sd.keys() - used:
        name = _rename(k, DIFFUSERS_TOP)
        if name is not None:
            out[name] = sd[k]
            used.add(k)
    unknown = sorted(sd.keys() - used)
    if unknown:
        raise ValueError(f"unknown keys in diffusers FLUX transformer checkpoint: {unknown[:10]}")
    return out


def infer_dit_config(sd: dict[str, torch.Tensor]) -> FluxDiTConfig:
    """Architecture from internal-named tensor shapes (width, depth, channels, guidance)."""
    try:
        hidden, in_channels = sd["x_embedder.weight"].shape
        head_dim = sd["blocks.0.attn.norm_q_a.weight"].shape[0] if "blocks.0.attn.norm_q_a.weight" in sd else \
            sd["single_blocks.0.norm_q_a.weight"].shape[0]
        context_dim = sd["context_embedder.weight"].shape[1]
        pooled_dim = sd["pooled_text_embedder.0.weight"].shape[1]
        out_channels = sd["final_proj_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a FLUX DiT state dict: missing {e.args[0]!r}") from None
    n_double = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    n_single = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")), default=-1)
    if n_double:
        mlp_hidden = sd["blocks.0.ff_a.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.to_qkv_mlp.weight"].shape[0] - 3 * hidden
    heads = hidden // head_dim
    return FluxDiTConfig(
        in_channels=in_channels, out_channels=out_channels, hidden_size=hidden, num_heads=heads,
        num_double_blocks=n_double, num_single_blocks=n_single, context_dim=context_dim, pooled_dim=pooled_dim,
        mlp_ratio=mlp_hidden / hidden, guidance_embed="guidance_embedder.timestep_embedder.0.weight" in sd,
        axes_dim=default_axes_dim(head_dim))


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX splits each head's rotary channels (16, 56, 56) for head_dim 128; keep that ratio otherwise."""
    if head_dim == 128:
        return (16, 56, 56)
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = (head_dim - first) // 2
    rest -= rest % 2
    return (head_dim - 2 * rest, rest, rest)


# ----------------------------------------------------------------------------- table entry

# DiT input channels (x_embedder width, packed 2x2) of each FLUX.1 variant: the DiT file says which it is.
BASE_CHANNELS = 64      # FLUX.1-dev/schnell/Krea/Kontext: 16 latent channels
CONTROL_CHANNELS = 128  # FLUX.1-Canny/Depth-dev: + 16 control latent channels
FLEX_CHANNELS = 196     # FLEX.2: + 16 in-paint latents, 1 mask, 16 control latents
FILL_CHANNELS = 384     # FLUX.1-Fill-dev: + 16 masked-image latents, 64 (8x8 pixel mask)
VARIANT_BY_CHANNELS = {BASE_CHANNELS: "FLUX.1-dev-like", CONTROL_CHANNELS: "FLUX.1-Canny/Depth-like",
                       FLEX_CHANNELS: "FLEX.2-like", FILL_CHANNELS: "FLUX.1-Fill-like"}


def variant_name(config: FluxDiTConfig) -> str:
    """Which release a DiT's shape matches, from its guidance embedder and input channels."""
    if not config.guidance_embed:
        return "FLUX.1-schnell-like (no guidance embedder)"
    return VARIANT_BY_CHANNELS.get(config.in_channels, f"FLUX-like, {config.in_channels} input channels")


def detect(refs) -> str | None:
    """FLUX.1's DiT in BFL's, diffusers' or our names. Files that also carry DiT-like blocks (ControlNets,
    FLUX.2, Step1X, ...) are told apart by coming earlier in the table."""
    keys = refs.keys()
    if has_prefix(keys, "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        return "bfl"
    if "x_embedder.weight" in keys and has_prefix(keys, "transformer_blocks.", "single_transformer_blocks."):
        return "diffusers"
    if "x_embedder.weight" in keys and has_prefix(keys, "blocks.0.attn.a_to_qkv", "single_blocks.0.to_qkv_mlp"):
        return "diffsynth"
    return None


_CONVERTERS = {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers, "diffsynth": dict}


def config_of(det: Detected) -> FluxDiTConfig:
    """A detected DiT's architecture from tensor shapes alone (no weight is read)."""
    config = infer_dit_config(_CONVERTERS[det.format](meta_tensors(det)))
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return config


def describe(det: Detected) -> dict:
    c = config_of(det)
    return {"hidden_size": c.hidden_size, "heads": c.num_heads, "double_blocks": c.num_double_blocks,
            "single_blocks": c.num_single_blocks, "in_channels": c.in_channels,
            "guidance_embedder": c.guidance_embed, "variant": variant_name(c)}


def load_dit_tensors(det: Detected, options: BuildOptions, rename: Callable[[str], str | None]):
    """(tensors, GGUF types, scaled-fp8 scales) of a DiT file, the last two under our key names. `rename` maps a
    file key onto ours, or to None where the converter reshapes it (fused or split projections): scaled-fp8
    scales and GGUF blocks stay as stored on the keys that map one to one; the others are folded / dequantized
    here, once."""
    refs, scale_refs, sd = load_tensors(det, options)
    # per-tensor scales survive renaming; the BFL final layer's halves swap would reorder per-row ones
    keep = lambda k, s: rename(k) is not None and (s.numel() == 1 or not k.startswith("final_layer.adaLN"))  # noqa: E731
    scales = apply_scales(sd, scale_refs, options.dtype, keep)
    quant = {k: r.extra for k, r in refs.items() if is_quantized(r.extra)}
    for k in [k for k in quant if rename(k) is None]:
        dtype = options.dtype if options.dtype is not None else torch.float32
        sd[k] = dequantize(sd[k], quant.pop(k), dtype).reshape(refs[k].shape)
    return sd, {rename(k): t for k, t in quant.items()}, {rename(k): s for k, s in scales.items()}


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    """BFL's and our names map key by key; diffusers' separate q/k/v are fused (so folded / dequantized)."""
    rename = {"bfl": bfl_key_to_internal, "diffsynth": lambda k: k}.get(det.format, lambda k: None)
    sd, quant, scales = load_dit_tensors(det, options, rename)
    return {"dit": assign(FluxDiT, config_of(det), _CONVERTERS[det.format](sd), f"FLUX DiT from {det.source}",
                          quantized=quant, scales=scales)}


COMPONENTS = (Component("dit", "denoise", in_loop=True, activation="dit",
                        label="the FLUX DiT (flux1-dev.safetensors)"),)
FAMILIES = (Family("flux-dit", "FLUX DiT", detect, fills("dit"), build, bundle_prefixes=("model.diffusion_model.",),
                   low_precision_storage=True, config=config_of, describe=describe),)
