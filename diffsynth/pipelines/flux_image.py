"""FluxImagePipeline: FLUX.1 text-to-image and image-to-image, built from the user's checkpoint files."""
from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..loading import components as table
from ..loading import vram
from ..ops.devices import random_generator
from ..loading.model_config import ModelConfig
from ..loading.registry import build, detect
from ..models import flux_text_encoders as te
from ..models.flux_dit import image_ids
from ..models.flux_dit_cache import make_cache
from ..ops.attention import set_attention_backend as _set_attention_backend
from ..ops.files import load_state_dict, scan
from ..schedulers.flow_match import DEFAULT_SHIFT, add_noise, euler_step, flux_sigmas
from .checks import check_call_args, check_finite
from .denoise import batch_cfg_inputs, model_fn
from .images import VAE_FACTOR, image_to_tensor, tensor_to_images, vae_encode
from .units import StepUnit, Unit, active_units, run_units, unit
from .variants import FIRST_UNITS
from .variants import UNITS as VARIANT_UNITS
from .variants.controlnet import ControlNetInput

# What DiffSynth-Studio's scripts import from this module (2.0; 1.x's `flux_image_new` re-exports them).
__all__ = ["FluxImagePipeline", "ModelConfig", "ControlNetInput", "load_state_dict"]

LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16  # VAE 8x, then 2x2 patches


# ----------------------------------------------------------------------------- units

@unit(outputs=("height", "width"))
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


