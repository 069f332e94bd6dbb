"""Multi-device inference on torch.distributed: context (sequence) parallel attention, tensor-parallel linears.

Every process (one per device, started by `torchrun`) runs the whole pipeline on the same inputs: text
encoders, VAE and the sampling loop are replicated. Only a DiT's block stack is split: `run_split_blocks`
gives each rank a contiguous 1/N of the text tokens and 1/N of the image tokens, with their rotary rows,
and while the blocks run, `attention` (ops/attention.py) all-gathers the keys and values of every rank
before attending, so each rank's queries see the whole joint sequence (the all-gather form of context
parallelism; heads are not redistributed, so any head count and any N work). Attention is unchanged by
the order of its keys, so the ranks' [text, image] pieces are simply concatenated. The block stack's
image output is all-gathered too: every rank then holds bit-identical latents and the loop stays in step
with no other communication. Lengths that N does not divide are padded for the collective and the
padding is cut off again (`torch.tensor_split` sizes). A DiT takes part by calling its block stack through
`run_split_blocks` (text and image streams, rotary tables over [text, image]) and its joint attention
through ops/attention.py; nothing else in the model knows about the split.

Tensor parallelism (`shard_linears`) instead splits weights: column-parallel projections (each rank
computes its share of the heads / MLP channels) followed by row-parallel ones (partial products summed
by an all-reduce), with torch's DTensor styles (ColwiseParallel / RowwiseParallel). Which layers, and
how fused projections are reordered first (`interleave_shards`), is model knowledge: the model's method.

Not split (yet): attention masks (EliGen regions), per-block residuals (ControlNets) and attention
additions (IP-Adapter) are refused by the models under either mode. Inference only: the collectives
carry no gradients.

`setup(mode, device)` starts the process group from torchrun's environment (NCCL for CUDA devices,
gloo otherwise) and returns the rank's device; the state is process-wide, like the attention backend.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .names import PARALLEL_MODES

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_state: dict = {"group": None, "key_lengths": None}


# ----------------------------------------------------------------------------- process group

def check_mode(mode: str) -> None:
    """A supported parallel mode, checked before any work starts."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose from {PARALLEL_MODES}")


def setup(mode: str, device: str | torch.device) -> torch.device:
    """Join the torchrun process group (started here when not yet); "context" is enabled process-wide here,
    "tensor" is applied to a loaded model by its own method (FluxDiT.shard_tensor_parallel).

    Returns this rank's device: a bare "cuda" becomes cuda:LOCAL_RANK (one GPU per process).
    """
    check_mode(mode)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"parallel={mode!r} needs torch.distributed: start the processes with `torchrun "
                               f"--nproc-per-node N ...` (missing environment: {', '.join(missing)}), or call "
                               "torch.distributed.init_process_group yourself first")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if mode == "context":
        enable_context_parallel()
    return device


def enable_context_parallel(group: dist.ProcessGroup | None = None) -> None:
    """Split DiT block stacks over `group` (default: the whole world) from now on, in this process."""
    _state["group"] = group or dist.group.WORLD


def disable_context_parallel() -> None:
    _state["group"] = None


def context_parallel_enabled() -> bool:
    return _state["group"] is not None


def is_main_process() -> bool:
    """Rank 0, or no process group at all: the process that writes results."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group (at the end of a torchrun command). `wait_for_peers`: a barrier first, so that no
    rank tears the group down while another still uses it (rank 0 hosts the rendezvous store; leaving early made
    gloo abort a rank at exit, "terminate called without an active exception", about one run in six). Skip it after
    an error, where the other ranks may never reach the barrier."""
    disable_context_parallel()
    if dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shared_random_seed() -> int:
    """A random seed, the same on every rank (rank 0 draws it): all ranks must start from the same noise."""
    seed = random.SystemRandom().randrange(2**31)
    if not dist.is_initialized():
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- splitting a sequence

def split_sizes(length: int, world: int) -> list[int]:
    """Tokens of each rank for a sequence of `length` (torch.tensor_split's sizes: the first ranks get one
    more when `world` does not divide `length`)."""
    return [length // world + (r < length % world) for r in range(world)]


def _local(x: torch.Tensor, length: int, dim: int, world: int, rank: int) -> torch.Tensor:
    sizes = split_sizes(length, world)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _gather(x: torch.Tensor, lengths: Sequence[int], dim: int, group) -> torch.Tensor:
    """Concatenate along `dim` every rank's `x` (rank r's holds lengths[r] entries there)."""
    longest = max(lengths)
    if x.shape[dim] < longest:  # the collective needs equal shapes: pad, and cut the padding off below
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim)
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in lengths]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim)


