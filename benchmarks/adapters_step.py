"""Per-step cost of IP-Adapter and EliGen on CPU, as ratios to the base DiT step (and to diffusers' XLabs
IP-Adapter), plus EliGen's step memory.

Mid-size FLUX DiT (benchmarks/_common.MID_DIT: 2 double + 4 single blocks, width 768), random weights shared
with diffusers' FluxTransformer2DModel. Latency: 512x512 image (1024 tokens) + 512 text tokens, batch 1, fp32,
all variants timed in rotating order (median of per-pair ratios). IP-Adapters: InstantX layout (128 tokens,
every block) and XLabs layout (4 tokens, double blocks; the diffusers column runs the same weights through
`_load_ip_adapter_weights`). EliGen: 4 entity prompts of 512 tokens + the global one, regional mask in every
block. Memory (a fresh process each): RSS growth during one step at 1024x1024 (4096 image tokens), same mid
DiT, fp32: the base step, EliGen with 4 and with 1 entity prompt, and the same text tokens without the mask
(the mask's own cost: EliGen's step unit without the mask; the extra text tokens alone make the 4-entity
step 1.4x the base one).

    python benchmarks/adapters_step.py [latency] [memory]     (DIFFSYNTH_BENCH_SMOKE=1: tiny sizes, one rep)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MEMORY_ENV, MID_DIT, emit, interleaved, median, pair_ratio, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table  # noqa: E402,E501

SMOKE = os.environ.get("DIFFSYNTH_BENCH_SMOKE") == "1"
DIT = dict(MID_DIT, hidden_size=64, num_heads=2, axes_dim=(8, 12, 12), context_dim=64, pooled_dim=32) if SMOKE \
    else MID_DIT
TOKENS, TEXT, ENTITIES = (64, 16, 2) if SMOKE else (1024, 512, 4)
MEMORY_TOKENS = 256 if SMOKE else 4096
REPS = 1 if SMOKE else 5


def models():
    import torch
    from diffusers import FluxTransformer2DModel
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers
    torch.manual_seed(0)
    head = DIT["hidden_size"] // DIT["num_heads"]
    ref = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=DIT["num_double_blocks"], num_single_layers=DIT["num_single_blocks"],
        attention_head_dim=head, num_attention_heads=DIT["num_heads"], joint_attention_dim=DIT["context_dim"],
        pooled_projection_dim=DIT["pooled_dim"], guidance_embeds=True, axes_dims_rope=DIT["axes_dim"]).eval()
    ours = FluxDiT(FluxDiTConfig(**DIT)).eval().requires_grad_(False)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()))
    return ref.requires_grad_(False), ours


def adapters(image_dim: int = 64):
    """Random InstantX- and XLabs-layout adapters for DIT, as our modules and (XLabs) diffusers' state dict."""
    import torch
    from diffsynth.models.flux_ipadapter import FluxIpAdapter, IpAdapterConfig
    h, ctx = DIT["hidden_size"], DIT["context_dim"]
    out = {}
    for kind, tokens, blocks, hidden in (("instantx", 128, DIT["num_double_blocks"] + DIT["num_single_blocks"], 128),
                                         ("xlabs", 4, DIT["num_double_blocks"], 0)):
        torch.manual_seed(1)
        m = FluxIpAdapter(IpAdapterConfig(kind, image_dim, ctx, h, tokens if not SMOKE else 4, blocks, hidden))
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        out[kind] = m.eval().requires_grad_(False)
    sd = out["xlabs"].state_dict()
    diffusers_sd = {"image_proj": {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")},
                    "ip_adapter": {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}}
    return out, diffusers_sd


def inputs(tokens: int, text: int):
    import torch
    from diffsynth.models.flux_dit import image_ids
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5) * 2
    return dict(latents=torch.randn(1, 16, side, side, generator=g), timestep=torch.tensor([0.5]),
                prompt_emb=torch.randn(1, text, DIT["context_dim"], generator=g),
                pooled_prompt_emb=torch.randn(1, DIT["pooled_dim"], generator=g), text_ids=torch.zeros(1, text, 3),
                image_ids=image_ids(side, side), guidance=torch.tensor([3.5]))


def our_step(dit, base: dict, ipadapter=None, eligen: dict | None = None, masked: bool = True):
    """One evaluation through model_fn with the variants' real step units (`masked=False`: EliGen's text
    tokens without its mask)."""
    from types import SimpleNamespace
    from diffsynth.pipelines.denoise import model_fn
    from diffsynth.pipelines.units import step_unit
    from diffsynth.pipelines.variants.eligen import eligen_attention
    from diffsynth.pipelines.variants.ipadapter import ipadapter_attention
    ns = SimpleNamespace(dit=dit, ipadapter=ipadapter)
    extra = dict(eligen or {})
    if ipadapter is not None:
        import torch
        extra.update(ipadapter_emb=torch.randn(1, 1, ipadapter.config.image_dim), ipadapter_scale=0.7)
    units = [ipadapter_attention, eligen_attention] + ([] if masked else [step_unit()(drop_mask)])
    return lambda: model_fn(ns, **base, step_units=units, **extra)


def drop_mask(models, call, step_index):
    """After EliGen's step unit: the same text tokens, unmasked (isolates the mask's own cost)."""
    call.mask = None


