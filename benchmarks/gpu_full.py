"""Full-size FLUX.1-dev on one CUDA GPU with random weights: 1024x1024, 28 steps, bf16.

Variants: our pipeline eager, regionally compiled (`pipe.compile()`), and with fp8 (e4m3fn) weight
storage (upcast to bf16 per layer); the DiT's 28 forward passes alone, ours vs diffusers'
FluxTransformer2DModel on the same weights; and `enable_vram_management` with the DiT streamed from CPU
under a 12 GB limit, from page-locked and from pageable RAM. Text embeddings are random (no T5/CLIP weights are needed: the text encoders run once
per image and are not what this measures); the VAE decoder is full size. Peak memory is
`torch.cuda.max_memory_allocated`.

    python benchmarks/gpu_full.py        # prints a skip message without CUDA
    DIFFSYNTH_BENCH_STEPS=8 python benchmarks/gpu_full.py   # fewer steps (the table gives ms per step too)

DIFFSYNTH_BENCH_SMOKE=1 runs the same code on the CPU with a tiny model (for the test suite).
"""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
STEPS, SIZE, T5_LEN = (2, 64, 16) if SMOKE else (int(os.environ.get("DIFFSYNTH_BENCH_STEPS", 28)), 1024, 512)


@dataclass
class Row:
    variant: str
    seconds: float
    peak_gb: float | None  # torch.cuda.max_memory_allocated (NaN on the CPU smoke run); None: not measured


def configs():
    from diffsynth.models.flux_dit import FluxDiTConfig
    from diffsynth.models.flux_vae import FluxVAEConfig
    if SMOKE:
        return (FluxDiTConfig(hidden_size=64, num_heads=2, num_double_blocks=1, num_single_blocks=1, context_dim=32,
                              pooled_dim=32, axes_dim=(8, 12, 12)), FluxVAEConfig(ch=32, ch_mult=(1, 1, 1, 1)))
    return FluxDiTConfig(), FluxVAEConfig()


