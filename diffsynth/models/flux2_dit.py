"""The FLUX.2 rectified-flow transformer (klein 4B/9B, dev): double-stream then single-stream blocks.

What differs from FLUX.1 (flux_dit.py): no pooled text vector and no biases; the modulation of every
double block comes from two shared projections (`double_stream_modulation_img/_txt`) and that of every
single block from one (`single_stream_modulation`); feed-forwards are SwiGLU (one `linear_in` holding
gate and value halves); RoPE has 4 axes (time, row, column, text position) with theta 2000; 128 input
channels (32 latent channels, 2x2 patches).

Module names are diffusers' `Flux2Transformer2DModel` names (`transformer_blocks.N.attn.to_q`,
`add_q_proj`, `to_out.0`, `to_add_out`, `ff.linear_in`, `single_transformer_blocks.N.attn.to_qkv_mlp_proj`,
`single_transformer_blocks.N.attn.to_out`, ...), the names DiffSynth-Studio 2.0's training scripts target.
A diffusers `transformer/` folder therefore loads key for key; BFL's single file (optionally under
ComfyUI's `model.diffusion_model.`) goes through the converters at the bottom.

Forward (what the pipeline passes; shapes for batch B):
    dit(img, img_ids, txt, txt_ids, timestep, guidance=None, ref=None, ref_ids=None) -> (B, N, 128)
    img (B, N, in_channels) patchified noisy latents, img_ids (B|1, N, 4) as (t, row, col, 0);
    txt (B, L, context_dim) stacked text-encoder states, txt_ids (B|1, L, 4) as (0, 0, 0, token index);
    timestep (B,) sigma in [0, 1]; guidance (B,) raw embedded guidance (dev only; ignored without embedder);
    ref (B, M, in_channels) reference-image tokens with ref_ids (B|1, M, 4) (editing), appended after the
    target tokens: they take part in attention and are dropped from the output.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.files import strip_first_prefix
from ..ops.linear import Linear
from ..ops.norms import norm_modulate, swiglu
from .entry import BuildOptions, Detected, Family, assign, fills, has_key, has_prefix, meta_tensors
from .flux_dit_cache import CachedStep, TeaCache
from ..ops.parallel import context_parallel_enabled, interleave_shards, run_split_blocks, shard_linears, world_size
from .flux_dit import (BFL_PREFIXES, RMSNorm, attend_tokens, gated, load_dit_tensors, rope_frequencies, rope_tokens,
                       timestep_embedding, token_heads)


@dataclass
class Flux2DiTConfig:
    in_channels: int = 128
    out_channels: int = 128
    hidden_size: int = 3072
    num_heads: int = 24
    num_double_blocks: int = 5
    num_single_blocks: int = 20
    context_dim: int = 7680
    mlp_ratio: float = 3.0
    guidance_embed: bool = False
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    timestep_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)  # the ratio is read back from shapes: no truncation

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- layers

def linear(n_in: int, n_out: int) -> Linear:
    return Linear(n_in, n_out, bias=False)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1, self.linear_2 = linear(in_dim, hidden), linear(hidden, hidden)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t` on the 0..1000 scale -> (B, hidden)."""
        emb = timestep_embedding(t, self.linear_1.in_features).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class TimeGuidanceEmbed(nn.Module):
    def __init__(self, in_dim: int, hidden: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepMLP(in_dim, hidden)
        self.guidance_embedder = TimestepMLP(in_dim, hidden) if guidance else None

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        vec = self.timestep_embedder(timestep * 1000, dtype)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this FLUX.2 DiT has a guidance embedder (FLUX.2-dev-like): pass `guidance`")
            vec = vec + self.guidance_embedder(guidance * 1000, dtype)
        return vec


class Modulation(nn.Module):
    """SiLU -> Linear to `n_chunks` (shift, scale, gate, ...) vectors; one serves every block of a kind."""

    def __init__(self, hidden: int, n_chunks: int):
        super().__init__()
        self.linear = linear(hidden, n_chunks * hidden)
        self.n_chunks = n_chunks

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.n_chunks, dim=-1)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.linear_in, self.linear_out = linear(hidden, 2 * mlp_hidden), linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """Image projections `to_*`, text projections `add_*`; text tokens come first in the joint sequence."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, head_dim = heads, hidden // heads
        self.to_q, self.to_k, self.to_v = linear(hidden, hidden), linear(hidden, hidden), linear(hidden, hidden)
        self.add_q_proj, self.add_k_proj = linear(hidden, hidden), linear(hidden, hidden)
        self.add_v_proj = linear(hidden, hidden)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.Sequential(linear(hidden, hidden))  # `to_out.0`, the name LoRA targets use
        self.to_add_out = linear(hidden, hidden)

    def heads_of(self, x: torch.Tensor, proj: nn.Module, norm: nn.Module | None = None) -> torch.Tensor:
        """(B, L, hidden) -> projected (B, L, heads, head_dim), RMS-normed when `norm` is given."""
        t = token_heads(proj(x), self.heads)
        return t if norm is None else norm(t)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.cat([self.heads_of(txt, self.add_q_proj, self.norm_added_q), self.heads_of(img, self.to_q, self.norm_q)], 1)
        k = torch.cat([self.heads_of(txt, self.add_k_proj, self.norm_added_k), self.heads_of(img, self.to_k, self.norm_k)], 1)
        v = torch.cat([self.heads_of(txt, self.add_v_proj), self.heads_of(img, self.to_v)], 1)
        out = attend_tokens(rope_tokens(q, rope), rope_tokens(k, rope), v).flatten(2)
        n_txt = txt.shape[1]
        return self.to_out(out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleBlock(nn.Module):
    """Image and text streams with their own weights, joined inside attention; modulation comes from outside."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.attn = JointAttention(hidden, heads)
        self.ff, self.ff_context = FeedForward(hidden, mlp_hidden), FeedForward(hidden, mlp_hidden)

    def forward(self, img, txt, mod_img: tuple[torch.Tensor, ...], mod_txt: tuple[torch.Tensor, ...], rope):
        shift, scale, gate, shift2, scale2, gate2 = mod_img
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = mod_txt
        img_attn, txt_attn = self.attn(norm_modulate(img, shift, scale), norm_modulate(txt, c_shift, c_scale), rope)
        img = gated(img, gate, img_attn)
        img = gated(img, gate2, self.ff(norm_modulate(img, shift2, scale2)))
        txt = gated(txt, c_gate, txt_attn)
        txt = gated(txt, c_gate2, self.ff_context(norm_modulate(txt, c_shift2, c_scale2)))
        if txt.dtype == torch.float16:  # fp16 text activations overflow otherwise
            txt = txt.clip(-65504, 65504)
        return img, txt


