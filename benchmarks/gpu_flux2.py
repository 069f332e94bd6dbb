"""FLUX.2 [klein] DiT on one CUDA GPU with random weights, bf16: ours vs diffusers' Flux2Transformer2DModel.

Full-size klein-4B and klein-9B transformers (widths and depths of the released configs), a 1024x1024 image
(4096 tokens) and 512 text tokens, batch 1: text-to-image, and editing with one 1024x1024 reference image (4096
more tokens, cut from the output as both pipelines do). Both models hold the same weights; each pair of forward
passes is timed side by side in alternating order (the ratio is the median of the per-round ratios). Peak: the
growth of `torch.cuda.max_memory_allocated` during one forward over the memory held before it (activations and
temporaries; the weights are the same size). Then, for klein-4B text-to-image, both regionally compiled the
same way (each repeated block, diffusers' `compile_repeated_blocks` and our `pipe.compile()`'s).

    python benchmarks/gpu_flux2.py        # prints a skip message without CUDA

DIFFSYNTH_BENCH_SMOKE=1 runs the same code on the CPU with a tiny model (for the test suite).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import Comparison, compare, interleaved, table  # noqa: E402
from gpu_full import sync  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
SIDE, TEXT, REPS = (4, 8, 2) if SMOKE else (64, 512, 10)  # packed latent side 64 -> 4096 tokens (1024 px)
COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
              rope_theta=2000, guidance_embeds=False)
SIZES = {  # the released transformer configs (hidden = heads x 128; text width = 3 stacked Qwen3 layers)
    "klein-4B": dict(COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    "klein-9B": dict(COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
}
if SMOKE:
    SIZES = {"tiny": dict(COMMON, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4))}


@dataclass
class GpuFlux2Row:
    size: str
    case: str
    step: Comparison                 # diff: relative L2 difference of the two velocities
    reference_peak_gb: float | None  # activation peak of one forward (NaN on the CPU smoke run; None: not measured)
    ours_peak_gb: float | None


def build(config: dict, device: str, dtype: torch.dtype):
    """diffusers' model filled with N(0, 0.02) on the device, and ours holding the same tensors' values."""
    from diffusers import Flux2Transformer2DModel
    from diffsynth.models.flux2_dit import Flux2DiT, infer_dit_config
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(**config)
    ref = ref.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02, generator=g)
    if any(True for _ in ref.buffers()):  # to_empty would have left them uninitialised
        raise RuntimeError("diffusers' Flux2Transformer2DModel has buffers now: fill them too")
    sd = ref.state_dict()
    with torch.device("meta"):
        ours = Flux2DiT(infer_dit_config(sd))
    ours.load_state_dict(sd, assign=True)  # the same tensors: both models fit beside each other on the card
    return ref, ours.eval().requires_grad_(False)


def grid_ids(t: int, side: int, device: str) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], -1)
    return ids.reshape(1, -1, 4).float().to(device)


def runners(ref, ours, config: dict, refs: int, device: str, dtype: torch.dtype) -> dict:
    """One forward each, as the two pipelines call their DiT (diffusers appends the references itself)."""
    g = torch.Generator(device).manual_seed(1)
    n = SIDE * SIDE
    x = torch.randn(1, n, 128, generator=g, device=device, dtype=dtype)
    ref_x = torch.randn(1, refs * n, 128, generator=g, device=device, dtype=dtype)
    txt = torch.randn(1, TEXT, config["joint_attention_dim"], generator=g, device=device, dtype=dtype)
    img_ids = grid_ids(0, SIDE, device)
    ref_ids = torch.cat([grid_ids(10 * (i + 1), SIDE, device) for i in range(refs)], 1) if refs else None
    txt_ids = torch.stack([torch.zeros(TEXT)] * 3 + [torch.arange(TEXT).float()], -1)[None].to(device)
    t = torch.tensor([0.5], device=device)
    hidden = torch.cat([x, ref_x], 1)
    ids = torch.cat([img_ids, ref_ids], 1) if refs else img_ids

    def theirs():
        return ref(hidden_states=hidden, encoder_hidden_states=txt, timestep=t.to(dtype), img_ids=ids,
                   txt_ids=txt_ids, guidance=None, return_dict=False)[0][:, :n]

    def mine():
        extra = dict(ref=ref_x, ref_ids=ref_ids) if refs else {}
        return ours(x, img_ids, txt, txt_ids, t, **extra)

    return {"diffusers": theirs, "ours": mine}


def synced(fn, device: str):
    def call():
        out = fn()
        sync(device)
        return out
    return call


def activation_peak_gb(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def compile_blocks(ref, ours, compile_kwargs: dict) -> None:
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline
    ref.compile_repeated_blocks(**compile_kwargs)
    for name in Flux2ImagePipeline.compiled_blocks:  # what pipe.compile() compiles
        for block in getattr(ours, name):
            block.compile(**compile_kwargs)


def side_by_side(case: str, fns: dict) -> Comparison:
    """One call each (lazy initialisation, compilation), the relative difference of their outputs, then the
    alternating timed rounds."""
    a, b = fns["diffusers"]().float(), fns["ours"]().float()
    diff = ((a - b).norm() / a.norm()).item()
    return compare(case, interleaved(fns, REPS), diff)


def measure(size: str, config: dict, device: str, dtype: torch.dtype) -> list[GpuFlux2Row]:
    ref, ours = build(config, device, dtype)
    rows = []

    def calls(refs: int) -> dict:
        return {k: synced(f, device) for k, f in runners(ref, ours, config, refs, device, dtype).items()}
    with torch.inference_mode():
        for refs in (0, 1):
            fns, case = calls(refs), "text-to-image" if refs == 0 else "1 reference image"
            rows.append(GpuFlux2Row(size, case, side_by_side(case, fns), activation_peak_gb(fns["diffusers"], device),
                                    activation_peak_gb(fns["ours"], device)))
        if size == next(iter(SIZES)):
            compile_blocks(ref, ours, {"backend": "aot_eager"} if SMOKE else {})
            rows.append(GpuFlux2Row(size, "text-to-image, compiled", side_by_side("compiled", calls(0)), None, None))
    return rows


def main() -> list[GpuFlux2Row]:
    if not torch.cuda.is_available() and not SMOKE:
        print("gpu_flux2.py: skipped, no CUDA device (it measures full-size FLUX.2 [klein] DiTs on a GPU)")
        return []
    device = "cpu" if SMOKE else "cuda"
    dtype = torch.float32 if SMOKE else torch.bfloat16
    rows = []
    for size, config in SIZES.items():
        t = time.perf_counter()
        rows += measure(size, config, device, dtype)
        print(f"{size}: measured in {time.perf_counter() - t:.0f} s", flush=True)
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run, tiny model)"
    print(f"FLUX.2 [klein] DiT forward, random weights, {SIDE * SIDE} image + {TEXT} text tokens, {dtype}, {name}, "
          f"median of {REPS} alternating rounds")

    def gb(x):
        return "-" if x is None else f"{x:.2f}"
    cells = [[r.size, r.case, f"{r.step.reference_ms:.1f}", f"{r.step.ours_ms:.1f}", f"{r.step.ratio:.2f}",
              gb(r.reference_peak_gb), gb(r.ours_peak_gb), f"{r.step.diff:.1e}"] for r in rows]
    print(table(cells, ["model", "case", "diffusers ms", "ours ms", "ours/diffusers", "diffusers act. peak GB",
                        "ours act. peak GB", "relative diff"]))
    return rows


if __name__ == "__main__":
    main()