def eligen_inputs(tokens: int, text: int, entities: int) -> dict:
    import torch
    g = torch.Generator().manual_seed(2)
    return dict(eligen_prompt_emb=torch.randn(1, entities * text, DIT["context_dim"], generator=g),
                eligen_regions=torch.rand(1, entities, tokens, generator=g) > 0.7)


def diffusers_step(ref, base: dict, ip_sd=None):
    import torch
    from diffsynth.models.flux_dit import patchify
    if ip_sd is not None:
        ref._load_ip_adapter_weights([ip_sd])
    kw = {} if ip_sd is None else {"joint_attention_kwargs": {"ip_adapter_image_embeds": [torch.randn(1, 1, 64)]}}
    return lambda: ref(hidden_states=patchify(base["latents"]), encoder_hidden_states=base["prompt_emb"],
                       pooled_projections=base["pooled_prompt_emb"], timestep=base["timestep"],
                       img_ids=base["image_ids"][0], txt_ids=base["text_ids"][0], guidance=base["guidance"],
                       return_dict=False, **kw)[0]


def worker(kind: str, variant: str = "") -> None:
    import torch
    with torch.inference_mode():
        if kind == "latency":
            ref, dit = models()
            ips, ip_sd = adapters()
            ref_ip, _ = models()
            base = inputs(TOKENS, TEXT)
            fns = {"base": our_step(dit, base), "instantx": our_step(dit, base, ips["instantx"]),
                   "xlabs": our_step(dit, base, ips["xlabs"]),
                   "eligen": our_step(dit, base, eligen=eligen_inputs(TOKENS, TEXT, ENTITIES)),
                   "diffusers": diffusers_step(ref, base), "diffusers-xlabs": diffusers_step(ref_ip, base, ip_sd)}
            for f in fns.values():
                f()
            emit({"times": interleaved(fns, REPS)})
        else:
            _, dit = models()
            entities = int(variant.split("-")[-1]) if "-" in variant else 0
            eligen = eligen_inputs(MEMORY_TOKENS, TEXT, entities) if entities else None
            fn = our_step(dit, inputs(MEMORY_TOKENS, TEXT), eligen=eligen, masked=variant.startswith("eligen"))
            fn()
            reset_peak_rss()
            before = rss_mb()
            fn()
            emit({"peak_mb": peak_growth_mb(before)})


@dataclass
class AdaptersResult:
    latency_ms: dict[str, float] = field(default_factory=dict)     # variant -> median ms of one step
    ratio_to_base: dict[str, float] = field(default_factory=dict)  # variant -> median of per-round ratios to "base"
    xlabs_vs_diffusers: float | None = None                        # ours / diffusers, each with the XLabs adapter
    memory_mb: dict[str, float] = field(default_factory=dict)      # variant -> RSS growth during one step


def main(parts: tuple[str, ...] = ("latency", "memory")) -> AdaptersResult:
    result = AdaptersResult()
    if "latency" in parts:
        latency_table(result)
    if "memory" in parts:
        memory_table(result)
    return result


def latency_table(result: AdaptersResult) -> None:
    lat = run_worker(__file__, "latency")["times"]
    b = lat["base"]
    for name in ("base", "instantx", "xlabs", "eligen", "diffusers", "diffusers-xlabs"):
        result.latency_ms[name], result.ratio_to_base[name] = median(lat[name]) * 1000, pair_ratio(b, lat[name])
    result.xlabs_vs_diffusers = pair_ratio(lat["diffusers-xlabs"], lat["xlabs"])
    rows = [[name, f"{ms:.0f}", f"{result.ratio_to_base[name]:.2f}"] for name, ms in result.latency_ms.items()]
    rows.append(["xlabs: ours / diffusers (each with its adapter)", "", f"{result.xlabs_vs_diffusers:.2f}"])
    print(f"Step latency, CPU fp32 ({DIT['num_double_blocks']}+{DIT['num_single_blocks']} blocks, width "
          f"{DIT['hidden_size']}, {TOKENS} image + {TEXT} text tokens, EliGen {ENTITIES} entities, median of {REPS})")
    print(table(rows, ["variant", "ms", "ratio to our base step"]))


MEMORY_VARIANTS = ["base", f"unmasked-{ENTITIES}", f"eligen-{ENTITIES}"] + ([] if SMOKE else ["unmasked-1", "eligen-1"])


def memory_table(result: AdaptersResult) -> None:
    mem = result.memory_mb
    mem.update({v: run_worker(__file__, "memory", v, env=MEMORY_ENV)["peak_mb"] for v in MEMORY_VARIANTS})
    rows = [[v, f"{m:.0f}", f"{m / mem['base']:.2f}",
             f"{m / mem['unmasked-' + v.split('-')[1]]:.2f}" if v.startswith("eligen") else ""]
            for v, m in mem.items()]
    print(f"\nStep memory (RSS growth), {MEMORY_TOKENS} image tokens + {TEXT} text tokens per prompt "
          "(unmasked-N: the text of N entity prompts + the global one, no mask):")
    print(table(rows, ["variant", "peak MB", "/ base step", "/ same tokens unmasked"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main(tuple(sys.argv[1:]) or ("latency", "memory"))
