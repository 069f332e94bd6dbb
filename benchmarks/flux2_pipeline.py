"""FLUX.2 [klein] generation end to end on CPU: ours (Flux2ImagePipeline) vs diffusers' Flux2KleinPipeline.

Both load the same klein-style folder in diffusers' layout with random weights (diffsynth.testing.tiny_flux2):
a mid-size DiT (2 double + 4 single blocks, width 768 = 6 heads x 128, FLUX.2's 4 x 32 rotary axes), the tiny
Qwen3 text encoder and FLUX.2 VAE. 512x512 px (1024 image tokens), 4 steps, fp32, the same seed (diffusers
gets our initial noise as `latents`), so the images agree (max |pixel diff| printed, checked <= 2/255).
Latency: both pipelines in one process, alternating runs; the ratio is the median of the per-run pairs.
Peak memory: a fresh process per pipeline (peak RSS during load + generation minus the RSS before loading).

    python benchmarks/flux2_pipeline.py   (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, MEMORY_ENV, compare, emit, interleaved, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402,E501

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
SIZE, STEPS, REPS = (64, 2, 2) if SMOKE else (512, 4, 4)
DIT = {} if SMOKE else dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=6,
                            axes_dims_rope=(32, 32, 32, 32))
PROMPT, SEED = "a red cat on a sofa", 7
TOLERANCE = 2 / 255


def load(impl: str, root: Path):
    import torch
    if impl == "diffusers":
        from diffusers import Flux2KleinPipeline
        return Flux2KleinPipeline.from_pretrained(str(root), dtype=torch.float32)
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig
    return Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(root / "text_encoder")), ModelConfig(path=str(root / "transformer")),
        ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors"))])


def generate(impl: str, pipe):
    """(3, H, W) image in [0, 1]."""
    import torch
    if impl == "diffusers":  # our pipeline's noise for this seed: (1, 128, H/16, W/16) drawn on the CPU
        noise = torch.randn(1, 128, SIZE // 16, SIZE // 16, generator=torch.Generator("cpu").manual_seed(SEED))
        return pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=1.0,
                    latents=noise, output_type="pt").images[0]
    return pipe(PROMPT, height=SIZE, width=SIZE, seed=SEED, num_inference_steps=STEPS, output_type="pt",
                progress_bar_cmd=lambda x: x)[0]


def worker(kind: str, root: str, impl: str = "") -> None:
    import torch
    root = Path(root)
    with torch.inference_mode():
        if kind == "latency":
            pipes = {i: load(i, root) for i in ("diffusers", "ours")}
            fns = {i: (lambda i=i: generate(i, pipes[i])) for i in pipes}
            diff = (fns["diffusers"]() - fns["ours"]()).abs().max().item()
            emit({"times": interleaved(fns, REPS), "max_abs_diff": diff})
        else:
            reset_peak_rss()
            before = rss_mb()
            generate(impl, load(impl, root))
            emit({"peak_mb": peak_growth_mb(before)})


@dataclass
class Flux2PipelineResult:
    run: Comparison          # diff: max |pixel difference| in [0, 1]
    reference_peak_mb: float  # peak RSS growth over loading + one generation, fresh process
    ours_peak_mb: float


def main() -> Flux2PipelineResult:
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    with tempfile.TemporaryDirectory() as tmp:
        root = build_tiny_flux2(Path(tmp) / "FLUX.2-klein", **DIT)
        lat = run_worker(__file__, "latency", str(root))
        mem = {i: run_worker(__file__, "memory", str(root), i, env=MEMORY_ENV)["peak_mb"] for i in ("diffusers", "ours")}
    case = f"{SIZE}px-{STEPS}steps"
    result = Flux2PipelineResult(compare(case, lat["times"], lat["max_abs_diff"]), mem["diffusers"], mem["ours"])
    if result.run.diff > TOLERANCE:
        raise AssertionError(f"images differ by {result.run.diff * 255:.2f}/255 (more than 2/255)")
    r = result.run
    print(f"FLUX.2 [klein]-style pipeline end to end, CPU fp32 (DiT {DIT or 'tiny'}), median of {REPS} "
          "alternating runs")
    print(table([[r.case, f"{r.reference_ms:.0f}", f"{r.ours_ms:.0f}", f"{r.ratio:.2f}", f"{r.diff * 255:.2f}/255",
                  f"{result.reference_peak_mb:.0f}", f"{result.ours_peak_mb:.0f}"]],
                ["case", "diffusers ms", "ours ms", "ours/diffusers (median of pairs)", "max |pixel diff|",
                 "diffusers peak MB", "ours peak MB"]))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
