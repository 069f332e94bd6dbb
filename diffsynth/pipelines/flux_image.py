"""FluxImagePipeline: FLUX.1 text-to-image and image-to-image, built from the user's checkpoint files."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ..loading.model_config import ModelConfig
from ..loading.registry import build, detect
from ..models import flux_text_encoders as te
from ..models.flux_dit import image_ids
from ..models.flux_dit_cache import make_cache
from ..ops.files import load_state_dict
from ..schedulers.flow_match import DEFAULT_SHIFT, flux_sigmas, flux_training_sigmas
from .base import BasePipeline, ModelList, draw_noise, either, tokenizer_dir
from .checks import check_call_args, check_known_inputs, check_text, require_models
from .denoise import PROMPT_OUTPUTS, model_fn
from .images import VAE_FACTOR
from .common_units import check_shape, encode_input_image
from .units import StepUnit, Unit, order_units, unit
from .variants import UNITS as VARIANT_UNITS
from .variants.controlnet import ControlNetInput

# What DiffSynth-Studio's scripts import from this module (2.0; 1.x's `flux_image_new` re-exports them).
__all__ = ["FluxImagePipeline", "ModelConfig", "ModelList", "ControlNetInput", "load_state_dict"]

LATENT_CHANNELS = 16
DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FLUX.1-dev's, as DiffSynth-Studio's pipeline


# ----------------------------------------------------------------------------- units

@unit(outputs=("noise", "seed"), stack=("noise",))
def init_noise(pipe, height, width, seed=None, rand_device="cpu", num_images=1):
    """fp32 Gaussian noise drawn on `rand_device`; image i of a batch uses seed + i."""
    return draw_noise(pipe, (1, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR), seed, rand_device,
                      num_images)


TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2")


@unit(per_branch=True, models=("text_encoder_1", "text_encoder_2"), outputs=PROMPT_OUTPUTS,
      model_inputs=PROMPT_OUTPUTS, cacheable=PROMPT_OUTPUTS)
def encode_prompt(pipe, prompt, t5_sequence_length=512, num_images=1):
    require_models(pipe, TEXT_ENCODERS, "the prompt")
    check_text("prompt", prompt)
    device = pipe.compute_device_of("text_encoder_1")
    pooled = te.encode_prompt_clip(pipe.tokenizer_1, pipe.text_encoder_1, [prompt], device)
    device = pipe.compute_device_of("text_encoder_2")
    emb = te.encode_prompt_t5(pipe.tokenizer_2, pipe.text_encoder_2, [prompt], t5_sequence_length, device)
    emb = emb.to(pipe.device, pipe.torch_dtype).repeat(num_images, 1, 1)
    return {"prompt_emb": emb, "pooled_prompt_emb": pooled.to(pipe.device, pipe.torch_dtype).repeat(num_images, 1),
            "text_ids": torch.zeros(num_images, emb.shape[1], 3, device=pipe.device)}


@unit(outputs=("image_ids", "guidance"), model_inputs=("image_ids", "guidance"), batched=("image_ids", "guidance"))
def prepare_ids_and_guidance(pipe, noise, embedded_guidance=DEFAULT_EMBEDDED_GUIDANCE):
    b, _, h, w = noise.shape
    return {"image_ids": image_ids(h, w, b, device=pipe.device),
            "guidance": torch.full((b,), float(embedded_guidance), device=pipe.device)}


CORE_UNITS: list[Unit] = [check_shape, init_noise, encode_prompt, encode_input_image, prepare_ids_and_guidance]
BASE_UNITS: list[Unit | StepUnit] = order_units([*CORE_UNITS, *VARIANT_UNITS])


# ----------------------------------------------------------------------------- the pipeline

class FluxImagePipeline(BasePipeline):
    """DiffSynth-Studio's FLUX pipeline. Model attributes (dit, text_encoder_1, text_encoder_2, vae_encoder,
    vae_decoder, and the variants' models) come from the component table, `loading.components`."""

    family = "flux"
    guidance_hint = " (schnell-like; cfg_scale > 1 gives true CFG)"
    compiled_blocks = ("blocks", "single_blocks")  # FLUX.1's 57 blocks share 2 compiled graphs
    prompt_unit, text_encoders = encode_prompt, TEXT_ENCODERS
    training_sigmas = staticmethod(flux_training_sigmas)

    def __init__(self, device: str | torch.device = "cuda", torch_dtype: torch.dtype = torch.bfloat16):
        super().__init__(device, torch_dtype, BASE_UNITS, model_fn)
        self.tokenizer_1 = self.tokenizer_2 = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                        model_configs: Sequence[ModelConfig] = (),
                        tokenizer_1_path: str | ModelConfig | None = None,
                        tokenizer_2_path: str | ModelConfig | None = None,
                        vram_limit: float | None = None,
                        tokenizer_1_config: ModelConfig | None = None,
                        tokenizer_2_config: ModelConfig | None = None,
                        nexus_gen_processor_config: str | ModelConfig | None = None,
                        step1x_processor_config: str | ModelConfig | None = None,
                        parallel: str | None = None) -> "FluxImagePipeline":
        """Build a pipeline from checkpoint files; each file is recognised from its keys and shapes.

        `vram_limit` (GB, DiffSynth-Studio 2.0): when given, VRAM management is enabled after loading with
        that limit and no further buffer (2.0's scripts subtract their own margin), see enable_vram_management.
        `tokenizer_N_config` is 2.0's name for `tokenizer_N_path`. `nexus_gen_processor_config` /
        `step1x_processor_config` (a folder or a `ModelConfig`): where the Nexus-Gen / Step1X-Edit Qwen2.5-VL
        processor files are (default: beside the model's weights, or their `processor/` subfolder).
        `parallel`: multi-device inference, one process per device started by torchrun (a bare "cuda" device
        becomes cuda:LOCAL_RANK); every process returns the same images. "context": each process runs the
        DiT on its share of the tokens; "tensor": each process holds 1/N of the DiT blocks' heads and MLP
        channels (no VRAM management, LoRAs or compilation with it yet). See ops/parallel.py.
        """
        device = cls._check_load_args(device, vram_limit, parallel)
        pipe = cls(device=device, torch_dtype=torch_dtype)
        processor_dirs = {family: _folder(config) for family, config in (
            ("nexus-gen-llm", nexus_gen_processor_config), ("qwen2.5-vl", step1x_processor_config))
            if config is not None}
        encoder_sources = pipe._load_models(model_configs, processor_dirs)
        if pipe.text_encoder_1 is not None:
            pipe.tokenizer_1 = te.load_clip_tokenizer(tokenizer_dir(
                either(tokenizer_1_path, tokenizer_1_config, "tokenizer_1"), encoder_sources["text_encoder_1"],
                "tokenizer", "tokenizer_1_path"))
        if pipe.text_encoder_2 is not None:
            pipe.tokenizer_2 = te.load_t5_tokenizer(tokenizer_dir(
                either(tokenizer_2_path, tokenizer_2_config, "tokenizer_2"), encoder_sources["text_encoder_2"],
                "tokenizer_2", "tokenizer_2_path"))
        if parallel == "tensor":
            pipe._shard_dit()
        if vram_limit is not None:
            pipe.enable_vram_management(vram_limit=vram_limit, vram_buffer=0)
        return pipe

    def load_timestep_lora(self, lora_config: ModelConfig | str, alpha: float = 2.0) -> None:
        """DiffSynth-Studio 2.0's timestep LoRA (e.g. DiffSynth-Studio/MultiAlign-FLUX.1-dev): a DiT LoRA whose
        features are modulated by the timestep, applied at every DiT evaluation (never merged) with weight
        `alpha`. Replaces a timestep LoRA loaded before; `pipe.timestep_lora = None` removes it."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if self.dit is None:
            raise RuntimeError("load_timestep_lora needs the DiT: load it first")
        paths = lora_config.resolve() if isinstance(lora_config, ModelConfig) else lora_config
        found = detect(paths)
        if [d.family for d in found] != ["flux-timestep-lora"]:
            raise ValueError(f"{paths} is not a timestep LoRA (found {', '.join(d.family for d in found)}); "
                             "a plain LoRA goes to pipe.load_lora(pipe.dit, ...)")
        lora = build(found[0], self.torch_dtype, self.device, compute_dtype=self.torch_dtype)["timestep_lora"]
        lora.check(self.dit)
        lora.alpha = float(alpha)
        self.timestep_lora = lora

    def enable_lora_magic(self) -> None:
        """With a LoRA-Fusion patcher loaded, hot-loaded DiT LoRAs are blended by its learned gates instead of
        summed (load them with `hotload=True`). Hot-loading itself needs no enabling."""
        if self.lora_patcher is None:
            return
        from ..loading.lora.apply import set_lora_mergers
        mergers = self.lora_patcher.mergers()
        missing = sorted(set(mergers) - set(set_lora_mergers(self.dit, mergers)))
        if missing:
            raise ValueError(f"the LoRA-Fusion patcher has layers this DiT lacks: {missing[:5]}")

    enable_lora_merger = enable_lora_magic  # DiffSynth-Studio 2.0's name

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE, t5_sequence_length: int = 512,
                 input_image: Image.Image | None = None, denoising_strength: float = 1.0,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 rand_device: str = "cpu", sigma_shift: float | None = None, num_inference_steps: int = 30,
                 tiled: bool = False, tile_size: int = 128, tile_stride: int = 64,
                 progress_bar_cmd: Callable = tqdm, num_images: int = 1, output_type: str = "pil",
                 tea_cache_l1_thresh: float | None = None, fbcache_thresh: float | None = None,
                 batch_cfg: bool = True, **variant_inputs):
        """Generate images. Returns one PIL image (a list when num_images > 1), or tensors, see output_type.
        Each PIL image carries its seed in `image.info["seed"]` (image i of a batch: seed + i; a random seed when
        `seed=None`); `pipe.last_seed` holds the calling thread's last seed.

        output_type: "pil"; "pt" -> (B, 3, H, W) float in [0, 1] on the device; "latent" -> (B, 16, H/8, W/8).
        tea_cache_l1_thresh / fbcache_thresh: TeaCache or First-Block-Cache threshold (one per call; larger
        skips more steps; 0 never skips); what was skipped is in `pipe.last_cache_stats`.
        batch_cfg: with cfg_scale != 1, run the positive and negative branch in one DiT batch.
        variant_inputs: the inputs of the model variants (kontext_images, ...), see the README; a name that
        no unit of this pipeline reads is an error.
        """
        check_call_args(locals())  # types, ranges, finiteness, sizes: before anything is allocated
        self.warn_if_guidance_unused(embedded_guidance, DEFAULT_EMBEDDED_GUIDANCE)
        sigmas = flux_sigmas(num_inference_steps, denoising_strength,
                             DEFAULT_SHIFT if sigma_shift is None else sigma_shift)
        shared = dict(
            cfg_scale=cfg_scale, embedded_guidance=embedded_guidance, t5_sequence_length=t5_sequence_length,
            input_image=input_image, denoising_strength=denoising_strength, height=height, width=width,
            seed=seed, rand_device=rand_device, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride,
            num_images=num_images, sigmas=sigmas)
        posi, nega = {"prompt": prompt}, {"prompt": negative_prompt}
        # Variant arguments: what units read that neither this call nor the core units provide.
        produced = {o for u in CORE_UNITS for o in u.outputs}
        variants = self.accepted_inputs() - shared.keys() - posi.keys() - produced
        check_known_inputs(variant_inputs, variants, "unknown argument(s)")
        shared.update(variant_inputs)
        cache = make_cache(tea_cache_l1_thresh, fbcache_thresh, num_inference_steps, cfg_scale != 1.0)
        return self.generate(shared, posi, nega, cfg_scale, batch_cfg, cache, progress_bar_cmd, output_type)


def _folder(config: str | os.PathLike | ModelConfig) -> str:
    """The folder a path or ModelConfig names (a folder pattern resolves to the folder, files to theirs)."""
    if not isinstance(config, (str, os.PathLike, ModelConfig)):
        raise TypeError(f"a processor config must be a folder or a ModelConfig, got {type(config).__name__}")
    if isinstance(config, ModelConfig) and config.model_id is None and isinstance(config.path, str) \
            and not os.path.exists(config.path):
        # 2.0's scripts write ModelConfig("owner/name", origin_file_pattern=...): the repository id positionally
        config = ModelConfig(model_id=config.path, origin_file_pattern=config.origin_file_pattern,
                             local_model_path=config.local_model_path, download_resource=config.download_resource)
    paths = config.resolve() if isinstance(config, ModelConfig) else config
    first = Path(paths if isinstance(paths, (str, os.PathLike)) else paths[0])
    return str(first if first.is_dir() else first.parent)
