"""End-to-end generation on the tiny random FLUX.1-dev folder: ours vs diffusers' FluxPipeline (CPU, fp32).

Both pipelines load the same files (diffusers' one is built as in tests/test_pipeline.py) and get the
same noise and sigmas, so the images agree (max |diff| is printed). Latency: alternating runs in one
process. Peak memory: a fresh process per pipeline (peak RSS minus the RSS before loading).

    python benchmarks/pipeline_e2e.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import MEMORY_ENV, emit, interleaved, median, pair_ratio, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402

CASES = {"512px-10steps": dict(height=512, width=512, num_inference_steps=10, cfg_scale=1.0),
         "512px-10steps-cfg": dict(height=512, width=512, num_inference_steps=10, cfg_scale=2.5)}
PROMPT, NEGATIVE, SEED, T5_LEN = "a red cat on a sofa", "blurry dog", 7, 128
REPS = 4


def load(impl: str, root: Path):
    import torch
    if impl == "diffusers":
        from test_pipeline import diffusers_pipeline
        return diffusers_pipeline(root)
    from diffsynth import FluxImagePipeline, ModelConfig
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(root / p)) for p in
        ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")])


def generate(impl: str, pipe, case: dict):
    import torch
    from diffsynth.models.flux_dit import patchify
    from diffsynth.schedulers.flow_match import flux_sigmas
    h, w, steps, cfg = case["height"], case["width"], case["num_inference_steps"], case["cfg_scale"]
    if impl == "diffusers":
        noise = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(SEED))
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=cfg, guidance_scale=3.5, height=h,
                   width=w, num_inference_steps=steps, sigmas=flux_sigmas(steps).numpy(), latents=patchify(noise),
                   max_sequence_length=T5_LEN, output_type="np").images[0]
        return torch.from_numpy(out)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=cfg, embedded_guidance=3.5, height=h, width=w,
               num_inference_steps=steps, seed=SEED, t5_sequence_length=T5_LEN, output_type="pt",
               progress_bar_cmd=lambda x: x)
    return out[0].permute(1, 2, 0)


def worker(kind: str, root: str, impl: str = "") -> None:
    import torch
    root = Path(root)
    with torch.inference_mode():
        if kind == "latency":
            pipes = {i: load(i, root) for i in ("diffusers", "ours")}
            result = {}
            for name, case in CASES.items():
                fns = {i: (lambda i=i: generate(i, pipes[i], case)) for i in pipes}
                diff = (fns["diffusers"]() - fns["ours"]()).abs().max().item()
                times = interleaved(fns, REPS)
                result[name] = {"times": times, "max_abs_diff": diff}
            emit(result)
        else:
            reset_peak_rss()
            before = rss_mb()
            pipe = load(impl, root)
            for case in CASES.values():
                generate(impl, pipe, case)
            emit({"peak_mb": peak_growth_mb(before)})


def main() -> None:
    from diffsynth.testing import build_tiny_flux
    with tempfile.TemporaryDirectory() as tmp:
        root = build_tiny_flux(Path(tmp) / "FLUX.1-dev")
        lat = run_worker(__file__, "latency", str(root))
        mem = {i: run_worker(__file__, "memory", str(root), i, env=MEMORY_ENV)["peak_mb"] for i in ("diffusers", "ours")}
    rows = []
    for name, r in lat.items():
        d, o = r["times"]["diffusers"], r["times"]["ours"]
        rows.append([name, f"{median(d) * 1000:.0f}", f"{median(o) * 1000:.0f}",
                     f"{pair_ratio(d, o):.2f}", f"{r['max_abs_diff']:.1e}"])
    print(f"Tiny FLUX.1-dev pipeline end to end, CPU fp32, T5 length {T5_LEN}, median of {REPS} alternating runs")
    print(table(rows, ["case", "diffusers ms", "ours ms", "ours/diffusers", "max |pixel diff|"]))
    print(f"peak RSS over both cases: diffusers {mem['diffusers']:.0f} MB, ours {mem['ours']:.0f} MB "
          f"(ratio {mem['ours'] / mem['diffusers']:.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
