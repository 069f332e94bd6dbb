"""FluxImagePipeline: FLUX.1 text-to-image and image-to-image, built from the user's checkpoint files."""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..loading import vram
from ..ops.attention import set_attention_backend as _set_attention_backend
from ..models.flux_dit_cache import cached_dit_forward, make_cache
from ..loading.model_config import ModelConfig
from ..loading.registry import COMPONENTS, build, detect
from ..models import flux_text_encoders as te
from ..models.flux_dit import image_ids, patchify, unpatchify
from ..schedulers.flow_match import DEFAULT_SHIFT, add_noise, euler_step, flux_sigmas
from .checks import check_call_args, check_finite
from .units import Unit, run_units, unit

LATENT_CHANNELS = 16
VAE_FACTOR = 8
SIZE_MULTIPLE = 16  # VAE 8x, then 2x2 patches


# ----------------------------------------------------------------------------- image <-> tensor

def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) when its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images (rounded to uint8)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in x]


# ----------------------------------------------------------------------------- units

@unit()
def check_shape(pipe, height=None, width=None, input_image=None):
    """Default size: the input image's, else 1024. Sizes are rounded up to a multiple of 16, with a warning."""
    default_h, default_w = (input_image.height, input_image.width) if input_image is not None else (1024, 1024)
    height = default_h if height is None else height
    width = default_w if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rounded = tuple(-(-v // SIZE_MULTIPLE) * SIZE_MULTIPLE for v in (height, width))
    if rounded != (height, width):
        warnings.warn(f"height/width must be multiples of {SIZE_MULTIPLE}: {height}x{width} "
                      f"rounded up to {rounded[0]}x{rounded[1]}", stacklevel=4)
    return {"height": rounded[0], "width": rounded[1]}


@unit()
def init_noise(pipe, height, width, seed=None, rand_device="cpu", num_images=1):
    """fp32 Gaussian noise drawn on `rand_device`; image i of a batch uses seed + i."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    shape = (1, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator(rand_device).manual_seed(seed + i),
                                   device=rand_device, dtype=torch.float32) for i in range(num_images)])
    return {"noise": noise.to(pipe.device, pipe.torch_dtype), "seed": seed}


@unit(per_branch=True, models=("text_encoder_1", "text_encoder_2"))
def encode_prompt(pipe, prompt, t5_sequence_length=512, num_images=1):
    if pipe.text_encoder_1 is None or pipe.text_encoder_2 is None:
        raise RuntimeError("this pipeline has no text encoders loaded: add CLIP (text_encoder/model.safetensors) "
                           "and T5 (text_encoder_2/) ModelConfigs")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    device = pipe.compute_device_of("text_encoder_1")
    pooled = te.encode_prompt_clip(pipe.tokenizer_1, pipe.text_encoder_1, [prompt], device)
    device = pipe.compute_device_of("text_encoder_2")
    emb = te.encode_prompt_t5(pipe.tokenizer_2, pipe.text_encoder_2, [prompt], t5_sequence_length, device)
    emb = emb.to(pipe.device, pipe.torch_dtype).repeat(num_images, 1, 1)
    return {"prompt_emb": emb, "pooled_prompt_emb": pooled.to(pipe.device, pipe.torch_dtype).repeat(num_images, 1),
            "text_ids": torch.zeros(num_images, emb.shape[1], 3, device=pipe.device)}


@unit()
def encode_input_image(pipe, noise, sigmas, height, width, input_image=None, denoising_strength=1.0,
                       tiled=False, tile_size=128, tile_stride=64):
    """Inference starts from noise (txt2img) or the noised input latents (img2img); training keeps x0."""
    if input_image is None:
        if denoising_strength != 1.0:
            raise ValueError(f"denoising_strength={denoising_strength} needs an input_image "
                             "(it says how much of the input image to keep)")
        return {"latents": noise}
    if pipe.vae_encoder is None:
        raise RuntimeError("input_image needs the VAE encoder: load ae.safetensors")
    pipe.load_models_to_device(("vae_encoder",))  # only when there is an image: txt2img never moves it
    x = image_to_tensor(input_image, width, height).to(pipe.compute_device_of("vae_encoder"), pipe.torch_dtype)
    # tile_size/tile_stride are latent units for both VAE halves (the encoder works in pixels)
    x0 = pipe.vae_encoder(x, tiled=tiled, tile_size=tile_size * VAE_FACTOR, tile_stride=tile_stride * VAE_FACTOR)
    x0 = x0.to(pipe.device, pipe.torch_dtype).repeat(noise.shape[0], 1, 1, 1)
    return {"latents": add_noise(x0, noise, sigmas[0].item()), "input_latents": x0}


@unit()
def prepare_ids_and_guidance(pipe, noise, embedded_guidance=3.5):
    b, _, h, w = noise.shape
    return {"image_ids": image_ids(h, w, b, device=pipe.device),
            "guidance": torch.full((b,), float(embedded_guidance), device=pipe.device)}


BASE_UNITS: list[Unit] = [check_shape, init_noise, encode_prompt, encode_input_image, prepare_ids_and_guidance]


# ----------------------------------------------------------------------------- the denoiser call

def model_fn(dit, latents, timestep, prompt_emb, pooled_prompt_emb, text_ids, image_ids, guidance=None,
             cache_states=None, step_index=0, **_):
    """One DiT evaluation: latents (B, 16, h, w) and sigma (B,) -> velocity (B, 16, h, w).

    `cache_states`: one TeaCache/First-Block-Cache state per CFG branch in the batch (None: no cache).
    """
    _, _, h, w = latents.shape
    guidance = guidance if dit.config.guidance_embed else None
    if cache_states is None:
        out = dit(patchify(latents), image_ids, prompt_emb, text_ids, timestep, pooled_prompt_emb, guidance)
    else:
        out = cached_dit_forward(dit, cache_states, step_index, patchify(latents), image_ids, prompt_emb,
                                 text_ids, timestep, pooled_prompt_emb, guidance)
    return unpatchify(out, h, w)


# Step-independent shared inputs of model_fn that carry the batch dimension.
CFG_BATCHED_SHARED = ("image_ids", "guidance")


def batch_cfg_inputs(shared: dict, posi: dict, nega: dict) -> dict | None:
    """The step-independent model_fn inputs with the positive and negative branch stacked along the batch
    (positive first), built once per call; None when the branches' tensors cannot be stacked."""
    merged = {**shared, **posi}
    for key, value in posi.items():
        if isinstance(value, torch.Tensor):
            other = nega.get(key)
            if not isinstance(other, torch.Tensor) or other.shape != value.shape:
                return None
            merged[key] = torch.cat([value, other])
    for key in CFG_BATCHED_SHARED:
        if isinstance(merged.get(key), torch.Tensor):
            merged[key] = torch.cat([merged[key], merged[key]])
    return merged


# ----------------------------------------------------------------------------- the pipeline

class FluxImagePipeline(nn.Module):
    """Attributes follow SPEC.md: dit, text_encoder_1, text_encoder_2, vae_encoder, vae_decoder."""

    def __init__(self, device: str | torch.device = "cuda", torch_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        for name in COMPONENTS:
            setattr(self, name, None)
        self.tokenizer_1 = self.tokenizer_2 = None
        self.units: list[Unit] = list(BASE_UNITS)
        self.model_fn: Callable = model_fn
        self.offload = {}  # attribute -> (storage device, storage dtype) from ModelConfig
        self.vram_models: dict[str, vram.ManagedModel] = {}  # models whose storage differs from computation
        self.vram_plans: dict = {}
        self.vram_management_enabled = False
        self.last_cache_stats: dict | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                        model_configs: Sequence[ModelConfig] = (),
                        tokenizer_1_path: str | ModelConfig | None = None,
                        tokenizer_2_path: str | ModelConfig | None = None) -> "FluxImagePipeline":
        """Build a pipeline from checkpoint files; each file is recognised from its keys and shapes."""
        pipe = cls(device=device, torch_dtype=torch_dtype)
        encoder_sources = {}
        for config in model_configs:
            if not isinstance(config, ModelConfig):
                raise TypeError(f"model_configs must hold ModelConfig objects, got {type(config).__name__}")
            paths = config.resolve()
            for det in detect(paths):
                models = build(det, config.offload_dtype or torch_dtype, config.offload_device or device,
                               compute_dtype=torch_dtype)
                for name, model in models.items():
                    if getattr(pipe, name) is not None:
                        warnings.warn(f"{name} loaded twice; keeping the one from {det.source}")
                    setattr(pipe, name, model)
                    pipe.offload[name] = (config.offload_device, config.offload_dtype)
                    vram.register_model(pipe, name, model, config.offload_device or device, device, torch_dtype)
                    encoder_sources[name] = (paths, config)
        if pipe.text_encoder_1 is not None:
            pipe.tokenizer_1 = te.load_clip_tokenizer(
                _tokenizer_dir(tokenizer_1_path, encoder_sources["text_encoder_1"], "tokenizer"))
        if pipe.text_encoder_2 is not None:
            pipe.tokenizer_2 = te.load_t5_tokenizer(
                _tokenizer_dir(tokenizer_2_path, encoder_sources["text_encoder_2"], "tokenizer_2"))
        return pipe

    # -- LoRA --------------------------------------------------------------------------------------
    def load_lora(self, module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False, strict: bool = True):
        """Apply a LoRA file (any supported dialect) or state dict to `module` (usually `pipe.dit`).

        Merged into the weights by default; `hotload=True` keeps base weights untouched so that
        `clear_lora()` restores them exactly. Text-encoder keys in the file (kohya `lora_te1_*`) go to
        `text_encoder_1`. Keys that match no layer raise, listing them (`strict=False`: warn instead).
        """
        from ..loading.lora import load_lora_into_pipeline
        return load_lora_into_pipeline(self, module, lora, alpha=alpha, hotload=hotload, strict=strict)

    def clear_lora(self) -> None:
        """Remove every hot-loaded LoRA from every model of the pipeline."""
        from ..loading.lora import clear_lora
        for name in COMPONENTS:
            if getattr(self, name) is not None:
                clear_lora(getattr(self, name))

    # -- memory and speed ------------------------------------------------------------------------
    def enable_vram_management(self, vram_limit: float | None = None, vram_buffer: float = 0.5,
                               num_persistent_param_in_dit: int | None = None) -> dict:
        """Keep layers resident on the device while under `vram_limit` GB (default: the device's free memory
        now) minus `vram_buffer` GB; stream the rest from their storage device (ModelConfig.offload_device)
        at every call. `vram_limit=0` keeps nothing resident (minimum VRAM). `num_persistent_param_in_dit`
        instead keeps that many DiT parameters resident, in module order. Models not needed by the running
        step are moved off the device. The plan reserves the largest layer's transient copy and activations
        estimated for 1024x1024 with one image per DiT call (batched CFG doubles those: on a tight card raise
        `vram_buffer` or pass `batch_cfg=False`). Returns the plans, {group of models: VramPlan}."""
        return vram.enable_vram_management(self, vram_limit, vram_buffer, num_persistent_param_in_dit)

    def vram_plan(self, vram_limit_gb: float, vram_buffer: float = 0.5, height: int = 1024, width: int = 1024,
                  batch: int = 1, storage_dtype: torch.dtype | None = None, gguf_type: str | None = None,
                  num_persistent_param_in_dit: int | None = None) -> dict:
        """What enable_vram_management would plan for a `vram_limit_gb` card, for every loaded model as if it
        were offloadable (works on meta-device models). `storage_dtype`/`gguf_type` try another storage."""
        budget = max(0, int((vram_limit_gb - vram_buffer) * vram.GB))
        return vram.plan_pipeline(self, budget, num_persistent_param_in_dit, height, width, batch,
                                  only_offloadable=False, storage_dtype=storage_dtype, gguf_type=gguf_type)

    def load_models_to_device(self, names: Sequence[str]) -> None:
        """Under VRAM management: residents of `names` onto the device, other models' residents off it."""
        vram.load_models_to_device(self, names)

    def compute_device_of(self, name: str) -> torch.device:
        model = getattr(self, name)
        if model is None or name in self.vram_models:
            return self.device
        return next(model.parameters()).device

    def set_attention_backend(self, name: str) -> None:
        """"auto" (default), "sdpa", "flash", "sage" or "math"; see diffsynth.ops.attention. Process-wide."""
        _set_attention_backend(name)

    def compile(self, **compile_kwargs) -> "FluxImagePipeline":
        """Regional compilation: each DiT double/single block is compiled with torch.compile (the 57 blocks
        of FLUX.1 share 2 compiled graphs). Hot-loaded LoRAs keep working: loading or clearing one changes
        the layers' forward hooks, which the compiled blocks guard on (this sets the process-wide
        `torch._dynamo.config.skip_nnmodule_hook_guards = False`), so each new LoRA set recompiles once
        and returning to an earlier set reuses its graph. Merged LoRAs change weights in place and need no
        recompilation. Compiled graphs are shared by all blocks of a kind; after about 8 different LoRA
        sets torch's recompile limit makes them run eagerly (`torch._dynamo.config.cache_size_limit`).
        `compile_kwargs` go to torch.compile (mode, backend, dynamic, ...)."""
        if self.dit is None:
            raise RuntimeError("no DiT loaded")
        import torch._dynamo
        from ..ops import attention
        attention._flash_fn(), attention._sage_fn()  # import optional kernels before tracing
        # Hot-loaded LoRAs are forward hooks: make compiled blocks guard on hooks (torch skips that by
        # default), so adding/removing a LoRA recompiles instead of silently running the old graph.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        for block in [*self.dit.blocks, *self.dit.single_blocks]:
            block.compile(**compile_kwargs)
        return self

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = 3.5, t5_sequence_length: int = 512,
                 input_image: Image.Image | None = None, denoising_strength: float = 1.0,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 rand_device: str = "cpu", sigma_shift: float | None = None, num_inference_steps: int = 30,
                 tiled: bool = False, tile_size: int = 128, tile_stride: int = 64,
                 progress_bar_cmd: Callable = tqdm, num_images: int = 1, output_type: str = "pil",
                 tea_cache_l1_thresh: float | None = None, fbcache_thresh: float | None = None,
                 batch_cfg: bool = True):
        """Generate images. Returns one PIL image (a list when num_images > 1), or tensors, see output_type.

        output_type: "pil"; "pt" -> (B, 3, H, W) float in [0, 1]; "latent" -> (B, 16, H/8, W/8).
        tea_cache_l1_thresh / fbcache_thresh: TeaCache or First-Block-Cache threshold (one per call; larger
        skips more steps; 0 never skips); what was skipped is in `pipe.last_cache_stats`.
        batch_cfg: with cfg_scale != 1, run the positive and negative branch in one DiT batch.
        """
        check_call_args(locals())  # types, ranges, finiteness, sizes: before anything is allocated
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if tiled and not 0 < tile_stride <= tile_size:
            raise ValueError(f"tile_stride ({tile_stride}) must be in (0, tile_size={tile_size}]")
        if self.dit is None:
            raise RuntimeError("no DiT loaded: add the FLUX transformer checkpoint to model_configs")
        sigmas = flux_sigmas(num_inference_steps, denoising_strength,
                             DEFAULT_SHIFT if sigma_shift is None else sigma_shift)
        shared = dict(
            cfg_scale=cfg_scale, embedded_guidance=embedded_guidance, t5_sequence_length=t5_sequence_length,
            input_image=input_image, denoising_strength=denoising_strength, height=height, width=width,
            seed=seed, rand_device=rand_device, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride,
            num_images=num_images, sigmas=sigmas)
        posi, nega = {"prompt": prompt}, {"prompt": negative_prompt}
        use_cfg = cfg_scale != 1.0
        run_units(self, self.units, shared, posi, nega, use_cfg)

        self.load_models_to_device(("dit",))
        cache = make_cache(tea_cache_l1_thresh, fbcache_thresh, num_inference_steps, use_cfg)
        states = (lambda *b: [cache.branches[x] for x in b]) if cache is not None else (lambda *b: None)
        latents = shared["latents"]
        steps = sigmas.tolist() + [0.0]
        batched = batch_cfg_inputs(shared, posi, nega) if use_cfg and batch_cfg else None
        for i in progress_bar_cmd(range(num_inference_steps)):
            timestep = torch.full((latents.shape[0],), steps[i], device=self.device, dtype=self.torch_dtype)
            step = {"latents": latents, "timestep": timestep, "step_index": i}
            if batched is not None:
                both = {**batched, "latents": latents.repeat(2, 1, 1, 1), "timestep": timestep.repeat(2), "step_index": i}
                velocity, negative = self.model_fn(self.dit, **both, cache_states=states("posi", "nega")).chunk(2)
                velocity = negative + cfg_scale * (velocity - negative)
            else:
                velocity = self.model_fn(self.dit, **{**shared, **posi, **step}, cache_states=states("posi"))
                if use_cfg:
                    negative = self.model_fn(self.dit, **{**shared, **nega, **step}, cache_states=states("nega"))
                    velocity = negative + cfg_scale * (velocity - negative)
            latents = euler_step(latents, velocity, steps[i], steps[i + 1])
        check_finite(self, latents, "latents", {**shared, **posi})
        self.last_cache_stats = cache.stats() if cache is not None else None
        self.last_seed = shared["seed"]
        if output_type == "latent":
            return latents
        if self.vae_decoder is None:
            raise RuntimeError("decoding needs the VAE decoder: load ae.safetensors (or use output_type='latent')")
        self.load_models_to_device(("vae_decoder",))
        image = self.vae_decoder(latents.to(self.compute_device_of("vae_decoder"), self.torch_dtype),
                                 tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        check_finite(self, image, "decoded image", {})
        if output_type == "pt":
            return ((image.float().clamp(-1, 1) + 1) / 2).cpu()
        images = tensor_to_images(image)
        return images[0] if num_images == 1 else images


def _tokenizer_dir(explicit, source, name: str) -> str:
    """Where a tokenizer is: given explicitly, else beside the text encoder (the FLUX.1-dev repo layout)."""
    if isinstance(explicit, ModelConfig):
        return str(explicit.resolve())
    if explicit is not None:
        return str(explicit)
    paths, config = source
    first = Path(paths if isinstance(paths, (str, os.PathLike)) else paths[0])
    encoder_dir = first if first.is_dir() else first.parent
    candidates = [encoder_dir.parent / name, encoder_dir]
    for c in candidates:
        if (c / "vocab.json").is_file() or (c / "spiece.model").is_file() or (c / "tokenizer.json").is_file():
            return str(c)
    if config.model_id is not None and not config.skip_download:  # the tokenizer from the same repository
        cfg = ModelConfig(model_id=config.model_id, origin_file_pattern=f"{name}/",
                          local_model_path=config.local_model_path, download_resource=config.download_resource)
        return str(cfg.resolve())
    raise FileNotFoundError(
        f"no {name} found for the text encoder at {first}: looked in {[str(c) for c in candidates]}. "
        f"Pass {'tokenizer_1_path' if name == 'tokenizer' else 'tokenizer_2_path'}= to from_pretrained")
