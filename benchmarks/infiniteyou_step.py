"""InfiniteYou on CPU: one denoising step (InfuseNet reading the 8 identity tokens + the DiT with its residuals),
ours vs diffusers on the same random weights, and the once-per-call identity cost (alignment, ArcFace, projector).

Step: the mid-size config of controlnet_step.py (DiT 2 double + 4 single blocks, width 768, InfuseNet 2 + 2
blocks, 1024 image tokens, 512 T5 tokens for the DiT), InfuseNet's text = 8 identity tokens at position 0 and
its guidance `infinityou_guidance`; diffusers: FluxControlNetModel with those inputs, then
FluxTransformer2DModel with the samples, as InfiniteYou's own pipeline does. Identity: IR-SE50 (facexlib
layout) and the 1280-wide projector at their real sizes, random weights (the detector is not included: its
real weights are not here).

    python benchmarks/infiniteyou_step.py        (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, for the test suite)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Comparison, compare, interleaved, median, table  # noqa: E402
from controlnet_step import DIT, REPS, SMOKE, diffusers_models, inputs, ours_models  # noqa: E402

ID_TOKENS, ID_GUIDANCE = 8, 1.0


def diffusers_step(dit, net, v, tokens):
    import torch
    from diffsynth.models.flux_dit import patchify
    x, id_ids, id_guidance = patchify(v["latents"]), torch.zeros(ID_TOKENS, 3), torch.tensor([ID_GUIDANCE])

    def step():
        double, single = net(hidden_states=x, controlnet_cond=v["conds"][0], conditioning_scale=1.0,
                             encoder_hidden_states=tokens, pooled_projections=v["pooled"], timestep=v["t"],
                             img_ids=v["img_ids"][0], txt_ids=id_ids, guidance=id_guidance, return_dict=False)
        return dit(hidden_states=x, encoder_hidden_states=v["txt"], pooled_projections=v["pooled"], timestep=v["t"],
                   img_ids=v["img_ids"][0], txt_ids=v["txt_ids"][0], guidance=v["guidance"],
                   controlnet_block_samples=double, controlnet_single_block_samples=single, return_dict=False)[0]
    return step


def ours_step(models, v, tokens):
    import torch
    from diffsynth.models.flux_dit import patchify
    from diffsynth.pipelines.denoise import model_fn
    from diffsynth.pipelines.variants.controlnet import ControlCondition, ControlNetConditions, apply_controlnets
    from diffsynth.pipelines.variants.infiniteyou import IdentityContext, use_identity
    conditions = ControlNetConditions([ControlCondition(0, v["conds"][0], None, 1.0, 1.0, 0.0)], num_steps=1)
    identity = IdentityContext(tokens, torch.tensor([ID_GUIDANCE]))

    def step():
        out = model_fn(models, v["latents"], v["t"], v["txt"], v["pooled"], v["txt_ids"], v["img_ids"], v["guidance"],
                       step_units=[use_identity, apply_controlnets], controlnet_conditions=conditions,
                       identity_context=identity)
        return patchify(out)
    return step


@dataclass
class InfiniteYouResult:
    step: Comparison      # diff: max |ours - diffusers| / max |diffusers| of the velocity
    identity_ms: float    # align + ArcFace + projector of one face, once per call


def identity_cost() -> float:
    """Milliseconds for align + ArcFace + projector of one face (once per call), real sizes unless SMOKE."""
    import numpy as np
    import torch
    from diffsynth.models.face_id import ARCFACE_TEMPLATE, ArcFaceConfig, ArcFaceIRSE, align_face
    from diffsynth.models.flux_infiniteyou import InfiniteYouProjector, ProjectorConfig
    counts, widths = ((1, 1, 1, 1), (16, 32, 48, 64)) if SMOKE else ((3, 4, 14, 3), (64, 128, 256, 512))
    units, previous = [], widths[0]
    for width, count in zip(widths, counts):
        units += [(previous, width, 2)] + [(width, width, 1)] * (count - 1)
        previous = width
    arcface = ArcFaceIRSE(ArcFaceConfig(tuple(units), stem=widths[0])).eval()
    projector = InfiniteYouProjector(ProjectorConfig(dim=64, depth=1, heads=1, output_dim=32) if SMOKE
                                     else ProjectorConfig()).eval()
    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    kps = (ARCFACE_TEMPLATE * 4 + 300).astype(np.float32)

    def run():
        crop = torch.from_numpy(align_face(image, kps)).permute(2, 0, 1)[None].float() / 127.5 - 1
        return projector(arcface(crop)[:, None])
    return median(interleaved({"identity": run}, REPS)["identity"]) * 1000


def main() -> InfiniteYouResult:
    import torch
    with torch.inference_mode():
        dit, (net,) = diffusers_models(1)
        ours = ours_models(dit, [net])
        v = inputs()
        tokens = torch.randn(1, ID_TOKENS, DIT["context_dim"], generator=torch.Generator().manual_seed(2))
        fns = {"diffusers": diffusers_step(dit, net, v, tokens), "ours": ours_step(ours, v, tokens)}
        a, b = fns["diffusers"](), fns["ours"]()
        diff = ((a - b).abs().max() / a.abs().max()).item()
        result = InfiniteYouResult(compare("step", interleaved(fns, REPS), diff), 0.0)
        start = time.perf_counter()
        result.identity_ms = identity_cost()
    r = result.step
    print(f"InfiniteYou step, CPU fp32 (DiT {DIT['num_double_blocks']}+{DIT['num_single_blocks']} blocks, InfuseNet "
          f"2+2, width {DIT['hidden_size']}, {ID_TOKENS} identity tokens, median of {REPS} rotating reps)")
    print(table([[r.case, f"{r.reference_ms:.1f}", f"{r.ours_ms:.1f}", f"{r.ratio:.2f}", f"{r.diff:.1e}"]],
                ["InfiniteYou", "diffusers ms", "ours ms", "ours/diffusers", "max rel diff"]))
    print(table([["identity (align + ArcFace IR-SE50 + projector), once per call", f"{result.identity_ms:.1f}"]],
                ["once per call", "ours ms"]))
    print(f"(identity measurement took {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
