"""Start N local processes the way `torchrun --nproc-per-node N` does (tests and CPU smoke runs).

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) on a free
port of 127.0.0.1 and gloo is held to the loopback interface, so nothing leaves the machine. Starting
the processes directly saves the launcher's own start-up (several seconds on a small machine).
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def launch_local(argv: list[str], nprocs: int = 2, timeout: float = 120.0) -> list[RankResult]:
    """Run `argv` as ranks 0..nprocs-1 of one job; returns each rank's exit code and output (stdout and
    stderr together). A job still running after `timeout` seconds is killed and raises TimeoutError."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    port = free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(nprocs)]  # files, not pipes: a full pipe would stall a rank
    procs = [subprocess.Popen(argv, env=rank_env(r, nprocs, port), stdout=log, stderr=subprocess.STDOUT, text=True)
             for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise TimeoutError(f"{' '.join(argv)} with {nprocs} processes ran past {timeout} s") from None
    finally:
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return [RankResult(r, p.returncode, out) for r, (p, out) in enumerate(zip(procs, outputs))]


def tiny_flux2_outputs() -> tuple:
    """The tiny FLUX.2 DiT on fixed inputs (7 text, 15 target and 6 reference tokens), in this process's group:
    (plain, context parallel, tensor parallel) outputs."""
    import torch
    from ..models.flux2_dit import Flux2DiT, infer_dit_config
    from ..ops import parallel
    from .tiny_flux2 import tiny_flux2_dit_state_dict
    sd = tiny_flux2_dit_state_dict()
    dit = Flux2DiT(infer_dit_config(sd)).eval()
    dit.load_state_dict(sd)
    c, g = dit.config, torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 8, (1, n, 4), generator=g).float()  # noqa: E731
    inputs = dict(img=torch.randn(1, 15, c.in_channels, generator=g), img_ids=ids(15),
                  txt=torch.randn(1, 7, c.context_dim, generator=g), txt_ids=ids(7), timestep=torch.full((1,), 0.6),
                  ref=torch.randn(1, 6, c.in_channels, generator=g), ref_ids=ids(6))
    with torch.no_grad():
        plain = dit(**inputs)
        parallel.enable_context_parallel()
        context = dit(**inputs)
        parallel.disable_context_parallel()
        dit.shard_tensor_parallel()
        tensor = dit(**inputs)
    return plain, context, tensor
