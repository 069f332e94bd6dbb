"""VAE decode latency and peak memory on CPU: ours vs diffusers' AutoencoderKL, full-size FLUX VAE.

The FLUX.1 VAE config (128/256/512/512 channels, 16 latent channels) with random weights, decoding one
64x64 latent (a 512x512 image) in fp32. Latency: both in one process, alternating (median of the
per-pair ratios). Peak memory: a fresh process per implementation; the growth of RSS during one decode
over the RSS with the model loaded.

    python benchmarks/vae_decode.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MEMORY_ENV, emit, interleaved, median, pair_ratio, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402,E501

SIDE = 512
REPS = 3


def build(impl: str):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    z = torch.randn(1, 16, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(1))
    if impl == "diffusers":
        return lambda: ref.decode(z).sample
    from diffsynth.models.flux_vae import FluxVAEDecoder, vae_from_diffusers
    decoder = FluxVAEDecoder().eval()
    decoder.load_state_dict(vae_from_diffusers(ref.state_dict())[1])
    c = decoder.config  # ours takes normalized latents: the same decoder input as diffusers' z
    return lambda: decoder((z - c.shift_factor) * c.scaling_factor)


def worker(kind: str, impl: str = "") -> None:
    import torch
    with torch.inference_mode():
        if kind == "latency":
            fns = {i: build(i) for i in ("diffusers", "ours")}
            a, b = fns["diffusers"](), fns["ours"]()
            rel = ((a - b).abs().max() / a.abs().max()).item()
            times = interleaved(fns, REPS)
            emit({"times": times, "max_rel_diff": rel})
        else:
            fn = build(impl)
            fn()
            reset_peak_rss()
            before = rss_mb()
            fn()
            emit({"peak_mb": peak_growth_mb(before)})


def main() -> None:
    lat = run_worker(__file__, "latency")
    mem = {i: run_worker(__file__, "memory", i, env=MEMORY_ENV)["peak_mb"] for i in ("diffusers", "ours")}
    d, o = lat["times"]["diffusers"], lat["times"]["ours"]
    print(f"VAE decode, CPU fp32, full-size FLUX VAE, {SIDE}x{SIDE} image (median of {REPS} alternating reps)")
    print(table([[f"{median(d):.2f}", f"{median(o):.2f}", f"{pair_ratio(d, o):.2f}",
                  f"{mem['diffusers']:.0f}", f"{mem['ours']:.0f}", f"{mem['ours'] / mem['diffusers']:.2f}",
                  f"{lat['max_rel_diff']:.1e}"]],
                ["diffusers s", "ours s", "ours/diffusers", "diffusers peak MB", "ours peak MB", "peak ratio",
                 "max rel diff"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
