"""Step1X-Edit denoiser step on CPU: ours (connector + DiT with reference tokens, one `model_fn` call) vs the
same computation on diffusers' FluxTransformer2DModel (same random weights; diffusers has no Step1X pipeline, so
its transformer gets our connector's output and the reference tokens appended to the image tokens by hand).

Mid-size config (benchmarks/_common.MID_DIT without guidance embedder): a 512x512 edit = 1024 target + 1024
reference image tokens, 640 Qwen tokens (Qwen width 3584 -> connector -> 4096), batch 1, fp32. Latency is
measured in rotating order (pair ratio); max |diff| is the parity of the two outputs.

    python benchmarks/step1x_step.py          (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MID_DIT, Comparison, compare, interleaved, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
TOKENS, TEXT, QWEN, REPS = (16, 32, 48, 2) if SMOKE else (1024, 640, 3584, 6)
DIT = dict(MID_DIT, num_double_blocks=1, num_single_blocks=1, context_dim=64, hidden_size=64, num_heads=2,
           axes_dim=(8, 12, 12)) if SMOKE else MID_DIT


def build():
    import torch
    from diffusers import FluxTransformer2DModel
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    from diffsynth.models.step1x import Step1XConnector, Step1XConnectorConfig
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=DIT["num_double_blocks"], num_single_layers=DIT["num_single_blocks"],
        attention_head_dim=DIT["hidden_size"] // DIT["num_heads"], num_attention_heads=DIT["num_heads"],
        joint_attention_dim=DIT["context_dim"], pooled_projection_dim=DIT["pooled_dim"], guidance_embeds=False,
        axes_dims_rope=DIT["axes_dim"]).eval().requires_grad_(False)
    ours = FluxDiT(FluxDiTConfig(**{**DIT, "guidance_embed": False})).eval().requires_grad_(False)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()))
    heads = DIT["context_dim"] // 128 if DIT["context_dim"] >= 256 else 2
    connector = Step1XConnector(Step1XConnectorConfig(QWEN, DIT["context_dim"], heads, 2, DIT["pooled_dim"])).eval()
    return ref, ours, connector


def runners(ref, ours, connector):
    import torch
    from types import SimpleNamespace
    from diffsynth.models.flux_dit import image_ids
    from diffsynth.pipelines.denoise import model_fn
    from diffsynth.pipelines.variants.step1x import step1x_step
    g = torch.Generator().manual_seed(1)
    side = int(TOKENS ** 0.5) * 2
    latents, reference = torch.randn(1, 16, side, side, generator=g), torch.randn(1, 16, side, side, generator=g)
    emb = torch.randn(1, TEXT, QWEN, generator=g)
    mask = torch.zeros(1, TEXT, dtype=torch.long)
    mask[:, : TEXT * 3 // 4] = 1
    t, ids = torch.tensor([0.7]), image_ids(side, side)
    models = SimpleNamespace(dit=ours, step1x_connector=connector)

    def run_ours():
        return model_fn(models, latents, t, None, None, None, ids, step_units=[step1x_step],
                        step1x_llm_embedding=emb, step1x_mask=mask, step1x_reference_latents=reference)

    def run_diffusers():
        from diffsynth.models.flux_dit import patchify, unpatchify
        txt, pooled = connector(emb, t, mask)
        x = torch.cat([patchify(latents), patchify(reference)], 1)
        out = ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                  img_ids=torch.cat([ids, ids], 1)[0], txt_ids=torch.zeros(TEXT, 3), return_dict=False)[0]
        return unpatchify(out[:, :TOKENS], side, side)
    return {"diffusers": run_diffusers, "ours": run_ours}


def main() -> Comparison:
    """diff: max |ours - diffusers| of the velocity."""
    import torch
    with torch.inference_mode():
        fns = runners(*build())
        max_diff = (fns["diffusers"]() - fns["ours"]()).abs().max().item()
        r = compare("step", interleaved(fns, REPS), max_diff)
    print(f"Step1X-Edit denoiser step, CPU fp32 ({DIT['num_double_blocks']}+{DIT['num_single_blocks']} blocks, "
          f"width {DIT['hidden_size']}, {TOKENS} target + {TOKENS} reference + {TEXT} text tokens)")
    print(table([[f"{r.reference_ms:.0f}", f"{r.ours_ms:.0f}", f"{r.ratio:.2f}", f"{r.diff:.1e}"]],
                ["diffusers transformer ms", "ours ms", "ours/diffusers", "max |diff|"]))
    return r


if __name__ == "__main__":
    main()
