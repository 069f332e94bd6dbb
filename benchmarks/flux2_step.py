"""FLUX.2 DiT step latency and peak memory on CPU: ours vs diffusers' Flux2Transformer2DModel, same random weights.

Mid-size FLUX.2 config: 2 double + 4 single blocks, width 768 (6 heads x 128), klein-4B's text width (7680 =
3 stacked Qwen3 layers), 1024 image tokens (a 512x512 image) + 512 text tokens, batch 1, fp32 and bf16; and the
same with one 512x512 reference image (editing: 1024 more image tokens, dropped from the output). Latency: both
models in one process, called in alternating order (the ratio of each pair, so load from other processes affects
both alike). Peak memory: a fresh process per model and dtype; the growth of RSS during one step over the RSS
with the model loaded (activations and temporaries; the weights are the same for both).

    python benchmarks/flux2_step.py [fp32] [bf16]   (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, MEMORY_ENV, compare, emit, interleaved, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402,E501

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
SIDE, TEXT, REPS = (4, 8, 2) if SMOKE else (32, 512, 6)  # packed latent side: 32 -> 1024 tokens (512 px)
CONFIG = dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=128,
              num_attention_heads=6, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
              rope_theta=2000, guidance_embeds=False)
if SMOKE:
    CONFIG.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4))


def build(impl: str, dtype):
    import torch
    from diffusers import Flux2Transformer2DModel
    from diffsynth.models.flux2_dit import Flux2DiT, infer_dit_config
    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**CONFIG).eval().requires_grad_(False)
    with torch.no_grad():  # random everywhere (diffusers leaves norms at one)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if impl == "diffusers":
        return ref.to(dtype)
    sd = ref.state_dict()
    ours = Flux2DiT(infer_dit_config(sd)).eval().requires_grad_(False)
    ours.load_state_dict(sd)
    del ref
    return ours.to(dtype)


def grid_ids(t: int, side: int):
    import torch
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1).reshape(1, -1, 4).float()


def runner(impl: str, model, dtype, refs: int):
    import torch
    g = torch.Generator().manual_seed(1)
    n = SIDE * SIDE
    x = torch.randn(1, n, 128, generator=g).to(dtype)
    ref = torch.randn(1, refs * n, 128, generator=g).to(dtype)
    txt = torch.randn(1, TEXT, CONFIG["joint_attention_dim"], generator=g).to(dtype)
    img_ids, ref_ids = grid_ids(0, SIDE), torch.cat([grid_ids(10 * (i + 1), SIDE) for i in range(refs)] or
                                                    [torch.zeros(1, 0, 4)], 1)
    txt_ids = torch.stack([torch.zeros(TEXT)] * 3 + [torch.arange(TEXT).float()], -1)[None]
    t = torch.tensor([0.5])
    if impl == "diffusers":  # as Flux2KleinPipeline calls it: references appended, output cut to the target
        hidden, ids = torch.cat([x, ref], 1), torch.cat([img_ids, ref_ids], 1)
        return lambda: model(hidden_states=hidden, encoder_hidden_states=txt, timestep=t.to(dtype), img_ids=ids,
                             txt_ids=txt_ids, guidance=None, return_dict=False)[0][:, :n]
    if refs:
        return lambda: model(x, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
    return lambda: model(x, img_ids, txt, txt_ids, t)


def worker(kind: str, dtype_name: str, refs: str, impl: str = "") -> None:
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.inference_mode():
        if kind == "latency":
            fns = {i: runner(i, build(i, dtype), dtype, int(refs)) for i in ("diffusers", "ours")}
            a, b = fns["diffusers"](), fns["ours"]()
            rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
            emit({"times": interleaved(fns, REPS), "rel_diff": rel})
        else:
            model = build(impl, dtype)
            fn = runner(impl, model, dtype, int(refs))
            fn()  # first call: lazy initialisation, kernels
            reset_peak_rss()
            before = rss_mb()
            fn()
            emit({"peak_mb": peak_growth_mb(before)})


@dataclass
class Flux2Row:
    references: int
    dtype: str
    step: Comparison         # diff: relative L2 difference of the velocities
    reference_peak_mb: float  # RSS growth during one step, fresh process
    ours_peak_mb: float


def main(dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Flux2Row]:
    results = []
    cases = [("1", "fp32")] if SMOKE else [(r, d) for r in ("0", "1") for d in dtypes]
    for refs, dtype in cases:
        lat = run_worker(__file__, "latency", dtype, refs)
        mem = {i: run_worker(__file__, "memory", dtype, refs, i, env=MEMORY_ENV)["peak_mb"]
               for i in ("diffusers", "ours")}
        results.append(Flux2Row(int(refs), dtype, compare(f"{refs} reference image(s)", lat["times"], lat["rel_diff"]),
                                mem["diffusers"], mem["ours"]))
    rows = [[r.step.case, r.dtype, f"{r.step.reference_ms:.0f}", f"{r.step.ours_ms:.0f}", f"{r.step.ratio:.2f}",
             f"{r.reference_peak_mb:.0f}", f"{r.ours_peak_mb:.0f}",
             f"{r.ours_peak_mb / max(r.reference_peak_mb, 1e-3):.2f}", f"{r.step.diff:.1e}"] for r in results]
    print(f"FLUX.2 DiT step, CPU ({CONFIG['num_layers']}+{CONFIG['num_single_layers']} blocks, width "
          f"{CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']}, {SIDE * SIDE}+{TEXT} tokens, "
          f"median of {REPS} alternating reps)")
    print(table(rows, ["case", "dtype", "diffusers ms", "ours ms", "ours/diffusers (median of pairs)",
                       "diffusers step peak MB", "ours step peak MB", "peak ratio", "relative diff"]))
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main(tuple(sys.argv[1:]) or ("fp32", "bf16"))