def _split_rope(rope, n_txt: int, n_img: int, dim: int, world: int, rank: int):
    """This rank's rows of rotary tables over [text, image] (a tensor or a tuple of them, e.g. cos/sin)."""
    if isinstance(rope, (tuple, list)):
        return type(rope)(_split_rope(r, n_txt, n_img, dim, world, rank) for r in rope)
    txt, img = rope.narrow(dim, 0, n_txt), rope.narrow(dim, n_txt, n_img)
    return torch.cat([_local(txt, n_txt, dim, world, rank), _local(img, n_img, dim, world, rank)], dim)


def run_split_blocks(blocks: Callable, txt: torch.Tensor, img: torch.Tensor, rope, *, rope_dim: int = 0,
                     ) -> torch.Tensor:
    """`blocks(txt, img, rope) -> image tokens`, the block stack of a FLUX-family DiT, on this rank's share.

    txt (B, L, C) and img (B, N, C) are the two token streams; `rope` holds the rotary tables of the joint
    sequence [text, image] along `rope_dim`. Without context parallelism this is just the call. With it,
    each rank runs the blocks on its slices (attention gathers keys/values, see the module docstring) and
    the image tokens of all ranks are gathered back: every rank returns the full (B, N, C) output.
    """
    group = _state["group"]
    if group is None:
        return blocks(txt, img, rope)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_txt, n_img = txt.shape[1], img.shape[1]
    if n_img < world:  # a rank without image tokens would have nothing to compute its output from
        raise ValueError(f"{n_img} image tokens cannot be split over {world} processes: use a larger image "
                         "or fewer processes")
    local_rope = _split_rope(rope, n_txt, n_img, rope_dim, world, rank)
    with _attending(list(map(sum, zip(split_sizes(n_txt, world), split_sizes(n_img, world))))):
        out = blocks(_local(txt, n_txt, 1, world, rank), _local(img, n_img, 1, world, rank), local_rope)
    return _gather(out, split_sizes(n_img, world), 1, group)


@contextmanager
def _attending(key_lengths: list[int]) -> Iterator[None]:
    """While the split blocks run: attention gathers keys/values, rank r holding key_lengths[r] tokens."""
    previous, _state["key_lengths"] = _state["key_lengths"], key_lengths
    try:
        yield
    finally:
        _state["key_lengths"] = previous


def splitting_attention() -> bool:
    """True inside `run_split_blocks`' block stack: attention must see every rank's keys and values."""
    return _state["key_lengths"] is not None


def gather_keys_values(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, heads, L_rank, D) of this rank -> those of the whole sequence, in one collective."""
    if k.requires_grad or v.requires_grad:
        raise RuntimeError("context parallel attention is inference-only (its all-gather carries no gradients)")
    both = _gather(torch.stack([k, v]), _state["key_lengths"], 3, _state["group"])
    return both[0], both[1]


# ----------------------------------------------------------------------------- tensor parallel

def interleave_shards(t: torch.Tensor, parts: Sequence[int], world: int, dim: int = 0) -> torch.Tensor:
    """Reorder `t`, made of consecutive parts of sizes `parts` along `dim` (a fused q/k/v(/mlp) projection),
    so that its r-th of `world` equal chunks holds the r-th slice of every part: split column-wise, each
    rank then gets its own heads' q, k and v (and MLP channels) instead of a run of q rows."""
    if sum(parts) != t.shape[dim] or any(p % world for p in parts):
        raise ValueError(f"cannot split parts {list(parts)} of a {t.shape[dim]}-wide dimension over {world} ranks")
    pieces = [part.chunk(world, dim) for part in t.split(list(parts), dim)]
    return torch.cat([piece[r] for r in range(world) for piece in pieces], dim)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shard_linears(model: torch.nn.Module, colwise: Sequence[str], rowwise: Sequence[str]) -> None:
    """Split the named linear layers of `model` over the process group (names may hold `*` for a block
    index): `colwise` ones by output features (their outputs stay local), `rowwise` ones by input features
    (their outputs are all-reduced, so every rank continues with the full activation)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    if not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed: run under `torchrun --nproc-per-node N`")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    plan = {**{name: ColwiseParallel() for name in colwise}, **{name: RowwiseParallel() for name in rowwise}}
    parallelize_module(model, mesh, plan)
