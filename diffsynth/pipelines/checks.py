"""Up-front validation of `FluxImagePipeline.__call__` arguments, and the non-finite output check.

Every argument is checked before anything is allocated or computed, so that a wrong type or an absurd
value fails at once with a message naming the argument, instead of as a traceback from deep inside (or
after minutes of work, or as an all-black image).
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from PIL import Image

from ..ops.files import all_finite

# FLUX's T5 context (diffusers refuses more, too); each token costs memory in every DiT block.
MAX_T5_SEQUENCE_LENGTH = 512
# Largest image side and area accepted: 4 megapixels is FLUX's native range, 64 MP leaves room for
# tiled upscaling passes while keeping a typo (100000x100000) from allocating tens of GB first.
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192
MAX_STEPS = 10_000
MAX_IMAGES = 256
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need_int(name: str, value, low: int, high: int) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {kind} and at most {high}, got {value}")


def _need_real(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def _check_image(value, name: str = "input_image") -> None:
    if value is None:
        return
    if not isinstance(value, Image.Image):
        hint = " (open it first: PIL.Image.open(path))" if isinstance(value, str) else ""
        raise TypeError(f"{name} must be a PIL image{hint}, got {type(value).__name__}")
    try:
        value.load()  # a truncated or damaged file fails here, not inside the VAE
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} cannot be decoded ({type(e).__name__}: {e})") from None


def check_image_list(value, name: str) -> None:
    """None, one PIL image, or a non-empty list/tuple of them (reference images)."""
    if value is None or isinstance(value, Image.Image):
        _check_image(value, name)
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be a PIL image or a non-empty list of them, got {value!r:.80}")
    for i, image in enumerate(value):
        _check_image(image, f"{name}[{i}]")


def _check_size(height, width) -> None:
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _need_int(name, value, 1, MAX_SIDE)
    if height is not None and width is not None and height * width > MAX_PIXELS:
        raise ValueError(f"height x width = {height}x{width} is above the {MAX_PIXELS:,}-pixel limit "
                         "(diffsynth.pipelines.checks.MAX_PIXELS)")


def check_call_args(args: dict) -> None:
    """`args`: a pipeline `__call__`'s arguments by name (those a family lacks, e.g. FLUX.2's sigma_shift, are
    skipped). Raises TypeError / ValueError naming the first bad one."""
    for name in ("prompt", "negative_prompt"):
        if not isinstance(args[name], str):
            raise TypeError(f"{name} must be a string, got {type(args[name]).__name__}")
    _need_real("cfg_scale", args["cfg_scale"], 0.0)
    _need_real("embedded_guidance", args["embedded_guidance"], 0.0)
    _need_real("denoising_strength", args["denoising_strength"], 0.0, 1.0, low_open=True)
    if args.get("sigma_shift") is not None:
        _need_real("sigma_shift", args["sigma_shift"], 0.0, low_open=True)
    if "t5_sequence_length" in args:
        _need_int("t5_sequence_length", args["t5_sequence_length"], 1, MAX_T5_SEQUENCE_LENGTH)
    _need_int("num_inference_steps", args["num_inference_steps"], 1, MAX_STEPS)
    _need_int("num_images", args["num_images"], 1, MAX_IMAGES)
    _need_int("tile_size", args["tile_size"], 1, MAX_SIDE)
    _need_int("tile_stride", args["tile_stride"], 1, MAX_SIDE)
    if args["seed"] is not None:
        _need_int("seed", args["seed"], 0, MAX_SEED - (args["num_images"] - 1))
    for name in ("tea_cache_l1_thresh", "fbcache_thresh"):
        if args.get(name) is not None:
            _need_real(name, args[name], 0.0)
    _check_size(args["height"], args["width"])
    _check_image(args["input_image"])
    check_image_list(args.get("edit_image"), "edit_image")


def _first_nonfinite(named) -> str | None:
    return next((n for n, t in named if not all_finite(t)), None)


def explain_nonfinite(pipe, values: dict) -> str:
    """Which input made the output non-finite (only run after a failure: it reads every DiT weight)."""
    for key, what in (("prompt_emb", "the text encoders' output (NaN/Inf in their weights?)"),
                      ("pooled_prompt_emb", "the CLIP text encoder's output (NaN/Inf in its weights?)"),
                      ("input_latents", "the VAE encoding of input_image (NaN/Inf in the VAE weights?)")):
        if key in values and not all_finite(values[key]):
            return what
    if pipe.dit is not None:
        tensors = [*pipe.dit.named_parameters(), *pipe.dit.named_buffers()]
        tensors += [(f"{n} (LoRA)", t) for n, m in pipe.dit.named_modules()
                    for a in getattr(m, "_diffsynth_lora_adapters", ()) for t in vars(a).values()
                    if isinstance(t, torch.Tensor)]
        bad = _first_nonfinite(tensors)
        if bad is not None:
            return f"the DiT weight {bad} (NaN/Inf in the checkpoint or a LoRA)"
    return "the DiT's computation (an fp16 overflow? use bf16 or fp32)"


def check_finite(pipe, tensor: torch.Tensor, what: str, values: dict) -> None:
    """Raise when `tensor` (the denoised latents or the decoded image) holds NaN/Inf, naming the cause:
    such output would be an all-black image with no other sign of failure. One reduction per call."""
    if all_finite(tensor):
        return
    cause = explain_nonfinite(pipe, values) if what == "latents" else "the VAE decoder (NaN/Inf in its weights?)"
    raise FloatingPointError(f"the {what} hold NaN/Inf: caused by {cause}")
