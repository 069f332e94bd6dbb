"""Loading a BFL single-file DiT (bf16, ~0.9 GB): load time and peak RSS, ours vs diffusers, fresh processes.

The file is a random FLUX-architecture DiT (1 double + 1 single block, width 3072) in BFL key names,
like `flux1-dev.safetensors`. Ours: `FluxImagePipeline.from_pretrained` with that one ModelConfig.
diffusers: what `FluxTransformer2DModel.from_single_file(low_cpu_mem_usage=True)` does once it has a
config (it would fetch one from the Hub): `load_state_dict` + `convert_flux_transformer_checkpoint_to_
diffusers` + model built under `init_empty_weights` + `load_model_dict_into_meta`. The file is read once
beforehand so that both read it from the page cache. Peak RSS counts everything resident in the
process (including file pages a loader maps), minus the RSS before loading.

    python benchmarks/load.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import MEMORY_ENV, emit, median, peak_growth_mb, reset_peak_rss, rss_mb, run_worker, table, warm_page_cache  # noqa: E402,E501

# FLUX.1's width (diffusers' converter assumes 3072) with 1 double + 1 single block: 0.49B parameters
CONFIG = dict(hidden_size=3072, num_heads=24, num_double_blocks=1, num_single_blocks=1, context_dim=4096,
              pooled_dim=768, axes_dim=(16, 56, 56))
REPS = 3


def write_file(path: Path) -> int:
    import torch
    from diffsynth.ops.files import save_safetensors
    from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_to_bfl
    with torch.device("meta"):
        model = FluxDiT(FluxDiTConfig(**CONFIG))
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_safetensors(dit_to_bfl(sd), path)
    return sum(v.numel() * 2 for v in sd.values())


def load_ours(path: str):
    import torch
    from diffsynth import FluxImagePipeline, ModelConfig
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu",
                                             model_configs=[ModelConfig(path=path)]).dit


def load_diffusers(path: str):
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from diffusers.models.model_loading_utils import load_model_dict_into_meta, load_state_dict
    checkpoint = load_state_dict(path)
    config = dict(patch_size=1, in_channels=64, num_layers=CONFIG["num_double_blocks"],
                  num_single_layers=CONFIG["num_single_blocks"], attention_head_dim=128,
                  num_attention_heads=CONFIG["num_heads"], joint_attention_dim=CONFIG["context_dim"],
                  pooled_projection_dim=CONFIG["pooled_dim"], guidance_embeds=True, axes_dims_rope=CONFIG["axes_dim"])
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint, config=config)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    load_model_dict_into_meta(model, converted, dtype=torch.bfloat16)
    return model.eval()


def worker(impl: str, path: str) -> None:
    import torch
    if impl == "ours":  # imports first: only the load itself is measured
        import diffsynth.pipelines.flux_image  # noqa: F401
    else:
        import accelerate, diffusers.loaders.single_file_utils, diffusers.models.model_loading_utils  # noqa: F401,E401
        from diffusers import FluxTransformer2DModel  # noqa: F401
    reset_peak_rss()
    before = rss_mb()
    t = time.perf_counter()
    model = (load_ours if impl == "ours" else load_diffusers)(path)
    call = time.perf_counter() - t
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    # A memory-mapped loader returns before reading: touch one byte per 4 KiB page of every weight, which
    # any first forward does anyway, so "ready" compares loaders that read eagerly and lazily alike.
    with torch.no_grad():
        for p in model.parameters():
            p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    ready = time.perf_counter() - t
    emit({"seconds": call, "ready_seconds": ready, "peak_mb": peak_growth_mb(before), "weights_mb": weights})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flux-mid-bf16.safetensors"
        size = write_file(path) / 2**20
        warm_page_cache(path)
        runs = {"ours": [], "diffusers": []}
        for rep in range(REPS):
            for impl in ("diffusers", "ours") if rep % 2 == 0 else ("ours", "diffusers"):
                runs[impl].append(run_worker(__file__, impl, str(path), env=MEMORY_ENV))
    med = lambda impl, key: median([r[key] for r in runs[impl]])  # noqa: E731
    rows = [[impl, f"{med(impl, 'seconds'):.2f}", f"{med(impl, 'ready_seconds'):.2f}", f"{med(impl, 'peak_mb'):.0f}",
             f"{med(impl, 'peak_mb') / size:.2f}"] for impl in runs]
    print(f"Load a BFL single-file DiT, bf16, {size:.0f} MB of weights (median of {REPS} fresh processes each)")
    print(table(rows, ["loader", "load call s", "ready s (all pages touched)", "peak RSS MB", "peak RSS / weights"]))
    print(f"ours/diffusers: ready time {med('ours', 'ready_seconds') / med('diffusers', 'ready_seconds'):.2f}, "
          f"peak RSS {med('ours', 'peak_mb') / med('diffusers', 'peak_mb'):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