@unit(outputs=("noise", "seed"))
def init_noise(pipe, height, width, seed=None, rand_device="cpu", num_images=1):
    """fp32 Gaussian noise drawn on `rand_device`; image i of a batch uses seed + i."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    shape = (1, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)
    noise = torch.cat([torch.randn(shape, generator=random_generator(rand_device, seed + i), device=rand_device,
                                   dtype=torch.float32) for i in range(num_images)])
    return {"noise": noise.to(pipe.device, pipe.torch_dtype), "seed": seed}


PROMPT_OUTPUTS = ("prompt_emb", "pooled_prompt_emb", "text_ids")


@unit(per_branch=True, models=("text_encoder_1", "text_encoder_2"), outputs=PROMPT_OUTPUTS,
      model_inputs=PROMPT_OUTPUTS, cacheable=PROMPT_OUTPUTS)
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


@unit(uses=("vae_encoder",), outputs=("latents", "input_latents"), cacheable=("input_latents",))
def encode_input_image(pipe, noise, sigmas, height, width, input_image=None, denoising_strength=1.0,
                       tiled=False, tile_size=128, tile_stride=64):
    """Inference starts from noise (txt2img) or the noised input latents (img2img); training keeps x0."""
    if input_image is None:
        if denoising_strength != 1.0:
            raise ValueError(f"denoising_strength={denoising_strength} needs an input_image "
                             "(it says how much of the input image to keep)")
        return {"latents": noise}
    x0 = vae_encode(pipe, image_to_tensor(input_image, width, height), "input_image", tiled, tile_size, tile_stride)
    x0 = x0.repeat(noise.shape[0], 1, 1, 1)
    return {"latents": add_noise(x0, noise, sigmas[0].item()), "input_latents": x0}


@unit(outputs=("image_ids", "guidance"), model_inputs=("image_ids", "guidance"), batched=("image_ids", "guidance"))
def prepare_ids_and_guidance(pipe, noise, embedded_guidance=3.5):
    b, _, h, w = noise.shape
    return {"image_ids": image_ids(h, w, b, device=pipe.device),
            "guidance": torch.full((b,), float(embedded_guidance), device=pipe.device)}


CORE_UNITS: list[Unit] = [check_shape, init_noise, encode_prompt, encode_input_image, prepare_ids_and_guidance]
BASE_UNITS: list[Unit | StepUnit] = [*FIRST_UNITS, *CORE_UNITS, *VARIANT_UNITS]


# ----------------------------------------------------------------------------- the pipeline

class ModelList(nn.ModuleList):
    """A `many` component (`pipe.controlnet`): models in load order. `.models` is the list itself, the name
    DiffSynth-Studio scripts use (`pipe.controlnet.models[0]`)."""

    @property
    def models(self) -> "ModelList":
        return self

    def gradient_checkpointing_enable(self) -> None:
        for model in self:
            model.gradient_checkpointing = True


class FluxImagePipeline(nn.Module):
    """DiffSynth-Studio's FLUX pipeline. Model attributes (dit, text_encoder_1, text_encoder_2, vae_encoder,
    vae_decoder, and the variants' models) come from the component table, `loading.components`."""

    def __init__(self, device: str | torch.device = "cuda", torch_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        for c in table.COMPONENTS:
            setattr(self, c.name, ModelList() if c.many else None)
        self.tokenizer_1 = self.tokenizer_2 = None
        self.units: list[Unit | StepUnit] = list(BASE_UNITS)
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
                        tokenizer_2_path: str | ModelConfig | None = None,
                        vram_limit: float | None = None,
                        tokenizer_1_config: ModelConfig | None = None,
                        tokenizer_2_config: ModelConfig | None = None,
                        nexus_gen_processor_config: str | ModelConfig | None = None,
                        step1x_processor_config: str | ModelConfig | None = None) -> "FluxImagePipeline":
        """Build a pipeline from checkpoint files; each file is recognised from its keys and shapes.

        `vram_limit` (GB, DiffSynth-Studio 2.0): when given, VRAM management is enabled after loading with
        that limit and no further buffer (2.0's scripts subtract their own margin), see enable_vram_management.
        `tokenizer_N_config` is 2.0's name for `tokenizer_N_path`. `nexus_gen_processor_config` /
        `step1x_processor_config` (a folder or a `ModelConfig`): where the Nexus-Gen / Step1X-Edit Qwen2.5-VL
        processor files are (default: beside the model's weights, or their `processor/` subfolder).
        """
        pipe = cls(device=device, torch_dtype=torch_dtype)
        processor_dirs = {family: _folder(config) for family, config in (
            ("nexus-gen-llm", nexus_gen_processor_config), ("qwen2.5-vl", step1x_processor_config))
            if config is not None}
        encoder_sources = {}
        for config in model_configs:
            if not isinstance(config, ModelConfig):
                raise TypeError(f"model_configs must hold ModelConfig objects, got {type(config).__name__}")
            storage_device, storage_dtype = config.storage(device, torch_dtype)
            paths = config.resolve()
            for det in detect(paths):
                models = build(det, storage_dtype or torch_dtype, storage_device or device, compute_dtype=torch_dtype,
                               processor_dir=processor_dirs.get(det.family))
                for name, model in models.items():
                    name = pipe._attach(name, model, det.source)
                    pipe.offload[name] = (storage_device, storage_dtype)
                    vram.register_model(pipe, name, model, storage_device or device, device, torch_dtype)
                    encoder_sources[name] = (paths, config)
        if pipe.text_encoder_1 is not None:
            pipe.tokenizer_1 = te.load_clip_tokenizer(
                _tokenizer_dir(_either(tokenizer_1_path, tokenizer_1_config, 1),
                               encoder_sources["text_encoder_1"], "tokenizer"))
        if pipe.text_encoder_2 is not None:
            pipe.tokenizer_2 = te.load_t5_tokenizer(
                _tokenizer_dir(_either(tokenizer_2_path, tokenizer_2_config, 2),
                               encoder_sources["text_encoder_2"], "tokenizer_2"))
        if vram_limit is not None:
            pipe.enable_vram_management(vram_limit=vram_limit, vram_buffer=0)
        return pipe

    def _attach(self, name: str, model: nn.Module, source: str) -> str:
        """Set a loaded model; returns its name (`controlnet.1` for the second of a `many` component)."""
        if table.component(name).many:
            getattr(self, name).append(model)
            return f"{name}.{len(getattr(self, name)) - 1}"
        if getattr(self, name) is not None:
            warnings.warn(f"{name} loaded twice; keeping the one from {source}")
        setattr(self, name, model)
        return name

    def loaded_models(self) -> dict[str, nn.Module]:
        """{attribute: model} of every loaded model (`controlnet.0`, ... for `many` components)."""
        out = {}
        for c in table.COMPONENTS:
            value = getattr(self, c.name, None)
            if c.many:
                out.update({f"{c.name}.{i}": m for i, m in enumerate(value or ())})
            elif value is not None:
                out[c.name] = value
        return out

    def release_model(self, name: str) -> None:
        """Drop the model(s) of component `name` (and their VRAM management) so their memory can be freed."""
        setattr(self, name, ModelList() if table.component(name).many else None)
        for key in [k for k in self.vram_models if k == name or k.startswith(name + ".")]:
            del self.vram_models[key]

    def in_loop_models(self) -> SimpleNamespace:
        """The models `model_fn` receives: every in-loop component of the table, by attribute."""
        return SimpleNamespace(**{c.name: getattr(self, c.name) for c in table.COMPONENTS if c.in_loop})

    def accepted_inputs(self) -> set[str]:
        """Every `__call__`/training input some unit or step unit of this pipeline reads."""
        return {p for u in self.units for p in u.params}

    # -- LoRA --------------------------------------------------------------------------------------
    def load_lora(self, module: nn.Module, lora, alpha: float = 1.0, hotload: bool = False, strict: bool = True):
        """Apply a LoRA (file in any supported dialect, ModelConfig or state dict) to `module` (usually `pipe.dit`).

        Merged into the weights by default; `hotload=True` keeps base weights untouched so that
        `clear_lora()` restores them exactly. Text-encoder keys in the file (kohya `lora_te1_*`) go to
        `text_encoder_1`. Keys that match no layer raise, listing them (`strict=False`: warn instead).
        """
        from ..loading.lora import load_lora_into_pipeline
        if isinstance(lora, ModelConfig):
            lora = lora.resolve()
        if isinstance(lora, (str, os.PathLike)) and table.detect_timestep_lora(scan(lora)):
            raise ValueError(f"{lora} is a timestep LoRA (its features depend on the timestep, it cannot be merged): "
                             "load it with pipe.load_timestep_lora(path)")
        return load_lora_into_pipeline(self, module, lora, alpha=alpha, hotload=hotload, strict=strict)

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

    def clear_lora(self) -> None:
        """Remove every hot-loaded LoRA from every model of the pipeline."""
        from ..loading.lora import clear_lora
        for model in self.loaded_models().values():
            clear_lora(model)

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
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = 3.5, t5_sequence_length: int = 512,
                 input_image: Image.Image | None = None, denoising_strength: float = 1.0,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 rand_device: str = "cpu", sigma_shift: float | None = None, num_inference_steps: int = 30,
                 tiled: bool = False, tile_size: int = 128, tile_stride: int = 64,
                 progress_bar_cmd: Callable = tqdm, num_images: int = 1, output_type: str = "pil",
                 tea_cache_l1_thresh: float | None = None, fbcache_thresh: float | None = None,
                 batch_cfg: bool = True, **variant_inputs):
        """Generate images. Returns one PIL image (a list when num_images > 1), or tensors, see output_type.

        output_type: "pil"; "pt" -> (B, 3, H, W) float in [0, 1]; "latent" -> (B, 16, H/8, W/8).
        tea_cache_l1_thresh / fbcache_thresh: TeaCache or First-Block-Cache threshold (one per call; larger
        skips more steps; 0 never skips); what was skipped is in `pipe.last_cache_stats`.
        batch_cfg: with cfg_scale != 1, run the positive and negative branch in one DiT batch.
        variant_inputs: the inputs of the model variants (kontext_images, ...), see the README; a name that
        no unit of this pipeline reads is an error.
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
        # Variant arguments: what units read that neither this call nor the core units provide.
        produced = {o for u in CORE_UNITS for o in u.outputs}
        variants = self.accepted_inputs() - shared.keys() - posi.keys() - produced
        unknown = sorted(variant_inputs.keys() - variants)
        if unknown:
            raise TypeError(f"unknown argument(s) {unknown}; variant inputs this pipeline reads: {sorted(variants)}")
        shared.update(variant_inputs)
        use_cfg = cfg_scale != 1.0
        units = active_units(self, self.units)
        run_units(self, units, shared, posi, nega, use_cfg)
        cache = make_cache(tea_cache_l1_thresh, fbcache_thresh, num_inference_steps, use_cfg)
        latents = self.denoise(units, shared, posi, nega, cfg_scale, batch_cfg, cache, progress_bar_cmd)
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
        if shared.get("image_edit") is not None:  # a variant's last step on the picture (Insert-Anything's paste)
            images = [shared["image_edit"](im) for im in images]
        return images[0] if num_images == 1 else images

    def model_inputs(self, units: list[Unit], values: dict) -> dict:
        """The values the units declared as denoiser inputs."""
        keys = {k for u in units for k in u.model_inputs}
        return {k: v for k, v in values.items() if k in keys}

    def denoise(self, units: list[Unit], shared: dict, posi: dict, nega: dict, cfg_scale: float,
                batch_cfg: bool, cache, progress_bar_cmd: Callable = tqdm) -> torch.Tensor:
        """The sampling loop: Euler steps over `shared["sigmas"]`, true CFG when cfg_scale != 1."""
        use_cfg = cfg_scale != 1.0
        self.load_models_to_device(table.in_loop_names())
        models, step_units = self.in_loop_models(), [u for u in self.units if isinstance(u, StepUnit)]
        states = (lambda *b: [cache.branches[x] for x in b]) if cache is not None else (lambda *b: None)
        sigmas, latents = shared["sigmas"], shared["latents"]
        steps = sigmas.tolist() + [0.0]
        inputs = {b: self.model_inputs(units, {**shared, **d}) for b, d in (("posi", posi), ("nega", nega))}
        batched_keys = [k for u in units for k in u.batched]
        both = batch_cfg_inputs(self.model_inputs(units, shared), self.model_inputs(units, posi),
                                self.model_inputs(units, nega), batched_keys) if use_cfg and batch_cfg else None

        def evaluate(values: dict, x: torch.Tensor, sigma: float, branches: tuple[str, ...], i: int):
            timestep = torch.full((x.shape[0],), sigma, device=self.device, dtype=self.torch_dtype)
            return self.model_fn(models, **values, latents=x, timestep=timestep, step_units=step_units,
                                 step_index=i, cache_states=states(*branches))

        for i in progress_bar_cmd(range(len(sigmas))):
            if both is not None:
                velocity, negative = evaluate(both, latents.repeat(2, 1, 1, 1), steps[i], ("posi", "nega"), i).chunk(2)
            else:
                velocity = evaluate(inputs["posi"], latents, steps[i], ("posi",), i)
                negative = evaluate(inputs["nega"], latents, steps[i], ("nega",), i) if use_cfg else None
            if negative is not None:
                velocity = negative + cfg_scale * (velocity - negative)
            latents = euler_step(latents, velocity, steps[i], steps[i + 1])
        return latents


def _either(path, config, n: int):
    """`tokenizer_{n}_path` (1.x) or `tokenizer_{n}_config` (2.0's name for the same argument)."""
    if path is not None and config is not None:
        raise TypeError(f"give tokenizer_{n}_path or tokenizer_{n}_config, not both")
    return path if path is not None else config


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
