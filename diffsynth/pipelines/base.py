"""What every pipeline family shares: loading from ModelConfigs, model attributes from the component table,
LoRA/VRAM/compile entry points, the sampling loop, and decoding into the output types.

A family (FluxImagePipeline for FLUX.1, Flux2ImagePipeline for FLUX.2) brings its units, its `model_fn`,
its schedule (a unit or a function of the call) and its tokenizers; the component table says which
checkpoint families it loads (`Family.pipeline`).
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..loading import components as table
from ..loading import vram
from ..loading.model_config import ModelConfig
from ..loading.registry import build, detect
from ..models import flux_timestep_lora as timestep_lora
from ..ops.attention import set_attention_backend as _set_attention_backend
from ..ops import parallel as _parallel
from ..ops.devices import check_device, random_generator
from ..ops.files import CheckpointError, scan
from ..schedulers.flow_match import euler_step
from .checks import check_finite, require_models
from .denoise import batch_cfg_inputs
from .images import tensor_to_images
from .units import StepUnit, Unit, active_units, run_units



class ModelList(nn.ModuleList):
    """A `many` component (`pipe.controlnet`): models in load order. `.models` is the list itself, the name
    DiffSynth-Studio scripts use (`pipe.controlnet.models[0]`)."""

    @property
    def models(self) -> "ModelList":
        return self

    def gradient_checkpointing_enable(self) -> None:
        for model in self:
            model.gradient_checkpointing = True


class PerThread:
    """An attribute each thread sees on its own: a pipeline shared by threads (a server) tells every caller
    the seed and cache statistics of its own last call, not of whichever call finished last."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def _values(self, obj) -> threading.local:
        return obj.__dict__.setdefault("_per_thread", threading.local())

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(self._values(obj), self.name, None)

    def __set__(self, obj, value) -> None:
        setattr(self._values(obj), self.name, value)


