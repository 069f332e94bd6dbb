"""Generation from model files and folders: what the command line and the web UI share (which files a folder
holds, their storage options, the pipeline built from them, the PNG metadata of an image)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .ops.names import COMPUTE_DTYPES, FP8_DTYPES


def model_files_in(folder: str) -> list[str]:
    """The checkpoint files of a model folder (FLUX.1-dev repo layout, diffusers layout (FLUX.2 [klein] too), or
    loose files)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    found = sorted(str(p) for p in root.iterdir() if p.suffix in (".safetensors", ".sft", ".gguf"))
    found += [str(root / sub) for sub in ("transformer", "vae", "text_encoder", "text_encoder_2")
              if (root / sub).is_dir()]
    if not found:
        raise FileNotFoundError(f"no checkpoint files in {folder}")
    return found


GENERATION_KEYS = ("prompt", "negative_prompt", "cfg_scale", "embedded_guidance", "t5_sequence_length",
                   "denoising_strength", "height", "width", "seed", "rand_device", "sigma_shift",
                   "num_inference_steps", "tiled", "tile_size", "tile_stride", "num_images",
                   "tea_cache_l1_thresh", "fbcache_thresh", "edit_image_auto_resize")


def torch_dtype(name: str):
    """The torch dtype of a --dtype / --offload-dtype name."""
    import torch
    return getattr(torch, {**COMPUTE_DTYPES, **FP8_DTYPES}[name])


def offloading(args) -> bool:
    """--offload, or an option that implies it."""
    return bool(args.offload or args.offload_dtype or args.vram_limit is not None)


def _model_config(path: str, args):
    """ModelConfig for one file or folder, with the storage --offload/--offload-dtype ask for."""
    from . import ModelConfig
    from .loading.components import FAMILY_BY_NAME
    from .loading.registry import detect
    if not offloading(args):
        return ModelConfig(path=path)
    dtype = None
    if args.offload_dtype:
        config = ModelConfig(path=path)
        families = {d.family for d in detect(config.resolve())}
        precise = sorted(f for f in families if not FAMILY_BY_NAME[f].low_precision_storage)
        if not precise:
            dtype = torch_dtype(args.offload_dtype)
        else:
            print(f"note: {path} also holds {', '.join(precise)}; "
                  f"it is stored as is, not in {args.offload_dtype}", file=sys.stderr)
    return ModelConfig(path=path, offload_device="cpu", offload_dtype=dtype)


def model_paths(args) -> list[str]:
    models = list(args.model or [])
    if args.model_dir:
        models += model_files_in(args.model_dir)
    if not models:
        raise SystemExit("give --model FILE [FILE ...] or --model-dir DIR")
    return models


def loras(args) -> list[tuple[str, float]]:
    """(file, alpha) of every --lora."""
    if args.lora_alpha and len(args.lora_alpha) != len(args.lora):
        raise ValueError(f"{len(args.lora_alpha)} --lora-alpha values for {len(args.lora)} --lora files: "
                         "give one per file, or none for 1.0")
    return list(zip(args.lora, args.lora_alpha or [1.0] * len(args.lora)))


def pipeline_class(models: list[str]) -> type:
    """FluxImagePipeline or Flux2ImagePipeline, read from the files' families."""
    from . import Flux2ImagePipeline, FluxImagePipeline, ModelConfig
    from .loading.registry import pipeline_family
    family = pipeline_family([ModelConfig(path=m).resolve() for m in models])
    return Flux2ImagePipeline if family == "flux2" else FluxImagePipeline


def build_pipeline(args, models: list[str]):
    """The pipeline `generate` runs: files, storage, LoRAs, attention backend, compilation, VRAM management."""
    from . import Flux2ImagePipeline
    from .loading.lora.apply import UnmatchedLoRAError
    from .ops.quant import quant_type
    lora_files = loras(args)
    device, dtype = compute_target(args)
    configs = [_model_config(m, args) for m in models]
    cls = pipeline_class(models)
    # options it lacks fail before loading (`ui` has none: its page checks each call)
    call_params(cls, {k: getattr(args, k) for k in GENERATION_KEYS if hasattr(args, k)})
    if cls is Flux2ImagePipeline:
        if args.tokenizer_2:
            raise ValueError("--tokenizer-2 is FLUX.1's T5 tokenizer; FLUX.2 has one tokenizer (--tokenizer-1)")
        pipe = cls.from_pretrained(torch_dtype=torch_dtype(dtype), device=device, model_configs=configs,
                                   tokenizer_config=args.tokenizer_1, parallel=args.parallel)
    else:
        pipe = cls.from_pretrained(torch_dtype=torch_dtype(dtype), device=device, model_configs=configs,
                                   tokenizer_1_path=args.tokenizer_1, tokenizer_2_path=args.tokenizer_2,
                                   parallel=args.parallel)
    if lora_files and pipe.dit is None:
        raise ValueError("--lora needs a DiT among the models")
    # GGUF blocks cannot absorb a merged delta: there the LoRA is applied at run time instead.
    gguf = lora_files and any(quant_type(m) for m in pipe.dit.modules())
    for path, alpha in lora_files:
        try:
            pipe.load_lora(pipe.dit, path, alpha=alpha, hotload=gguf)
        except UnmatchedLoRAError as e:  # one line, in the command line's words (the API's lists every entry)
            raise ValueError(f"--lora {path}: {len(e.problems)} entries match no layer of these models (first: "
                             f"{e.problems[0]}); `diffsynth inspect {path} --dit DIT_FILE` lists them") from None
    pipe.set_attention_backend(args.attention)
    if args.compile:
        pipe.compile()
    if offloading(args):
        pipe.enable_vram_management(vram_limit=args.vram_limit, vram_buffer=args.vram_buffer)
    return pipe


