"""Time to first image: a fresh process imports, loads a model folder, generates one image and saves it; ours vs
diffusers, CPU fp32.

Two folders in diffusers' layout with random weights: the tiny FLUX.1-dev one of `pipeline_e2e.py` and the
mid-size FLUX.2 [klein]-style one of `flux2_pipeline.py` (their loaders and calls are reused: same files, seed and
noise, so both sides draw the same picture). 512x512 px, 4 steps. Each round starts one process per side, in
alternating order, and times it from the parent (interpreter start to the saved PNG: what a user waits for); the
ratio is the median of the per-round pairs. Peak RSS: the child's own high-water mark (VmHWM). One untimed round
first puts the files in the page cache (not in the smoke run).

    python benchmarks/first_image.py   (DIFFSYNTH_BENCH_SMOKE=1: 64 px, 2 steps, one round, for the test suite)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import Comparison, compare, emit, peak_rss_mb, run_worker, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
SIZE, STEPS, ROUNDS = (64, 2, 1) if SMOKE else (512, 4, 3)
IMPLS = ("diffusers", "ours")


def first_image(family: str, root: Path, impl: str, out: Path) -> None:
    """Load `root` with `impl`'s pipeline, generate one image, save it as `out` (PNG)."""
    import torch
    from PIL import Image
    with torch.inference_mode():
        if family == "flux1":
            import pipeline_e2e as bench
            case = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, cfg_scale=1.0)
            image = bench.generate(impl, bench.load(impl, root), case)  # (H, W, 3) in [0, 1]
        else:
            import flux2_pipeline as bench
            image = bench.generate(impl, bench.load(impl, root)).permute(1, 2, 0)
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().numpy()).save(out)


def worker(family: str, root: str, impl: str, out: str) -> None:
    first_image(family, Path(root), impl, Path(out))
    emit({"peak_mb": peak_rss_mb()})


def timed_run(family: str, root: Path, impl: str, out: Path) -> tuple[float, float]:
    """(seconds from process start to the saved image, the process's peak RSS in MB)."""
    start = time.perf_counter()
    peak = run_worker(__file__, family, str(root), impl, str(out))["peak_mb"]
    return time.perf_counter() - start, peak


@dataclass
class FirstImageRow:
    family: str
    run: Comparison  # ms from process start to the saved PNG; diff: max |pixel difference| of the PNGs, in [0, 1]
    reference_peak_mb: float
    ours_peak_mb: float


def measure(family: str, root: Path, tmp: Path) -> FirstImageRow:
    import numpy as np
    from PIL import Image
    outs = {i: tmp / f"{family}-{i}.png" for i in IMPLS}
    for impl in () if SMOKE else IMPLS:  # page cache, compiled kernels' caches
        timed_run(family, root, impl, outs[impl])
    times: dict[str, list[float]] = {i: [] for i in IMPLS}
    peaks: dict[str, list[float]] = {i: [] for i in IMPLS}
    for r in range(ROUNDS):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            seconds, peak = timed_run(family, root, impl, outs[impl])
            times[impl].append(seconds)
            peaks[impl].append(peak)
    pictures = [np.asarray(Image.open(outs[i]), dtype=np.int16) for i in IMPLS]
    diff = float(np.abs(pictures[0] - pictures[1]).max()) / 255
    return FirstImageRow(family, compare(f"{SIZE}px-{STEPS}steps", times, diff), max(peaks["diffusers"]),
                         max(peaks["ours"]))


def main() -> list[FirstImageRow]:
    import flux2_pipeline
    from diffsynth.testing import build_tiny_flux
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {"flux1": build_tiny_flux(tmp / "FLUX.1-dev"),
                   "flux2": build_tiny_flux2(tmp / "FLUX.2-klein", **flux2_pipeline.DIT)}
        rows = [measure(family, root, tmp) for family, root in folders.items()]
    print(f"Time to first image (fresh process: imports, load, one {SIZE}px {STEPS}-step image, PNG saved), CPU "
          f"fp32, median of {ROUNDS} alternating rounds")
    print(table([[r.family, r.run.case, f"{r.run.reference_ms:.0f}", f"{r.run.ours_ms:.0f}", f"{r.run.ratio:.2f}",
                  f"{r.run.diff * 255:.0f}/255", f"{r.reference_peak_mb:.0f}", f"{r.ours_peak_mb:.0f}"] for r in rows],
                ["folder", "case", "diffusers ms", "ours ms", "ours/diffusers (median of pairs)", "max |PNG diff|",
                 "diffusers peak RSS MB", "ours peak RSS MB"]))
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