class BasePipeline(nn.Module):
    """Model attributes come from the component table, `loading.components`; a subclass sets `family`
    (the `Family.pipeline` value of the checkpoints it loads), its units and its model_fn, and says which
    unit encodes the prompt with which text encoders (checked before a call starts)."""

    family: str = ""
    # DiT block lists compiled one block at a time by `compile` (attribute names on the DiT)
    compiled_blocks: tuple[str, ...] = ()
    guidance_hint = ""  # what to use instead of embedded_guidance when the DiT has no guidance embedder
    prompt_unit: Unit | None = None
    text_encoders: tuple[str, ...] = ()

    last_seed = PerThread()         # the seed of this thread's last call (also each returned image's info["seed"])
    last_cache_stats = PerThread()  # what TeaCache / First-Block-Cache skipped in this thread's last call

    def __init__(self, device: str | torch.device, torch_dtype: torch.dtype, units: Sequence[Unit | StepUnit],
                 model_fn: Callable):
        super().__init__()
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        for c in table.COMPONENTS:
            setattr(self, c.name, ModelList() if c.many else None)
        self.units: list[Unit | StepUnit] = list(units)
        self.model_fn: Callable = model_fn
        self.offload = {}  # attribute -> (storage device, storage dtype) from ModelConfig
        self.vram_models: dict[str, vram.ManagedModel] = {}  # models whose storage differs from computation
        self.vram_plans: dict = {}
        self.vram_management_enabled = False

    # -- loading -------------------------------------------------------------------------------
    @staticmethod
    def _check_load_args(device, vram_limit, parallel: str | None = None) -> torch.device | str:
        """from_pretrained's arguments that can be wrong, checked before any model loads; returns the device
        (under `parallel`, a bare "cuda" becomes this process's cuda:LOCAL_RANK)."""
        check_device(device)  # (the bare constructor allows any device: vram_plan for a card this machine lacks)
        vram.check_gigabytes("vram_limit", vram_limit)
        if parallel == "tensor" and vram_limit is not None:
            raise NotImplementedError('parallel="tensor" does not combine with vram_limit (VRAM management) yet')
        return device if parallel is None else _parallel.setup(parallel, device)

    def _load_models(self, model_configs: Sequence[ModelConfig], processor_dirs: dict[str, str] | None = None
                     ) -> dict[str, tuple]:
        """Detect, build and attach every model of `model_configs`; returns {attribute: (paths, config)}, where
        each model came from (tokenizers are looked up beside their encoder). `processor_dirs`: {family: folder
        of its processor files} for the families that read one."""
        sources = {}
        for config in model_configs:
            if not isinstance(config, ModelConfig):
                raise TypeError(f"model_configs must hold ModelConfig objects, got {type(config).__name__}")
            storage_device, storage_dtype = config.storage(str(self.device), self.torch_dtype)
            if storage_device is not None:
                check_device(storage_device, "offload_device")
            paths = config.resolve()
            found = detect(paths)
            for det in found:  # all refused before any is built
                self._check_family(det)
            for det in found:
                models = build(det, storage_dtype or self.torch_dtype, storage_device or self.device,
                               compute_dtype=self.torch_dtype, processor_dir=(processor_dirs or {}).get(det.family))
                for name, model in models.items():
                    name = self._attach(name, model, det.source)
                    self.offload[name] = (storage_device, storage_dtype)
                    vram.register_model(self, name, model, storage_device or self.device, self.device,
                                        self.torch_dtype)
                    sources[name] = (paths, config)
        return sources

    def _shard_dit(self) -> None:
        """parallel="tensor": each process keeps its share of the DiT blocks' heads and MLP channels."""
        if self.dit is None:
            raise ValueError('parallel="tensor" splits the DiT: add its checkpoint to model_configs')
        if "dit" in self.vram_models:
            raise NotImplementedError('parallel="tensor" does not combine with offloaded or fp8/GGUF DiT '
                                      'storage yet: load the DiT in the compute dtype on the device')
        self.dit.shard_tensor_parallel()

    def _check_not_tensor_parallel(self, what: str) -> None:
        """Split (DTensor) weights cannot take merged LoRAs, per-layer casting or compiled blocks yet."""
        if self.dit is not None and getattr(self.dit, "tensor_parallel", False):
            raise NotImplementedError(f'{what} does not work on a DiT split by parallel="tensor" yet')

    def _check_family(self, det) -> None:
        family = table.FAMILY_BY_NAME[det.family]
        if family.pipeline != self.family:
            owner = {"flux": "FluxImagePipeline", "flux2": "Flux2ImagePipeline"}.get(family.pipeline, family.pipeline)
            raise CheckpointError(f"{det.source} is a {family.description}: it belongs to {owner}, "
                                  f"not {type(self).__name__}")

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
        self._check_not_tensor_parallel("load_lora")
        if isinstance(lora, ModelConfig):
            lora = lora.resolve()
        if isinstance(lora, (str, os.PathLike)) and timestep_lora.detect(scan(lora)):
            raise ValueError(f"{lora} is a timestep LoRA (its features depend on the timestep, it cannot be merged): "
                             "load it with pipe.load_timestep_lora(path)")
        return load_lora_into_pipeline(self, module, lora, alpha=alpha, hotload=hotload, strict=strict)

    def clear_lora(self) -> None:
        """Remove every hot-loaded LoRA from every model of the pipeline."""
        from ..loading.lora import clear_lora
        for model in self.loaded_models().values():
            clear_lora(model)

    # -- memory and speed ------------------------------------------------------------------------
    def enable_vram_management(self, vram_limit: float | None = None, vram_buffer: float = 0.5,
                               num_persistent_param_in_dit: int | None = None, pin_memory: bool = True) -> dict:
        """Keep layers resident on the device while under `vram_limit` GB (default: the device's free memory
        now) minus `vram_buffer` GB; stream the rest from their storage device (ModelConfig.offload_device)
        at every call. `vram_limit=0` keeps nothing resident (minimum VRAM). `num_persistent_param_in_dit`
        instead keeps that many DiT parameters resident, in module order. Models not needed by the running
        step are moved off the device. The plan reserves the largest layer's transient copy and activations
        estimated for 1024x1024 with one image per DiT call (batched CFG doubles those: on a tight card raise
        `vram_buffer` or pass `batch_cfg=False`). On a CUDA device the streamed weights stored in CPU RAM are
        page-locked (`pin_memory=False`: left pageable, several times slower to stream but not locked in RAM).
        Returns the plans, {group of models: VramPlan}."""
        self._check_not_tensor_parallel("enable_vram_management")
        return vram.enable_vram_management(self, vram_limit, vram_buffer, num_persistent_param_in_dit, pin_memory)

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

    @property
    def uses_embedded_guidance(self) -> bool:
        """Whether the loaded DiT reads `embedded_guidance` (it has a guidance embedder: FLUX.1-dev, FLUX.2-dev)."""
        return bool(getattr(getattr(self.dit, "config", None), "guidance_embed", False))

    def warn_if_guidance_unused(self, embedded_guidance: float, default: float) -> None:
        """Another `embedded_guidance` than the default, for a DiT without a guidance embedder, would do nothing:
        say so rather than ignore it silently."""
        if embedded_guidance != default and self.dit is not None and not self.uses_embedded_guidance:
            warnings.warn(f"embedded_guidance={embedded_guidance} does nothing: this DiT has no guidance embedder"
                          f"{self.guidance_hint}", stacklevel=3)

    def set_attention_backend(self, name: str) -> None:
        """"auto" (default), "sdpa", "flash", "sage" or "math"; see diffsynth.ops.attention. Process-wide."""
        _set_attention_backend(name)

    def compile(self, **compile_kwargs) -> "BasePipeline":
        """Regional compilation: each DiT block is compiled with torch.compile (blocks of a kind share their
        compiled graphs). Hot-loaded LoRAs keep working: loading or clearing one changes the layers' forward
        hooks, which the compiled blocks guard on (this sets the process-wide
        `torch._dynamo.config.skip_nnmodule_hook_guards = False`), so each new LoRA set recompiles once
        and returning to an earlier set reuses its graph. Merged LoRAs change weights in place and need no
        recompilation. Compiled graphs are shared by all blocks of a kind; after about 8 different LoRA
        sets torch's recompile limit makes them run eagerly (`torch._dynamo.config.cache_size_limit`).
        `compile_kwargs` go to torch.compile (mode, backend, dynamic, ...). It pays on GPUs; on a CPU it warns:
        there it measured 1.08-1.33x the eager step's time after a first call of about 30 s
        (benchmarks/compile_cpu.py)."""
        if self.dit is None:
            raise RuntimeError("no DiT loaded")
        self._check_not_tensor_parallel("compile")
        if self.compute_device_of("dit").type == "cpu":
            warnings.warn("pipe.compile() on the CPU: the compiled DiT step measured 1.08-1.33x the eager step's time "
                          "(after a first call of about 30 s): it ends in the same GEMM kernels, and in bf16 in "
                          "torch's attention instead of this project's faster one; compiling pays on GPUs", stacklevel=2)
        import torch._dynamo
        from ..ops import attention
        attention._flash_fn(), attention._sage_fn()  # import optional kernels before tracing
        # Hot-loaded LoRAs are forward hooks: make compiled blocks guard on hooks (torch skips that by
        # default), so adding/removing a LoRA recompiles instead of silently running the old graph.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        for name in self.compiled_blocks:
            for block in getattr(self.dit, name):
                block.compile(**compile_kwargs)
        return self

    # -- generation ------------------------------------------------------------------------------
    def model_inputs(self, units: list[Unit], values: dict) -> dict:
        """The values the units declared as denoiser inputs."""
        keys = {k for u in units for k in u.model_inputs}
        return {k: v for k, v in values.items() if k in keys}

    def generate(self, shared: dict, posi: dict, nega: dict, cfg_scale: float, batch_cfg: bool = True, cache=None,
                 progress_bar_cmd: Callable = tqdm, output_type: str = "pil"):
        """Run the units, denoise, decode: what every family's `__call__` ends with. `shared` holds the call's
        shared inputs (num_images, tiled, tile_size, tile_stride among them), posi/nega the branch inputs."""
        use_cfg = cfg_scale != 1.0
        units = active_units(self, self.units)
        self.require_call_models(units, shared.get("input_image"), output_type)
        run_units(self, units, shared, posi, nega, use_cfg)
        latents = self.denoise(units, shared, posi, nega, cfg_scale, batch_cfg, cache, progress_bar_cmd)
        check_finite(self, latents, "latents", {**shared, **posi})
        self.last_cache_stats = cache.stats() if cache is not None else None
        self.last_seed = shared["seed"]
        if output_type == "latent":
            return latents
        self.load_models_to_device(("vae_decoder",))
        image = self.vae_decoder(latents.to(self.compute_device_of("vae_decoder"), self.torch_dtype),
                                 tiled=shared["tiled"], tile_size=shared["tile_size"],
                                 tile_stride=shared["tile_stride"])
        check_finite(self, image, "decoded image", {})
        if output_type == "pt":
            return (image.float().clamp(-1, 1) + 1) / 2  # on the device, as latents are
        images = tensor_to_images(image)
        if shared.get("image_edit") is not None:  # a variant's last step on the picture (Insert-Anything's paste)
            images = [shared["image_edit"](im) for im in images]
        for i, im in enumerate(images):
            im.info["seed"] = shared["seed"] + i
        return images[0] if shared["num_images"] == 1 else images

    def require_call_models(self, units: list[Unit], input_image, output_type: str) -> None:
        """The models a call will need, checked before any work (a missing VAE was found after all steps)."""
        require_models(self, ("dit",), "generation")
        if self.prompt_unit in units:  # (Step1X and Nexus-Gen replace FLUX.1's with their own encoders)
            require_models(self, self.text_encoders, "the prompt")
        if input_image is not None:
            require_models(self, ("vae_encoder",), "input_image")
        if output_type != "latent":
            require_models(self, ("vae_decoder",), "decoding the image")

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