class ParallelAttention(nn.Module):
    """Attention and SwiGLU MLP in parallel from one fused input projection, joined by one output projection."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.to_qkv_mlp_proj = linear(hidden, 3 * hidden + 2 * mlp_hidden)
        self.norm_q, self.norm_k = RMSNorm(hidden // heads), RMSNorm(hidden // heads)
        self.to_out = linear(hidden + mlp_hidden, hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, rows: slice) -> torch.Tensor:
        """Outputs of the tokens `rows` of x (B, L, hidden), attending over all L."""
        proj = self.to_qkv_mlp_proj(x)
        out = self.attend(proj[..., : 3 * self.hidden], rope, rows)
        mlp_hidden = (proj.shape[-1] - 3 * self.hidden) // 2  # (this rank's share under tensor parallelism)
        joined = out.new_empty(*out.shape[:-1], self.hidden + mlp_hidden)
        joined[..., :self.hidden] = out
        del out
        swiglu(proj[:, rows, 3 * self.hidden:], out=joined[..., self.hidden:])  # written in place, no temporaries
        del proj  # the fused projection, the block's largest buffer, is freed before the output projection
        return self.to_out(joined)

    def attend(self, qkv: torch.Tensor, rope: torch.Tensor, rows: slice) -> torch.Tensor:
        """Attention of the tokens `rows` over all; its own method so that the q/k/v views of the fused
        projection are gone when it returns."""
        q, k, v = (token_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        q = rope_tokens(self.norm_q(q[:, rows]), rope[rows])
        return attend_tokens(q, rope_tokens(self.norm_k(k), rope), v).flatten(2)


class SingleBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.attn = ParallelAttention(hidden, heads, mlp_hidden)

    def forward(self, x, mod: tuple[torch.Tensor, ...], rope, rows: slice = slice(None)):
        """x (B, L, hidden) = [text, image]; returns the updated tokens `rows` (all by default)."""
        shift, scale, gate = mod
        return gated(x[:, rows], gate, self.attn(norm_modulate(x, shift, scale), rope, rows))


class OutputNorm(nn.Module):
    """Final adaptive LayerNorm; its projection holds (scale, shift) in that order (BFL's is (shift, scale))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = linear(hidden, 2 * hidden)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(vec)).chunk(2, dim=-1)
        return norm_modulate(x, shift, scale)


# ----------------------------------------------------------------------------- the model

class Flux2DiT(nn.Module):
    def __init__(self, config: Flux2DiTConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config or Flux2DiTConfig(**kwargs)
        if config.hidden_size % config.num_heads or sum(config.axes_dim) != config.head_dim:
            raise ValueError(f"inconsistent FLUX.2 DiT config: hidden {config.hidden_size}, heads {config.num_heads}, "
                             f"axes_dim {config.axes_dim} must sum to head_dim {config.head_dim}")
        h, heads, mlp = config.hidden_size, config.num_heads, config.mlp_hidden
        self.x_embedder = linear(config.in_channels, h)
        self.context_embedder = linear(config.context_dim, h)
        self.time_guidance_embed = TimeGuidanceEmbed(config.timestep_dim, h, config.guidance_embed)
        self.double_stream_modulation_img = Modulation(h, 6)
        self.double_stream_modulation_txt = Modulation(h, 6)
        self.single_stream_modulation = Modulation(h, 3)
        self.transformer_blocks = nn.ModuleList(DoubleBlock(h, heads, mlp) for _ in range(config.num_double_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            SingleBlock(h, heads, mlp) for _ in range(config.num_single_blocks))
        self.norm_out = OutputNorm(h)
        self.proj_out = linear(h, config.out_channels)
        self.gradient_checkpointing = False
        self.tensor_parallel = False

    @property
    def dtype(self) -> torch.dtype:
        """Computation dtype: the weights' own, unless VRAM management stores them otherwise (fp8, GGUF)."""
        return self.__dict__.get("compute_dtype") or self.x_embedder.weight.dtype

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([txt_ids, img_ids], dim=-2)
        if ids.ndim == 3:
            ids = ids[0]  # positions are shared by the batch
        return rope_frequencies(ids, self.config.axes_dim, self.config.theta)

    def embed(self, img, img_ids, txt, txt_ids, timestep, guidance=None):
        """Everything before the blocks: (image tokens, text tokens, conditioning vector, rope table)."""
        dtype = self.dtype
        guidance = guidance if self.time_guidance_embed.guidance_embedder is not None else None
        vec = self.time_guidance_embed(timestep, guidance, dtype)
        return self.x_embedder(img.to(dtype)), self.context_embedder(txt.to(dtype)), vec, self.rope(txt_ids, img_ids)

    def run_blocks(self, img, txt, vec, rope, n_target: int | None = None) -> torch.Tensor:
        """Double then single blocks; returns the first `n_target` image tokens (all by default). Under context
        parallelism (ops/parallel.py) each process runs them on its share of the tokens."""
        split = context_parallel_enabled()  # a rank's image rows mix target and reference tokens: keep them all
        out = run_split_blocks(lambda t, i, r: self._blocks(i, t, vec, r, None if split else n_target), txt, img, rope)
        return out[:, :n_target]

    def run_cached(self, cache: CachedStep, img, txt, vec, rope, n_target: int) -> torch.Tensor:
        """The blocks under First-Block-Cache (flux_dit_cache): the first double block always runs; a CFG
        branch whose first-block residual on the target tokens barely changed since its last computed step
        skips the rest and adds its cached residual."""
        if isinstance(cache.states[0], TeaCache):
            raise ValueError("TeaCache's rescaling polynomial is fitted to FLUX.1; FLUX.2 takes fbcache_thresh")
        if not len(self.transformer_blocks):
            raise ValueError("step caches need a DiT with at least one double block")
        if context_parallel_enabled():
            raise ValueError("step caches do not combine with context parallelism (each process holds a part "
                             "of the tokens, the skip decision needs all of them)")
        mod_img, mod_txt = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        img0, txt0 = self._call(self.transformer_blocks[0], img, txt, mod_img, mod_txt, rope)
        compute = cache.first_block_decisions((img0 - img)[:, :n_target])

        def tail(rows):
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])
            mods = tuple(tuple(pick(chunk) for chunk in mod) for mod in (mod_img, mod_txt))
            return self._blocks(pick(img0), pick(txt0), pick(vec), rope, n_target, start=1,
                                double_mod=mods)[:, :n_target]
        return cache.blend(compute, img0[:, :n_target], tail)

    def _blocks(self, img, txt, vec, rope, n_target: int | None, start: int = 0,
                double_mod: tuple | None = None) -> torch.Tensor:
        """`double_mod`: the double blocks' (image, text) modulations, when the caller computed them already."""
        mod_img, mod_txt = double_mod or (self.double_stream_modulation_img(vec),
                                          self.double_stream_modulation_txt(vec))
        for block in self.transformer_blocks[start:]:
            img, txt = self._call(block, img, txt, mod_img, mod_txt, rope)
        n_txt, n_img = txt.shape[1], img.shape[1]
        keep = slice(n_txt, n_txt + (n_img if n_target is None else n_target))
        x, mod = torch.cat([txt, img], dim=1), self.single_stream_modulation(vec)
        last = len(self.single_transformer_blocks) - 1
        for i, block in enumerate(self.single_transformer_blocks):
            # nothing reads the last block's text or reference outputs: they serve only as keys/values
            x = self._call(block, x, mod, rope, keep if i == last else slice(None))
        return x if last >= 0 else x[:, keep]

    @torch.no_grad()
    def shard_tensor_parallel(self) -> None:
        """Tensor parallelism over the process group (inference): each rank keeps 1/N of the heads and MLP
        channels of every block. q/k/v projections and SwiGLU inputs are column-parallel (the single blocks'
        fused q/k/v/gate/value projection reordered so a column split gives each rank whole heads and
        matching gate/value halves), output projections row-parallel (one all-reduce each)."""
        world, c = world_size(), self.config
        if c.num_heads % world or c.mlp_hidden % world:
            raise ValueError(f"tensor parallelism over {world} processes needs the head count ({c.num_heads}) and "
                             f"the MLP width ({c.mlp_hidden}) to be multiples of {world}")
        h, m = c.hidden_size, c.mlp_hidden
        for block in self.transformer_blocks:
            block.attn.heads //= world
            for ff in (block.ff, block.ff_context):
                ff.linear_in.weight.copy_(interleave_shards(ff.linear_in.weight, (m, m), world))
        for block in self.single_transformer_blocks:
            attn = block.attn
            attn.to_qkv_mlp_proj.weight.copy_(interleave_shards(attn.to_qkv_mlp_proj.weight, (h, h, h, m, m), world))
            attn.to_out.weight.copy_(interleave_shards(attn.to_out.weight, (h, m), world, dim=1))
            attn.heads, attn.hidden = attn.heads // world, h // world
        double = "transformer_blocks.*."
        shard_linears(self, colwise=[double + n for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                                          "attn.add_k_proj", "attn.add_v_proj", "ff.linear_in",
                                                          "ff_context.linear_in")]
                      + ["single_transformer_blocks.*.attn.to_qkv_mlp_proj"],
                      rowwise=[double + n for n in ("attn.to_out.0", "attn.to_add_out", "ff.linear_out",
                                                    "ff_context.linear_out")]
                      + ["single_transformer_blocks.*.attn.to_out"])
        self.tensor_parallel = True

    def _call(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timestep, guidance=None, *,
                ref: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None,
                cache: CachedStep | None = None) -> torch.Tensor:
        """Velocity of the target tokens (see the module docstring for the arguments; `cache`: a step cache
        that may skip all blocks but the first, see `run_cached`)."""
        n = img.shape[1]
        if ref is not None:
            if ref_ids is None:
                raise ValueError("reference tokens need their position ids (ref_ids)")
            img = torch.cat([img, ref.to(img.dtype)], 1)
            img_ids = torch.cat([img_ids, ref_ids.to(img_ids)], -2)
        img, txt, vec, rope = self.embed(img, img_ids, txt, txt_ids, timestep, guidance)
        out = self.run_blocks(img, txt, vec, rope, n) if cache is None else self.run_cached(cache, img, txt, vec, rope, n)
        return self.proj_out(self.norm_out(out, vec))


