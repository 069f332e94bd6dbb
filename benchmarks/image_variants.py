"""Per-step cost of the image-conditioned variants (Kontext, Fill, Canny/Depth, FLEX.2) on CPU: ours vs
what diffusers' pipeline does at each denoising step, on the same random mid-size weights.

One step = everything the pipeline runs per DiT evaluation. Ours: `model_fn` with the variant's step
units (condition channels concatenated, Kontext tokens appended) from the inputs its units produced.
diffusers: the transformer on the packed latents concatenated with the packed condition (FluxFillPipeline,
FluxControlPipeline: along the features; FluxKontextPipeline: along the tokens, output sliced). FLEX.2
has no diffusers pipeline: its step is timed as a FluxControlPipeline step with FLEX's 196 input features.
Mid-size DiT (2+4 blocks, width 768), 512x512 (1024 tokens; Kontext: + a 512x512 reference), 512 text
tokens, fp32, median of pair ratios over rotating reps. DIFFSYNTH_BENCH_SMOKE=1: tiny sizes (a smoke run).

    python benchmarks/image_variants.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MID_DIT, Comparison, compare, interleaved, table  # noqa: E402

# variant -> (DiT input features, condition channels at latent resolution, reference tokens?)
VARIANTS = {"kontext": (64, 0, True), "fill": (384, 80, False), "canny/depth": (128, 16, False),
            "flex": (196, 33, False), "redux": (64, 0, False)}
# FLUX.1-Redux appends its image tokens (27x27 SigLIP patches of a 384 px image) to the T5 prompt; its encoders
# run once per call, so a step costs the DiT with that longer text.
REDUX_TOKENS = 729


def sizes() -> dict:
    if os.environ.get("DIFFSYNTH_BENCH_SMOKE"):
        return dict(dit=dict(hidden_size=64, num_heads=2, num_double_blocks=1, num_single_blocks=1, context_dim=32,
                             pooled_dim=32, axes_dim=(8, 12, 12)), side=8, text=8, redux=4, reps=2)
    return dict(dit=MID_DIT, side=64, text=512, redux=REDUX_TOKENS, reps=6)


def build(features: int, dit: dict):
    """(diffusers FluxTransformer2DModel, our FluxDiT) with the same random weights."""
    import torch
    from diffusers import FluxTransformer2DModel
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=features, out_channels=64, num_layers=dit["num_double_blocks"],
        num_single_layers=dit["num_single_blocks"], attention_head_dim=dit["hidden_size"] // dit["num_heads"],
        num_attention_heads=dit["num_heads"], joint_attention_dim=dit["context_dim"],
        pooled_projection_dim=dit["pooled_dim"], guidance_embeds=True,
        axes_dims_rope=dit["axes_dim"]).eval().requires_grad_(False)
    ours = FluxDiT(FluxDiTConfig(**dit, in_channels=features, out_channels=64)).eval().requires_grad_(False)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()))
    return ref, ours


def steps(variant: str, s: dict):
    """{impl: one denoising step} for `variant`, and a check that both give the same velocity."""
    import torch
    from types import SimpleNamespace
    from diffsynth.models.flux_dit import image_ids, patchify, unpatchify
    from diffsynth.pipelines.denoise import model_fn
    from diffsynth.pipelines.variants import UNITS
    from diffsynth.pipelines.units import StepUnit
    features, channels, reference = VARIANTS[variant]
    ref, ours = build(features, s["dit"])
    g = torch.Generator().manual_seed(1)
    side, text, dit = s["side"], s["text"] + (s["redux"] if variant == "redux" else 0), s["dit"]
    latents = torch.randn(1, 16, side, side, generator=g)
    base = dict(timestep=torch.tensor([0.7]), prompt_emb=torch.randn(1, text, dit["context_dim"], generator=g),
                pooled_prompt_emb=torch.randn(1, dit["pooled_dim"], generator=g), text_ids=torch.zeros(1, text, 3),
                image_ids=image_ids(side, side), guidance=torch.tensor([3.5]))
    step_units = [u for u in UNITS if isinstance(u, StepUnit)]
    inputs = {}
    if reference:
        ref_ids = image_ids(side, side, index=1).clone()
        inputs = dict(kontext_latents=patchify(torch.randn(1, 16, side, side, generator=g)), kontext_image_ids=ref_ids)
    elif variant == "redux":
        inputs = {}
    elif variant == "flex":
        cond = torch.randn(1, channels, side, side, generator=g)
        inputs = dict(flex_condition=cond, flex_uncondition=cond, flex_control_stop_sigma=0.5)
    else:
        key = "fill_condition" if variant == "fill" else "control_latents"
        inputs = {key: torch.randn(1, channels, side, side, generator=g)}
    models = SimpleNamespace(dit=ours)

    def ours_step():
        return model_fn(models, latents, **base, step_units=step_units, **inputs)

    packed = patchify(latents)
    cond_packed = None if reference or not inputs else patchify(next(v for v in inputs.values() if torch.is_tensor(v)))
    txt_ids, img_ids = base["text_ids"][0], base["image_ids"][0]
    if reference:
        img_ids = torch.cat([img_ids, inputs["kontext_image_ids"][0]], 0)

    def diffusers_step():
        if reference:
            x = torch.cat([packed, inputs["kontext_latents"]], 1)
        else:
            x = packed if cond_packed is None else torch.cat([packed, cond_packed], 2)
        out = ref(hidden_states=x, timestep=base["timestep"], guidance=base["guidance"],
                  pooled_projections=base["pooled_prompt_emb"], encoder_hidden_states=base["prompt_emb"],
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpatchify(out[:, : packed.shape[1]], side, side)
    return {"diffusers": diffusers_step, "ours": ours_step}


def main(only: list[str] | None = None) -> list[Comparison]:
    """`only`: variant names to measure (default: all), e.g. `image_variants.py redux`. One row per variant;
    diff: max |velocity difference|."""
    import torch
    s = sizes()
    results = []
    with torch.inference_mode():
        for variant in only or VARIANTS:
            fns = steps(variant, s)
            diff = (fns["diffusers"]() - fns["ours"]()).abs().max().item()
            results.append(compare(variant, interleaved(fns, s["reps"]), diff))
    dit = s["dit"]
    print(f"Variant denoising step, CPU fp32 ({dit['num_double_blocks']}+{dit['num_single_blocks']} blocks, width "
          f"{dit['hidden_size']}, {(s['side'] // 2) ** 2} image + {s['text']} text tokens (Redux: + {s['redux']}), "
          f"median of {s['reps']} rotating reps)")
    rows = [[r.case, f"{r.reference_ms:.0f}", f"{r.ours_ms:.0f}", f"{r.ratio:.2f}", f"{r.diff:.1e}"] for r in results]
    print(table(rows, ["variant", "diffusers ms", "ours ms", "ours/diffusers", "max |velocity diff|"]))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
