"""Cost of one denoising step with one and with two ControlNets on CPU: ours vs diffusers, same random weights.

A step = every ControlNet + the DiT with their residuals. Ours: the pipeline's own step (`model_fn` with the
ControlNet step unit); diffusers: FluxControlNetModel / FluxMultiControlNetModel, then FluxTransformer2DModel
with the samples, as FluxControlNetPipeline does. Mid-size config: DiT 2 double + 4 single blocks, width 768
(6 heads x 128), ControlNets 2 double + 2 single blocks, 1024 image tokens (512x512) + 512 text tokens, fp32.
Both in one process, timed in rotating order; the ratio is the median of per-round ratios.

    python benchmarks/controlnet_step.py        (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MID_DIT, Comparison, compare, interleaved, table  # noqa: E402

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
DIT = dict(MID_DIT, hidden_size=64, num_heads=2, context_dim=32, pooled_dim=32, axes_dim=(8, 12, 12)) if SMOKE \
    else MID_DIT
TOKENS, TEXT, REPS = (16, 8, 2) if SMOKE else (1024, 512, 4)
CONTROLNET_BLOCKS = (2, 2)


def diffusers_models(n_controlnets: int):
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    head = DIT["hidden_size"] // DIT["num_heads"]
    common = dict(patch_size=1, in_channels=64, attention_head_dim=head, num_attention_heads=DIT["num_heads"],
                  joint_attention_dim=DIT["context_dim"], pooled_projection_dim=DIT["pooled_dim"],
                  guidance_embeds=True, axes_dims_rope=list(DIT["axes_dim"]))
    torch.manual_seed(0)
    dit = FluxTransformer2DModel(num_layers=DIT["num_double_blocks"], num_single_layers=DIT["num_single_blocks"],
                                 **common)
    nets = [FluxControlNetModel(num_layers=CONTROLNET_BLOCKS[0], num_single_layers=CONTROLNET_BLOCKS[1], **common)
            for _ in range(n_controlnets)]
    for net in nets:  # the zero-initialised outputs would make the residuals trivially zero
        for p in (*net.controlnet_blocks.parameters(), *net.controlnet_single_blocks.parameters(),
                  *net.controlnet_x_embedder.parameters()):
            torch.nn.init.normal_(p, std=0.02)
    return dit.eval(), [n.eval() for n in nets]


def ours_models(dit, nets):
    from types import SimpleNamespace
    from torch import nn
    from diffsynth.models.flux_controlnet import FluxControlNet, controlnet_from_diffusers, infer_controlnet_config
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    ours = FluxDiT(FluxDiTConfig(**DIT)).eval()
    ours.load_state_dict(dit_from_diffusers(dit.state_dict()))
    controlnets = nn.ModuleList()
    for net in nets:
        sd = controlnet_from_diffusers(net.state_dict())
        config = infer_controlnet_config(sd)
        config.axes_dim = tuple(DIT["axes_dim"])
        model = FluxControlNet(config).eval()
        model.load_state_dict(sd)
        controlnets.append(model)
    return SimpleNamespace(dit=ours, controlnet=controlnets)


def inputs():
    import torch
    from diffsynth.models.flux_dit import image_ids, unpatchify
    g = torch.Generator().manual_seed(1)
    side = int(TOKENS ** 0.5) * 2
    return dict(x=torch.randn(1, TOKENS, 64, generator=g), txt=torch.randn(1, TEXT, DIT["context_dim"], generator=g),
                pooled=torch.randn(1, DIT["pooled_dim"], generator=g),
                conds=[torch.randn(1, TOKENS, 64, generator=g) for _ in range(2)], img_ids=image_ids(side, side),
                txt_ids=torch.zeros(1, TEXT, 3), t=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                latents=unpatchify(torch.randn(1, TOKENS, 64, generator=g), side, side), side=side)


def diffusers_step(dit, nets, v, scales):
    from diffusers import FluxMultiControlNetModel
    multi = FluxMultiControlNetModel(nets) if len(nets) > 1 else nets[0]
    from diffsynth.models.flux_dit import patchify
    x = patchify(v["latents"])
    conds = v["conds"][:len(nets)] if len(nets) > 1 else v["conds"][0]
    import torch
    modes = [torch.tensor([-1])] * len(nets) if len(nets) > 1 else None  # what the pipeline passes for "no mode"
    scale = list(scales) if len(nets) > 1 else scales[0]

    def step():
        double, single = multi(hidden_states=x, controlnet_cond=conds, controlnet_mode=modes, conditioning_scale=scale,
                               encoder_hidden_states=v["txt"], pooled_projections=v["pooled"], timestep=v["t"],
                               img_ids=v["img_ids"][0], txt_ids=v["txt_ids"][0], guidance=v["guidance"],
                               return_dict=False)
        return dit(hidden_states=x, encoder_hidden_states=v["txt"], pooled_projections=v["pooled"], timestep=v["t"],
                   img_ids=v["img_ids"][0], txt_ids=v["txt_ids"][0], guidance=v["guidance"],
                   controlnet_block_samples=double, controlnet_single_block_samples=single, return_dict=False)[0]
    return step


def ours_step(models, v, scales):
    from diffsynth.models.flux_dit import patchify
    from diffsynth.pipelines.denoise import model_fn
    from diffsynth.pipelines.variants.controlnet import ControlCondition, ControlNetConditions, apply_controlnets
    conditions = ControlNetConditions([ControlCondition(i, v["conds"][i], None, s, 1.0, 0.0)
                                       for i, s in enumerate(scales)], num_steps=1)

    def step():
        out = model_fn(models, v["latents"], v["t"], v["txt"], v["pooled"], v["txt_ids"], v["img_ids"], v["guidance"],
                       step_units=[apply_controlnets], controlnet_conditions=conditions)
        return patchify(out)
    return step


def main() -> list[Comparison]:
    """One row per number of ControlNets ("1", "2"); diff: max |ours - diffusers| / max |diffusers|."""
    import torch
    results = []
    with torch.inference_mode():
        for n in (1, 2):
            dit, nets = diffusers_models(n)
            ours = ours_models(dit, nets)
            v, scales = inputs(), (0.7, 0.5)[:n]
            fns = {"diffusers": diffusers_step(dit, nets, v, scales), "ours": ours_step(ours, v, scales)}
            a, b = fns["diffusers"](), fns["ours"]()
            diff = ((a - b).abs().max() / a.abs().max()).item()
            results.append(compare(str(n), interleaved(fns, REPS), diff))
    print(f"ControlNet step, CPU fp32 (DiT {DIT['num_double_blocks']}+{DIT['num_single_blocks']} blocks, ControlNets "
          f"{CONTROLNET_BLOCKS[0]}+{CONTROLNET_BLOCKS[1]}, width {DIT['hidden_size']}, {TOKENS}+{TEXT} tokens, "
          f"median of {REPS} rotating reps)")
    rows = [[r.case, f"{r.reference_ms:.1f}", f"{r.ours_ms:.1f}", f"{r.ratio:.2f}", f"{r.diff:.1e}"] for r in results]
    print(table(rows, ["ControlNets", "diffusers ms", "ours ms", "ours/diffusers", "max rel diff"]))
    return results


if __name__ == "__main__":
    main()
