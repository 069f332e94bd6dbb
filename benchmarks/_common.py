"""Shared helpers of the benchmark scripts: fresh-process workers, timing, peak memory."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
MID_DIT = dict(hidden_size=768, num_heads=6, num_double_blocks=2, num_single_blocks=4, context_dim=4096,
               pooled_dim=768, axes_dim=(16, 56, 56))


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_growth_mb(before: float) -> float:
    """How far the RSS peak of the window opened by `reset_peak_rss()` rose above `before` (the RSS read when it
    opened). The window's peak includes its start: the kernel's lazily summed RSS counters can report a peak a few
    KB below the RSS read just after the reset, which must not come out as a negative growth."""
    return max(peak_rss_mb(), before) - before


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include the parent's across fork+exec)."""
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_page_cache(path) -> None:
    """Read a file once (in chunks, nothing kept) so that timed loads read it from the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def timed(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> list[float]:
    """Seconds per call for `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn `reps` rounds with the order rotating every round
    (alternating for two), so changes in the machine's load affect all of them alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            times[n] += timed(fns[n], warmup=0, reps=1)
    return times


def pair_ratio(ref: list[float], ours: list[float]) -> float:
    """Median over rounds of ours/ref: the ratio each round measured side by side."""
    return median([b / a for a, b in zip(ref, ours)])


@dataclass
class Comparison:
    """One side-by-side row: median milliseconds of the reference (diffusers) and of ours, the median of the
    per-round ratios ours/reference, and how far the two outputs differ (each script says which measure)."""
    case: str
    reference_ms: float
    ours_ms: float
    ratio: float
    diff: float


def compare(case: str, times: dict[str, list[float]], diff: float, reference: str = "diffusers") -> Comparison:
    """The Comparison of `times` (seconds per round, from `interleaved`) of `reference` and "ours"."""
    ref, ours = times[reference], times["ours"]
    return Comparison(case, median(ref) * 1000, median(ours) * 1000, pair_ratio(ref, ours), diff)


# For memory measurements: every buffer of 64 KiB or more gets its own mapping and is returned to the OS
# when freed, so RSS follows the bytes of live tensors instead of what glibc's heap keeps cached.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(script: str, *args: str, timeout: int = 1800, env: dict | None = None) -> dict:
    """Run `python script --worker args...` in a fresh interpreter; it prints one JSON line last."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {script} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])