def random_module(cls, config, device, dtype):
    """Built on the meta device, then filled with N(0, 0.02) directly on `device` (no CPU copy)."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def make_pipe(device, dtype):
    from diffsynth import FluxImagePipeline
    from diffsynth.models.flux_dit import FluxDiT
    from diffsynth.models.flux_vae import FluxVAEDecoder
    from diffsynth.pipelines import flux_image
    from diffsynth.pipelines.units import unit
    dit_config, vae_config = configs()
    pipe = FluxImagePipeline(device=device, torch_dtype=dtype)
    pipe.dit = random_module(FluxDiT, dit_config, device, dtype)
    pipe.vae_decoder = random_module(FluxVAEDecoder, vae_config, device, dtype)

    outputs = flux_image.PROMPT_OUTPUTS

    @unit(per_branch=True, outputs=outputs, model_inputs=outputs, cacheable=outputs)
    def random_prompt(pipe, prompt, t5_sequence_length=T5_LEN, num_images=1):
        g = torch.Generator(device).manual_seed(len(prompt))
        c = pipe.dit.config
        return {"prompt_emb": torch.randn(num_images, t5_sequence_length, c.context_dim, generator=g, device=device,
                                          dtype=dtype),
                "pooled_prompt_emb": torch.randn(num_images, c.pooled_dim, generator=g, device=device, dtype=dtype),
                "text_ids": torch.zeros(num_images, t5_sequence_length, 3, device=device)}

    pipe.units = [u if u.name != "encode_prompt" else random_prompt for u in flux_image.BASE_UNITS]
    return pipe


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def run_pipe(pipe, device, steps=STEPS) -> float:
    sync(device)
    t = time.perf_counter()
    pipe("a photo of a cat", height=SIZE, width=SIZE, num_inference_steps=steps, seed=0, t5_sequence_length=T5_LEN,
         output_type="pt", progress_bar_cmd=lambda x: x)
    sync(device)
    return time.perf_counter() - t


def dit_loop(fn, device, steps=STEPS) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t


def dit_inputs(config, device, dtype):
    from diffsynth.models.flux_dit import image_ids
    g = torch.Generator(device).manual_seed(1)
    n = (SIZE // 16) ** 2
    return dict(img=torch.randn(1, n, config.in_channels, generator=g, device=device, dtype=dtype),
                img_ids=image_ids(SIZE // 8, SIZE // 8, device=device),
                txt=torch.randn(1, T5_LEN, config.context_dim, generator=g, device=device, dtype=dtype),
                txt_ids=torch.zeros(1, T5_LEN, 3, device=device), timestep=torch.tensor([0.5], device=device),
                pooled=torch.randn(1, config.pooled_dim, generator=g, device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device))


def diffusers_dit(ours, device, dtype):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from diffsynth.models.flux_dit import dit_to_bfl
    c = ours.config
    config = dict(patch_size=1, in_channels=c.in_channels, num_layers=c.num_double_blocks,
                  num_single_layers=c.num_single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
                  joint_attention_dim=c.context_dim, pooled_projection_dim=c.pooled_dim, guidance_embeds=c.guidance_embed,
                  axes_dims_rope=c.axes_dim)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    sd = convert_flux_transformer_checkpoint_to_diffusers(dit_to_bfl(ours.state_dict()), config=config) \
        if c.hidden_size == 3072 else None
    if sd is None:  # smoke size: diffusers' converter assumes FLUX's width
        from diffsynth.testing import bfl_to_diffusers_dit
        sd = bfl_to_diffusers_dit(dit_to_bfl(ours.state_dict()))
    model.load_state_dict(sd, assign=True)
    return model.to(device, dtype).eval()


def streamed_rows(device: str, dtype: torch.dtype) -> list[Row]:
    """The DiT stored in CPU RAM, streamed under a 12 GB limit: from page-locked memory (the default) and
    from pageable memory (`pin_memory=False`)."""
    from diffsynth.loading.vram import register_model
    rows = []
    limit = 0.6 if SMOKE else 12
    for pin in (True, False):
        pipe = make_pipe(device, dtype)
        pipe.dit.to("cpu")
        pipe.offload["dit"] = ("cpu", None)
        register_model(pipe, "dit", pipe.dit, "cpu", device, dtype)
        plans = pipe.enable_vram_management(vram_limit=limit, pin_memory=pin)
        run_pipe(pipe, device, steps=1)
        reset_peak(device)
        seconds = run_pipe(pipe, device)
        streamed = f"{plans['dit',].streamed_bytes / 2**30:.1f} GB streamed/step"
        memory = "page-locked" if pin else "pageable"
        rows.append(Row(f"ours, DiT stored on CPU ({memory}), vram_limit {limit} GB ({streamed})", seconds,
                        peak_gb(device)))
        del pipe
        gc.collect()
    return rows


def main() -> list[Row]:
    if not torch.cuda.is_available() and not SMOKE:
        print("gpu_full.py: skipped, no CUDA device (it measures full-size FLUX.1-dev at 1024x1024 on a GPU)")
        return []
    device = "cpu" if SMOKE else "cuda"
    dtype = torch.float32 if SMOKE else torch.bfloat16
    compile_kwargs = {"backend": "aot_eager"} if SMOKE else {}
    rows = []
    pipe = make_pipe(device, dtype)
    run_pipe(pipe, device, steps=1)  # warm-up (cuDNN/cuBLAS autotuning, allocator)

    reset_peak(device)
    seconds = run_pipe(pipe, device)
    rows.append(Row("ours, eager", seconds, peak_gb(device)))

    inputs = dit_inputs(pipe.dit.config, device, dtype)
    with torch.no_grad():
        reset_peak(device)
        ours_dit = dit_loop(lambda: pipe.dit(**inputs), device)
        ours_peak = peak_gb(device)
        ref = diffusers_dit(pipe.dit, device, dtype)
        ref_inputs = dict(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"],
                          pooled_projections=inputs["pooled"], timestep=inputs["timestep"].to(dtype),
                          img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                          guidance=inputs["guidance"].to(dtype), return_dict=False)
        reset_peak(device)
        ref_dit = dit_loop(lambda: ref(**ref_inputs), device)
        ref_peak = peak_gb(device)
        # both compiled the same way: each repeated block (diffusers' own regional compilation)
        ref.compile_repeated_blocks(**compile_kwargs)
        ref_compiled = dit_loop(lambda: ref(**ref_inputs), device)  # dit_loop's first call compiles
        ref = None  # frees the diffusers model before ours compiles
        pipe.compile(**compile_kwargs)
        ours_compiled = dit_loop(lambda: pipe.dit(**inputs), device)
    rows.append(Row(f"DiT x{STEPS}: diffusers", ref_dit, ref_peak))
    rows.append(Row(f"DiT x{STEPS}: ours (ratio {ours_dit / ref_dit:.2f})", ours_dit, ours_peak))
    rows.append(Row(f"DiT x{STEPS}: diffusers, compiled", ref_compiled, None))
    rows.append(Row(f"DiT x{STEPS}: ours, compiled (ratio {ours_compiled / ref_compiled:.2f})", ours_compiled, None))

    run_pipe(pipe, device, steps=1)  # the blocks were compiled above; this warms the rest of the pipeline
    reset_peak(device)
    seconds = run_pipe(pipe, device)
    rows.append(Row("ours, compiled", seconds, peak_gb(device)))
    del pipe
    gc.collect()

    from diffsynth.loading.vram import install_cast
    pipe = make_pipe(device, dtype)
    with torch.no_grad():
        for p in pipe.dit.parameters():
            if p.ndim >= 2:
                p.data = p.data.to(torch.float8_e4m3fn)
    install_cast(pipe.dit, device, dtype)
    run_pipe(pipe, device, steps=1)
    reset_peak(device)
    seconds = run_pipe(pipe, device)
    rows.append(Row("ours, fp8 storage, bf16 compute", seconds, peak_gb(device)))
    pipe = None  # freed before the streamed runs build theirs
    gc.collect()

    rows += streamed_rows(device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run, tiny model)"
    print(f"FLUX.1-dev size, random weights, {SIZE}x{SIZE}, {STEPS} steps, {dtype}, {name}")
    cells = [[r.variant, f"{r.seconds:.2f}", f"{r.seconds / STEPS * 1000:.0f}",
              "-" if r.peak_gb is None else f"{r.peak_gb:.1f}"] for r in rows]
    print(table(cells, ["variant", "seconds", "ms / step", "peak GB"]))
    return rows


if __name__ == "__main__":
    main()
