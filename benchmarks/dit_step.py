"""DiT step latency and peak memory on CPU: ours vs diffusers' FluxTransformer2DModel, same random weights.

Mid-size FLUX config: 2 double + 4 single blocks, width 768 (6 heads x 128), 1024 image tokens
(a 512x512 image) + 512 text tokens, batch 1, fp32 and bf16. Latency: both models in one process,
measured in rotating order (the ratio of each pair, so load from other processes affects both alike).
A third column times our model with its GEMMs the other way than this CPU's default (diffsynth.ops.linear:
oneDNN directly on AVX-512 CPUs, ATen/MKL as diffusers' elsewhere), separating the kernel choice from the
model code. Peak memory: a fresh process per model and dtype; the
growth of RSS during one step over the RSS with the model loaded (activations and temporaries; the
weights are the same for both).

    python benchmarks/dit_step.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MEMORY_ENV, MID_DIT, emit, interleaved, median, pair_ratio, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402,E501

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"  # tiny sizes (compile_cpu.py's smoke run uses them)
TOKENS, TEXT = (16, 8) if SMOKE else (1024, 512)
MID_DIT = dict(MID_DIT, hidden_size=256, num_heads=2, num_double_blocks=1, num_single_blocks=1, context_dim=32,
               pooled_dim=32) if SMOKE else MID_DIT
REPS = 6


def build(impl: str, dtype):
    import torch
    from diffusers import FluxTransformer2DModel
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=MID_DIT["num_double_blocks"],
        num_single_layers=MID_DIT["num_single_blocks"], attention_head_dim=128, num_attention_heads=MID_DIT["num_heads"],
        joint_attention_dim=MID_DIT["context_dim"], pooled_projection_dim=MID_DIT["pooled_dim"], guidance_embeds=True,
        axes_dims_rope=MID_DIT["axes_dim"]).eval().requires_grad_(False)
    if impl == "diffusers":
        return ref.to(dtype)
    ours = FluxDiT(FluxDiTConfig(**MID_DIT)).eval().requires_grad_(False)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()))
    del ref
    return ours.to(dtype)


def runner(impl: str, model, dtype):
    import torch
    from diffsynth.models.flux_dit import image_ids
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, TOKENS, 64, generator=g).to(dtype)
    txt = torch.randn(1, TEXT, MID_DIT["context_dim"], generator=g).to(dtype)
    pooled = torch.randn(1, MID_DIT["pooled_dim"], generator=g).to(dtype)
    side = int(TOKENS ** 0.5) * 2
    img_ids, txt_ids = image_ids(side, side), torch.zeros(1, TEXT, 3)
    t, guidance = torch.tensor([0.5]), torch.tensor([3.5])
    if impl == "diffusers":
        return lambda: model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                             timestep=t.to(dtype), img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance.to(dtype),
                             return_dict=False)[0]
    return lambda: model(x, img_ids, txt, txt_ids, t, pooled, guidance)


def with_other_gemm(fn):
    """Our model with its CPU GEMMs the other way than the default (oneDNN directly vs ATen/MKL)."""
    from diffsynth.ops.linear import onednn_linear_enabled, set_onednn_linear
    default = onednn_linear_enabled()

    def run():
        set_onednn_linear(not default)
        try:
            return fn()
        finally:
            set_onednn_linear(default)
    return run


def worker(kind: str, dtype_name: str, impl: str = "") -> None:
    import torch
    from diffsynth.ops.linear import onednn_linear_enabled
    torch.set_num_threads(torch.get_num_threads())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.inference_mode():
        if kind == "latency":
            models = {i: build(i, dtype) for i in ("diffusers", "ours")}
            fns = {i: runner(i, m, dtype) for i, m in models.items()}
            fns["ours-other"] = with_other_gemm(fns["ours"])
            a, b = fns["diffusers"](), fns["ours"]()
            max_diff = (a.float() - b.float()).abs().max().item()
            for i in fns.values():
                i()
            emit({"times": interleaved(fns, REPS), "max_abs_diff": max_diff, "onednn": onednn_linear_enabled()})
        else:
            model = build(impl, dtype)
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            fn = runner(impl, model, dtype)
            fn()  # first call: lazy initialisation, kernels
            reset_peak_rss()
            before = rss_mb()
            fn()
            emit({"peak_mb": peak_growth_mb(before), "weights_mb": weights})


def main() -> None:
    rows, default = [], "ATen/MKL"
    for dtype in ("fp32", "bf16"):
        lat = run_worker(__file__, "latency", dtype)
        d, o, other = (lat["times"][k] for k in ("diffusers", "ours", "ours-other"))
        default = "oneDNN" if lat["onednn"] else "ATen/MKL"
        ratio, ratio_other = pair_ratio(d, o), pair_ratio(d, other)
        mem = {i: run_worker(__file__, "memory", dtype, i, env=MEMORY_ENV) for i in ("diffusers", "ours")}
        rows.append([dtype, f"{median(d) * 1000:.0f}", f"{median(o) * 1000:.0f}", f"{ratio:.2f}",
                     f"{ratio_other:.2f}", f"{mem['diffusers']['peak_mb']:.0f}", f"{mem['ours']['peak_mb']:.0f}",
                     f"{mem['ours']['peak_mb'] / mem['diffusers']['peak_mb']:.2f}",
                     f"{mem['ours']['weights_mb']:.0f}", f"{lat['max_abs_diff']:.1e}"])
    print(f"DiT step, CPU ({MID_DIT['num_double_blocks']}+{MID_DIT['num_single_blocks']} blocks, width "
          f"{MID_DIT['hidden_size']}, {TOKENS}+{TEXT} tokens, median of {REPS} rotating reps; our GEMMs on "
          f"{default} by default)")
    print(table(rows, ["dtype", "diffusers ms", "ours ms", "ours/diffusers (median of pairs)",
                       f"same, our GEMMs on {'ATen/MKL' if default == 'oneDNN' else 'oneDNN'}", "diffusers step peak MB", "ours step peak MB", "peak ratio",
                       "weights MB", "max |diff|"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
