"""The one place where generation inputs are validated, for both pipelines and for training.

`check_call_args` checks a pipeline call's arguments before anything is allocated or computed, so that a wrong
type or an absurd value fails at once with a message naming the argument, instead of as a traceback from deep
inside (or after minutes of work, or as an all-black image). The per-value checks it is made of (`check_text`,
`check_size`, `check_known_inputs`, ...) are the ones the units run too, so training, which feeds dataset rows
to the same units without a `__call__`, refuses the same values with the same messages. Also here: the models a
call needs (`require_models`) and the non-finite output check.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from PIL import Image

from ..loading.components import component
from ..ops.files import all_finite
from ..ops.images import check_image
from ..ops.limits import (MAX_IMAGES, MAX_PIXELS, MAX_SEED, MAX_SIDE, MAX_SIGMA_SHIFT, MAX_STEPS, MAX_STRENGTH,
                          MAX_T5_SEQUENCE_LENGTH, MIN_SIGMA_SHIFT)


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


def check_text(name: str, value) -> None:
    """A str that is valid Unicode: lone surrogates (what Python makes of bytes that are not UTF-8 on a
    command line) failed inside the tokenizer, after the models had loaded."""
    if not isinstance(value, str):
        hint = " (decode it first: value.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a string{hint}, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: character {e.start} is the lone surrogate "
                         f"U+{ord(value[e.start]):04X} (bytes that are not UTF-8, e.g. from a terminal or file in "
                         "another encoding)") from None


def _check_image(value, name: str = "input_image") -> None:
    if value is not None:
        check_image(value, name)  # a truncated or damaged file fails here, not inside the VAE


def check_image_list(value, name: str) -> None:
    """None, one PIL image, or a non-empty list/tuple of them (reference images)."""
    if value is None or isinstance(value, Image.Image):
        _check_image(value, name)
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be a PIL image or a non-empty list of them, got {value!r:.80}")
    for i, image in enumerate(value):
        _check_image(image, f"{name}[{i}]")


OUTPUT_TYPES = ("pil", "pt", "latent")


def check_size(height, width) -> None:
    """Positive integer sides (None: chosen later) within the side and pixel limits."""
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
        check_text(name, args[name])
    _need_real("cfg_scale", args["cfg_scale"], 0.0)
    _need_real("embedded_guidance", args["embedded_guidance"], 0.0)
    _need_real("denoising_strength", args["denoising_strength"], 0.0, 1.0, low_open=True)
    if args.get("sigma_shift") is not None:
        _need_real("sigma_shift", args["sigma_shift"], MIN_SIGMA_SHIFT, MAX_SIGMA_SHIFT)
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
    check_size(args["height"], args["width"])
    _check_image(args["input_image"])
    check_image_list(args.get("edit_image"), "edit_image")
    _check_strengths(args.get("variant_inputs") or {})
    if "output_type" in args:
        check_output_args(args["output_type"], args["tiled"], args["tile_size"], args["tile_stride"])


def check_output_args(output_type: str, tiled: bool, tile_size: int, tile_stride: int) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
    if tiled and not 0 < tile_stride <= tile_size:
        raise ValueError(f"tile_stride ({tile_stride}) must be in (0, tile_size={tile_size}]")


class UnknownInputError(TypeError, ValueError):
    """An input no unit reads: a wrong argument to a call (TypeError, as Python says it) and a wrong value of
    --extra_inputs (ValueError, as argument checks say it)."""


def check_known_inputs(given, accepted, what: str) -> None:
    """Every name in `given` is one the units read (`accepted`): a misspelt variant argument or dataset column
    is an error, never silently ignored. `what` says how the caller names them."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise UnknownInputError(f"{what} {unknown} are not inputs of any unit of this pipeline; units accept: "
                        f"{', '.join(sorted(accepted))}")


def _check_strengths(variant_inputs: dict) -> None:
    """The variants' strengths (`*_scale`, each ControlNetInput's scale and window), like cfg_scale: a NaN or
    1e30 otherwise surfaced after denoising as non-finite latents."""
    for name, value in variant_inputs.items():
        if name.endswith("_scale") and value is not None:
            _need_real(name, value, -MAX_STRENGTH, MAX_STRENGTH)
    controls = variant_inputs.get("controlnet_inputs")
    for i, control in enumerate(controls if isinstance(controls, (list, tuple)) else [controls] if controls else []):
        if hasattr(control, "scale"):  # (the ControlNet unit names any other type)
            _need_real(f"controlnet_inputs[{i}].scale", control.scale, -MAX_STRENGTH, MAX_STRENGTH)
            _need_real(f"controlnet_inputs[{i}].start", control.start, 0.0, 1.0)
            _need_real(f"controlnet_inputs[{i}].end", control.end, 0.0, 1.0)


class MissingModelError(RuntimeError):
    """A model the call needs is not loaded. `missing`: the pipeline attributes; `needed_for`: what needs them.
    The message speaks of `model_configs`; the command line words it with its own options."""

    def __init__(self, missing: tuple[str, ...], needed_for: str):
        self.missing, self.needed_for = missing, needed_for
        super().__init__(f"{self.what()} not loaded: add {'its file' if len(missing) == 1 else 'their files'} to "
                         "from_pretrained's model_configs (ModelConfig(path=...))")

    def what(self) -> str:
        """"<needed_for> needs <models>, which is/are" (the part both wordings share)."""
        models = " and ".join(component(m).describe() for m in self.missing)
        return f"{self.needed_for} needs {models}, which {'is' if len(self.missing) == 1 else 'are'}"


def require_models(pipe, names: tuple[str, ...], needed_for: str) -> None:
    """Raise MissingModelError naming each of `names` (pipeline attributes) that is not loaded."""
    missing = tuple(n for n in names if getattr(pipe, n) is None)
    if missing:
        raise MissingModelError(missing, needed_for)


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
    if pipe.torch_dtype == torch.float16:
        return "the DiT's computation (an fp16 overflow? use bf16 or fp32)"
    return "the DiT's computation (extreme inputs or strengths?)"


def check_finite(pipe, tensor: torch.Tensor, what: str, values: dict) -> None:
    """Raise when `tensor` (the denoised latents or the decoded image) holds NaN/Inf, naming the cause:
    such output would be an all-black image with no other sign of failure. One reduction per call."""
    if all_finite(tensor):
        return
    cause = explain_nonfinite(pipe, values) if what == "latents" else "the VAE decoder (NaN/Inf in its weights?)"
    raise FloatingPointError(f"the {what} hold NaN/Inf: caused by {cause}")