# ----------------------------------------------------------------------------- checkpoint formats

DIFFUSERS_PREFIXES = ("transformer.",)

# BFL name -> internal (= diffusers) name; block tables apply after `double_blocks.N.` / `single_blocks.N.`.
BFL_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.adaLN_modulation.1": "norm_out.linear", "final_layer.linear": "proj_out",
}
BFL_DOUBLE = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
}
BFL_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
# BFL's fused double-block projections and the internal pieces they concatenate, in order.
BFL_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BLOCK_LISTS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src:
            return dst
        if key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def bfl_key_to_internal(key: str) -> str | None:
    """One unfused BFL key (prefix stripped) -> internal name; None when unknown or fused (`*_attn.qkv`)."""
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", key)
    if m is None:
        return _rename(key, BFL_TOP)
    kind, idx, rest = m.groups()
    name = _rename(rest, BFL_DOUBLE if kind == "double_blocks" else BFL_SINGLE)
    return None if name is None else f"{_BLOCK_LISTS[kind]}.{idx}.{name}"


def internal_key_to_bfl(key: str) -> str | None:
    """Inverse of `bfl_key_to_internal` (the q/k/v pieces of fused projections have no BFL name)."""
    m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", key)
    if m is None:
        return _rename(key, _invert(BFL_TOP))
    kind, idx, rest = m.groups()
    double = kind == "transformer_blocks"
    name = _rename(rest, _invert(BFL_DOUBLE if double else BFL_SINGLE))
    return None if name is None else f"{'double_blocks' if double else 'single_blocks'}.{idx}.{name}"


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); ours is (scale, shift). The swap is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def dit_from_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL / ComfyUI FLUX.2 single-file keys -> internal state dict (fused q/k/v split, final halves swapped)."""
    sd = strip_first_prefix(sd, BFL_PREFIXES)
    out, unknown = {}, []
    for k, v in sd.items():
        m = re.match(r"double_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv)\.(weight)$", k)
        if m:
            idx, fused, param = m.groups()
            for piece, t in zip(BFL_FUSED[fused], v.chunk(3, dim=0)):
                out[f"transformer_blocks.{idx}.{piece}.{param}"] = t
            continue
        name = bfl_key_to_internal(k)
        if name is None:
            unknown.append(k)
            continue
        out[name] = swap_halves(v) if name == "norm_out.linear.weight" else v
    if unknown:
        raise ValueError(f"unknown keys in BFL FLUX.2 DiT checkpoint: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def dit_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal state dict -> BFL FLUX.2 single-file keys (q/k/v fused back)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(attn\.(?:to|add)_[qkv](?:_proj)?)\.weight$", k)
        if m:
            fused = next(f for f, parts in BFL_FUSED.items() if m.group(2) in parts)
            if m.group(2) == BFL_FUSED[fused][0]:
                parts = [sd[f"transformer_blocks.{m.group(1)}.{p}.weight"] for p in BFL_FUSED[fused]]
                out[f"double_blocks.{m.group(1)}.{fused}.weight"] = torch.cat(parts, 0)
            continue
        name = internal_key_to_bfl(k)
        if name is None:
            raise ValueError(f"cannot export {k!r} to BFL FLUX.2 key names")
        out[name] = swap_halves(v) if k == "norm_out.linear.weight" else v
    return out


def dit_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names are the internal ones: only a `transformer.` prefix goes."""
    return strip_first_prefix(sd, DIFFUSERS_PREFIXES)