def draw_noise(pipe, shape: tuple[int, ...], seed: int | None, rand_device: str, num_images: int) -> dict:
    """{"noise", "seed"}: fp32 Gaussian noise of `shape` drawn on `rand_device` from
    torch.Generator(rand_device).manual_seed(seed + i) for image i, then cast to the pipeline's device and dtype;
    a random seed when None (the same on every process of a parallel run)."""
    if seed is None:
        seed = _parallel.shared_random_seed()
    noise = torch.cat([torch.randn(shape, generator=random_generator(rand_device, seed + i), device=rand_device,
                                   dtype=torch.float32) for i in range(num_images)])
    return {"noise": noise.to(pipe.device, pipe.torch_dtype), "seed": seed}


def either(path, config, name: str):
    """`<name>_path` (1.x) or `<name>_config` (2.0's name for the same argument)."""
    if path is not None and config is not None:
        raise TypeError(f"give {name}_path or {name}_config, not both")
    return path if path is not None else config


def tokenizer_dir(explicit, source, name: str, argument: str) -> str:
    """Where a tokenizer is: given explicitly, else beside the text encoder (the release layout: `name/` next
    to the encoder's folder), else downloaded from the encoder's repository. `argument`: the from_pretrained
    argument that names it (for the error)."""
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
        f"Pass {argument}= to from_pretrained")