def escape_line(text: str) -> str:
    """One line of A1111 `parameters` text: a newline in a prompt could otherwise forge the
    "Negative prompt:" or settings lines that readers parse."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def png_metadata(params: dict, seed: int, size: tuple[int, int], models: list[str]) -> dict[str, str]:
    """A1111-style `parameters` text (what ComfyUI/A1111 users read; LoRAs as the `<lora:name:strength>` tags
    A1111 users write in prompts) plus the exact call as JSON."""
    tags = "".join(f" <lora:{Path(path).stem}:{alpha:g}>" for path, alpha in params.get("loras") or ())
    text = escape_line(params["prompt"] + tags)
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {escape_line(params['negative_prompt'])}"
    text += (f"\nSteps: {params['num_inference_steps']}, Sampler: Euler (flow matching), "
             f"CFG scale: {params['cfg_scale']}, Guidance: {params['embedded_guidance']}, Seed: {seed}, "
             f"Size: {size[0]}x{size[1]}, Shift: {params.get('sigma_shift') or 3.0}, "
             f"Model: {', '.join(os.path.basename(m.rstrip('/')) for m in models)}")
    return {"parameters": text, "diffsynth": json.dumps({**params, "seed": seed, "models": models})}


def compute_target(args) -> tuple[str, str]:
    """(--device, --dtype), their defaults resolved: cuda and bf16 when this machine has CUDA, else cpu and fp32."""
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, args.dtype or ("bf16" if device.startswith("cuda") else "fp32")


def apply_folder_defaults(args) -> None:
    """What a model folder declares in generation_defaults.json: its sizes (flux-nano: 64 px) replace the
    1024 px default when --height/--width are not given; a prompt outside its `prompt_grammar` is warned of."""
    path = Path(args.model_dir or "") / "generation_defaults.json"
    if args.model_dir and path.is_file():
        from .ops.files import read_json
        defaults = read_json(path, "generation defaults file")  # names the file when it is not JSON
        for key in ("height", "width"):
            value = defaults.get(key)
            if key in defaults and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
            if getattr(args, key) is None and key in defaults:
                setattr(args, key, value)
        warn_outside_grammar(args, defaults.get("prompt_grammar"))


def in_grammar(prompt: str, grammar: list[str]) -> bool:
    """Whether `prompt` is one of the grammar's patterns (`{a|b}`: one of the words; case and spacing free)."""
    text = " ".join(prompt.lower().split())
    for pattern in grammar:
        parts = re.split(r"\{([^}]*)\}", pattern)  # literal, alternatives, literal, ...
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?:{'|'.join(map(re.escape, p.split('|')))})"
                        for i, p in enumerate(parts))
        if re.fullmatch(regex, text):
            return True
    return False


def warn_outside_grammar(args, grammar: list[str] | None) -> None:
    """A model trained on a small grammar (flux-nano) draws nothing meaningful for other prompts: say so, with
    the grammar. Not when LoRAs are given: they may teach it more words."""
    if grammar and args.prompt is not None and not args.lora and not in_grammar(args.prompt, grammar):
        print(f"warning: the model in {args.model_dir} draws only prompts of this grammar, and {args.prompt!r} is "
              "not one of them:\n" + "\n".join(f"  {g}" for g in grammar), file=sys.stderr)


# Options one of the pipelines does not take, with the value that means "not used".
_UNUSED = {"t5_sequence_length": 512, "sigma_shift": None, "tea_cache_l1_thresh": None, "fbcache_thresh": None,
           "edit_image_auto_resize": True}
# Generation arguments whose command-line option is not the argument's name with dashes.
_OPTION_NAMES = {"tea_cache_l1_thresh": "--tea-cache", "fbcache_thresh": "--fbcache", "num_inference_steps": "--steps"}


def fill_defaults(pipeline_cls: type, params: dict) -> dict:
    """`params` with each option left unset (None) replaced by the pipeline's own default where it has one
    (embedded guidance: 3.5 for FLUX.1, 4.0 for FLUX.2), so that the call and the saved metadata agree."""
    import inspect
    signature = inspect.signature(pipeline_cls.__call__).parameters
    return {k: signature[k].default if v is None and k in signature and signature[k].default not in (None, inspect.Parameter.empty)
            else v for k, v in params.items()}


def call_params(pipeline_cls: type, params: dict) -> dict:
    """The generation arguments the pipeline class takes; an option it does not have, set by the user, is an
    error."""
    import inspect
    accepted = inspect.signature(pipeline_cls.__call__).parameters
    unusable = sorted(k for k in params if k not in accepted and params[k] != _UNUSED.get(k))
    if unusable:
        names = (_OPTION_NAMES.get(k, "--" + k.replace("_", "-")) for k in unusable)
        raise ValueError(f"{pipeline_cls.__name__} has no {', '.join(names)}")
    return {k: v for k, v in params.items() if k in accepted}