def infer_dit_config(sd: dict[str, torch.Tensor]) -> Flux2DiTConfig:
    """Architecture from internal-named tensor shapes (width, heads, depths, channels, guidance)."""
    try:
        hidden, in_channels = sd["x_embedder.weight"].shape
        context_dim = sd["context_embedder.weight"].shape[1]
        out_channels = sd["proj_out.weight"].shape[0]
        timestep_dim = sd["time_guidance_embed.timestep_embedder.linear_1.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a FLUX.2 DiT state dict: missing {e.args[0]!r}") from None
    n_double = _count(sd, "transformer_blocks.")
    n_single = _count(sd, "single_transformer_blocks.")
    if n_double:
        head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        mlp_hidden = sd["transformer_blocks.0.ff.linear_out.weight"].shape[1]
    elif n_single:
        head_dim = sd["single_transformer_blocks.0.attn.norm_q.weight"].shape[0]
        mlp_hidden = sd["single_transformer_blocks.0.attn.to_out.weight"].shape[1] - hidden
    else:
        raise ValueError("not a FLUX.2 DiT state dict: no transformer blocks")
    return Flux2DiTConfig(
        in_channels=in_channels, out_channels=out_channels, hidden_size=hidden, num_heads=hidden // head_dim,
        num_double_blocks=n_double, num_single_blocks=n_single, context_dim=context_dim,
        mlp_ratio=mlp_hidden / hidden, guidance_embed="time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
        axes_dim=default_axes_dim(head_dim), timestep_dim=timestep_dim)


