"""VRAM plans for the full-size FLUX.1-dev DiT (12B) on 8 / 12 / 24 GB cards, for FLUX.2 [klein] 4B / 9B's
DiTs on 8 / 12 GB cards, and for FLUX.2 [dev]'s 32B DiT and its Mistral-Small-3 text encoder (as loaded: 31 of
its 40 layers) on 16 / 24 GB cards, computed on the meta device.

No weights are needed: the model is built on the meta device and only tensor shapes are read. Each row
is what `pipe.enable_vram_management(vram_limit=card)` would plan for the DiT (or the text encoder, which has
the card to itself before denoising) (1024x1024, batch 1,
bf16 compute, default vram_buffer 0.5 GB): how many bytes stay resident, how many are streamed from
CPU RAM every denoising step (one DiT forward; twice that with sequential true CFG), and the expected
peak (residents + largest per-layer transient + activation estimate).

    python benchmarks/vram_plan.py
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import table  # noqa: E402
from diffsynth.loading.vram import GB, VramPlan, estimate_activation_bytes, plan_model  # noqa: E402
from diffsynth.models.flux2_dit import Flux2DiT, Flux2DiTConfig  # noqa: E402
from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig  # noqa: E402

CARDS = (8, 12, 24)
STORAGES = (("bf16", dict(storage_dtype=torch.bfloat16)), ("fp8 e4m3fn", dict(storage_dtype=torch.float8_e4m3fn)),
            ("GGUF Q8_0", dict(gguf_type="Q8_0")), ("GGUF Q4_K", dict(gguf_type="Q4_K")))


# FLUX.2 [klein] DiTs (diffusers' configs of the releases); their Qwen3 text encoders run before denoising.
KLEIN = {"FLUX.2 [klein] 4B": Flux2DiTConfig(hidden_size=3072, num_heads=24, num_double_blocks=5, num_single_blocks=20,
                                             context_dim=7680),
         "FLUX.2 [klein] 9B": Flux2DiTConfig(hidden_size=4096, num_heads=32, num_double_blocks=8, num_single_blocks=24,
                                             context_dim=12288)}


# FLUX.2 [dev]: diffusers' Flux2Transformer2DModel defaults (= the release), and Mistral-Small-3.1's text config
# with the layers FLUX.2 loads (the first 30: hidden state 30 is the last read; see models/flux2_text_encoder.py).
DEV = Flux2DiTConfig(hidden_size=6144, num_heads=48, num_double_blocks=8, num_single_blocks=48, context_dim=15360,
                     guidance_embed=True)
MISTRAL_SMALL_3 = dict(hidden_size=5120, intermediate_size=32768, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=131072, num_hidden_layers=30)
DEV_CARDS = (16, 24)


def mistral_encoder():
    """FLUX.2 [dev]'s text encoder as Flux2ImagePipeline holds it (our DecoderLM), on the meta device."""
    from diffsynth.models.decoder_lm import DecoderConfig, DecoderLM
    return DecoderLM(DecoderConfig.from_dict({**MISTRAL_SMALL_3, "rope_theta": 1e9, "rms_norm_eps": 1e-5},
                                             qk_norm=False))


@dataclass
class PlanRow:
    model: str
    parameters: int
    storage: str
    card_gb: int
    plan: VramPlan


def plans(name: str, dit, storages, cards, kind: str = "dit") -> list[PlanRow]:
    params = sum(p.numel() for p in dit.parameters())
    act = estimate_activation_bytes("text_encoder_mistral" if kind == "text" else "dit", dit, 1024, 1024, 1,
                                    torch.bfloat16)
    out, rows = [], []
    for label, storage in storages:
        for card in cards:
            plan = plan_model(dit, int((card - 0.5) * GB), torch.bfloat16, activation_bytes=act, **storage)
            total = plan.resident_bytes + plan.streamed_bytes
            out.append(PlanRow(name, params, label, card, plan))
            rows.append([label, f"{card} GB", f"{total / GB:.1f}", f"{plan.resident_bytes / GB:.1f}",
                         f"{len(plan.resident)}/{len(plan.resident) + len(plan.streamed)}",
                         f"{plan.streamed_bytes / GB:.1f}", f"{plan.peak_bytes / GB:.1f}",
                         "yes" if plan.fits else "no"])
    what = "text encoder, one 512-token prompt" if kind == "text" else "DiT, 1024x1024"
    print(f"{name} {what} ({params / 1e9:.2f}B parameters), bf16 compute, "
          f"activation estimate {act / GB:.2f} GB, vram_buffer 0.5 GB (GB = GiB)")
    print(table(rows, ["storage", "card", "weights GB", "resident GB", "resident layers",
                       "streamed GB / step", "expected peak GB", "fits"]))
    return out


def main() -> list[PlanRow]:
    with torch.device("meta"):
        out = plans("FLUX.1-dev", FluxDiT(FluxDiTConfig()), STORAGES, CARDS)
        for name, config in KLEIN.items():
            print()
            out += plans(name, Flux2DiT(config), STORAGES[:2], (8, 12))
        print()
        out += plans("FLUX.2 [dev]", Flux2DiT(DEV), STORAGES, DEV_CARDS)
        print()
        out += plans("FLUX.2 [dev] Mistral-Small-3", mistral_encoder(), STORAGES[:2], DEV_CARDS, kind="text")
    return out


if __name__ == "__main__":
    main()
