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