def _count(sd, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


def default_axes_dim(head_dim: int) -> tuple[int, int, int, int]:
    """FLUX.2 gives each of its 4 rotary axes a quarter of the head (32 each for head_dim 128)."""
    if head_dim % 8:
        raise ValueError(f"FLUX.2 head_dim must be a multiple of 8 (4 rotary axes of channel pairs), got {head_dim}")
    return (head_dim // 4,) * 4


# ----------------------------------------------------------------------------- table entry

# (hidden size, double blocks, single blocks, guidance embedder) of the releases; klein and klein-base share
# theirs (the base is undistilled)
RELEASES = {(3072, 5, 20, False): "[klein] 4B-like", (4096, 8, 24, False): "[klein] 9B-like",
            (6144, 8, 48, True): "[dev]-like"}


def variant_name(c: Flux2DiTConfig) -> str:
    key = (c.hidden_size, c.num_double_blocks, c.num_single_blocks, c.guidance_embed)
    return "FLUX.2 DiT, " + RELEASES.get(key, f"{c.num_double_blocks}+{c.num_single_blocks} blocks of width "
                                              f"{c.hidden_size}")


def detect(refs) -> str | None:
    """Modulation shared by all blocks (FLUX.1 modulates inside each block), in BFL's names (`*.lin`,
    `double_blocks.N.img_attn.qkv`) or diffusers' (`*.linear`, `transformer_blocks.N.attn.to_q`)."""
    keys = refs.keys()
    if has_key(keys, "double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight") and \
            has_prefix(keys, "double_blocks.", "single_blocks."):
        return "bfl"
    if has_key(keys, "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight") and \
            has_prefix(keys, "transformer_blocks.", "single_transformer_blocks."):
        return "diffusers"
    return None


_CONVERTERS = {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers}


def config_of(det: Detected) -> Flux2DiTConfig:
    """A detected DiT's architecture from tensor shapes alone (no weight is read)."""
    config = infer_dit_config(_CONVERTERS[det.format](meta_tensors(det)))
    config.theta = int((det.config or {}).get("rope_theta", config.theta))
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return config


def describe(det: Detected) -> dict:
    c = config_of(det)
    return {"hidden_size": c.hidden_size, "heads": c.num_heads, "double_blocks": c.num_double_blocks,
            "single_blocks": c.num_single_blocks, "context_dim": c.context_dim,
            "guidance_embedder": c.guidance_embed, "variant": variant_name(c)}


def build(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    """Scaled-fp8 scales and GGUF blocks stay as stored except on BFL's fused q/k/v, which are split (and so
    dequantized / folded once here)."""
    rename = bfl_key_to_internal if det.format == "bfl" else (lambda k: k)
    sd, quant, scales = load_dit_tensors(det, options, rename)
    return {"dit": assign(Flux2DiT, config_of(det), _CONVERTERS[det.format](sd), f"FLUX.2 DiT from {det.source}",
                          quantized=quant, scales=scales)}


FAMILIES = (Family("flux2-dit", "FLUX.2 DiT", detect, fills("dit"), build, bundle_prefixes=("model.diffusion_model.",),
                   low_precision_storage=True, pipeline="flux2", config=config_of, describe=describe),)
