"""Flux2ImagePipeline: FLUX.2 [klein] and [dev] text-to-image, image-to-image and multi-reference editing.

The shared machinery (loading, units, sampling loop, VRAM, LoRA, output types) is `base.BasePipeline`'s;
what is FLUX.2's is here as data: the units (the prompt embedding of the loaded text encoder, Qwen3 for
[klein] or Mistral-Small-3 for [dev]; 128-channel noise at 1/16 of the image size, the dynamically shifted
schedule, reference images as extra tokens, the embedded guidance) and `flux2_model_fn`.

Latents are the VAE's normalised 2x2-patchified latents, (B, 128, H/16, W/16); the DiT sees them as
H/16 * W/16 tokens with position ids (t, row, column, 0). Reference image i (`edit_image`) is encoded the
same way and appended after the noise tokens with time coordinate 10 * (i + 1); their outputs are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ..loading.model_config import ModelConfig
from ..models import flux2_text_encoder as te
from ..models.flux2_dit import Flux2DiT
from ..models.flux_dit_cache import CachedStep, make_cache
from ..schedulers.flow_match import flux2_sigmas, flux2_training_sigmas
from .base import BasePipeline, draw_noise, tokenizer_dir
from .checks import check_call_args, check_text
from .common_units import check_shape, encode_input_image
from .images import image_to_tensor, vae_encode
from .units import Unit, order_units, unit
from ..ops.images import convert_image

__all__ = ["Flux2ImagePipeline", "ModelConfig"]

LATENT_CHANNELS = 128  # 32 VAE channels in 2x2 patches
LATENT_FACTOR = 16     # pixels per latent token along each axis
REFERENCE_TIME_STEP = 10  # reference image i sits at time coordinate 10 * (i + 1)
EDIT_AUTO_AREA = 1024 * 1024  # edit_image_auto_resize: about this many pixels, sides multiples of 32


# ----------------------------------------------------------------------------- position ids

def image_positions(h: int, w: int, t: int = 0, device=None) -> torch.Tensor:
    """(h * w, 4) ids (t, row, column, 0) of an h x w token grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows.flatten(), cols.flatten()
    return ids


def text_positions(length: int, device=None) -> torch.Tensor:
    """(length, 4) ids (0, 0, 0, token index)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h * w, C), row-major like `image_positions`."""
    return latents.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- reference images

def auto_resize(image: Image.Image, area: int = EDIT_AUTO_AREA) -> Image.Image:
    """DiffSynth-Studio 2.0's edit-image sizing: the aspect ratio kept at about `area` pixels, sides rounded to
    multiples of 32, the image scaled (bilinear) to cover that size and centre-cropped to it."""
    ratio = image.width / image.height
    width = max(32, round(math.sqrt(area * ratio) / 32) * 32)
    height = max(32, round(math.sqrt(area / ratio) / 32) * 32)
    return cover_crop(image, width, height)


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale (bilinear) so the image covers width x height, then crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = convert_image(image).resize(size, Image.BILINEAR)
    left, top = round((size[0] - width) / 2), round((size[1] - height) / 2)
    return image.crop((left, top, left + width, top + height))


def reference_size(image: Image.Image, auto: bool) -> Image.Image:
    """The reference image as encoded: auto-resized, or only centre-cropped to multiples of 16 pixels."""
    if auto:
        return auto_resize(image)
    width, height = image.width // LATENT_FACTOR * LATENT_FACTOR, image.height // LATENT_FACTOR * LATENT_FACTOR
    if not width or not height:
        raise ValueError(f"edit_image of {image.width}x{image.height} pixels is smaller than one {LATENT_FACTOR}x"
                         f"{LATENT_FACTOR} latent patch (pass edit_image_auto_resize=True to scale it up)")
    return cover_crop(image, width, height)


# ----------------------------------------------------------------------------- units

@unit(outputs=("sigmas",))
def set_sigmas(pipe, height, width, num_inference_steps=30, denoising_strength=1.0):
    """FLUX.2's schedule depends on the image size (the number of latent tokens)."""
    tokens = (height // LATENT_FACTOR) * (width // LATENT_FACTOR)
    return {"sigmas": flux2_sigmas(num_inference_steps, tokens, denoising_strength)}


@unit(outputs=("noise", "seed"), stack=("noise",))
def init_noise(pipe, height, width, seed=None, rand_device="cpu", num_images=1):
    """fp32 Gaussian noise (1, 128, H/16, W/16) per image, drawn as DiffSynth-Studio 2.0 draws it."""
    return draw_noise(pipe, (1, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR), seed,
                      rand_device, num_images)


@dataclass(frozen=True)
class TextEncoder:
    """A FLUX.2 prompt encoder: the pipeline attribute holding it and how it reads a prompt."""
    attribute: str
    fmt: te.PromptFormat


# Which text encoder is loaded decides the prompt unit: Qwen3 for [klein] (the default), Mistral for [dev].
QWEN3 = TextEncoder("text_encoder_qwen3", te.QWEN3_FORMAT)
MISTRAL = TextEncoder("text_encoder_mistral", te.MISTRAL_FORMAT)
TEXT_ENCODERS = (MISTRAL, QWEN3)


def prompt_unit(encoder: TextEncoder, name: str, **options) -> Unit:
    """The unit that encodes each branch's prompt with `encoder` (`options`: `active`/`replaces`, see units)."""
    def encode(pipe, prompt, num_images=1):
        model = getattr(pipe, encoder.attribute)
        if model is None or pipe.tokenizer is None:
            raise RuntimeError("this pipeline has no text encoder loaded: add the text encoder "
                               "(text_encoder/*.safetensors: Qwen3 for FLUX.2 [klein], Mistral for [dev]) ModelConfig")
        check_text("prompt", prompt)
        emb = te.encode_prompt(pipe.tokenizer, model, [prompt], pipe.compute_device_of(encoder.attribute), encoder.fmt)
        return {"prompt_emb": emb.to(pipe.device, pipe.torch_dtype).repeat(num_images, 1, 1)}
    encode.__name__ = encode.__qualname__ = name
    return unit(per_branch=True, models=(encoder.attribute,), outputs=("prompt_emb",), model_inputs=("prompt_emb",),
                cacheable=("prompt_emb",), **options)(encode)


encode_prompt = prompt_unit(QWEN3, "encode_prompt")
encode_prompt_mistral = prompt_unit(MISTRAL, "encode_prompt_mistral", replaces=("encode_prompt",),
                                    active=lambda pipe: pipe.text_encoder_mistral is not None)


REFERENCE_OUTPUTS = ("edit_latents", "edit_ids")


@unit(uses=("vae_encoder",), image_inputs=("edit_image",), outputs=REFERENCE_OUTPUTS, model_inputs=REFERENCE_OUTPUTS,
      batched=("edit_latents",), cacheable=REFERENCE_OUTPUTS)
def encode_edit_images(pipe, num_images=1, edit_image=None, edit_image_auto_resize=True, tiled=False,
                       tile_size=128, tile_stride=64):
    """Reference images -> tokens (B, M, 128) after the noise tokens, ids with their own time coordinate."""
    if edit_image is None:
        return {}
    images = [edit_image] if isinstance(edit_image, Image.Image) else list(edit_image)
    tokens, ids = [], []
    for i, image in enumerate(images):
        image = reference_size(image, edit_image_auto_resize)
        z = vae_encode(pipe, image_to_tensor(image, image.width, image.height), f"edit_image[{i}]",
                       tiled, tile_size, tile_stride)
        tokens.append(to_tokens(z))
        ids.append(image_positions(z.shape[2], z.shape[3], REFERENCE_TIME_STEP * (i + 1), pipe.device))
    return {"edit_latents": torch.cat(tokens, 1).repeat(num_images, 1, 1), "edit_ids": torch.cat(ids)[None]}


IDS = ("image_ids", "text_ids", "guidance")
DEFAULT_EMBEDDED_GUIDANCE = 4.0


@unit(outputs=IDS, model_inputs=IDS, batched=("guidance",))
def prepare_ids_and_guidance(pipe, noise, embedded_guidance=DEFAULT_EMBEDDED_GUIDANCE):
    """Position ids shared by the batch (and both CFG branches: every prompt is padded to the same length)."""
    b, _, h, w = noise.shape
    return {"image_ids": image_positions(h, w, device=pipe.device)[None],
            "text_ids": text_positions(te.MAX_SEQUENCE_LENGTH, pipe.device)[None],
            "guidance": torch.full((b,), float(embedded_guidance), device=pipe.device)}


UNITS: list[Unit] = order_units([check_shape, set_sigmas, init_noise, encode_prompt, encode_prompt_mistral,
                                 encode_input_image, encode_edit_images, prepare_ids_and_guidance])


def flux2_model_fn(models, latents, timestep, prompt_emb, text_ids, image_ids, guidance=None, edit_latents=None,
                   edit_ids=None, *, step_units: Sequence = (), step_index: int = 0, cache_states=None
                   ) -> torch.Tensor:
    """One FLUX.2 DiT evaluation: latents (B, 128, h, w) and sigma (B,) -> velocity (B, 128, h, w).
    `cache_states`: one First-Block-Cache state per CFG branch in the batch (None: no cache)."""
    if step_units:
        raise NotImplementedError("FLUX.2 has no step units yet")
    b, c, h, w = latents.shape
    cache = None if cache_states is None else CachedStep(cache_states, step_index)
    out = models.dit(img=to_tokens(latents), img_ids=image_ids, txt=prompt_emb, txt_ids=text_ids, timestep=timestep,
                     guidance=guidance, ref=edit_latents, ref_ids=edit_ids, cache=cache)
    return out.transpose(1, 2).reshape(b, c, h, w)


# ----------------------------------------------------------------------------- the pipeline

class Flux2ImagePipeline(BasePipeline):
    """DiffSynth-Studio 2.0's FLUX.2 pipeline (klein 4B/9B, distilled and base; dev). Models: `dit` (Flux2DiT),
    `text_encoder_qwen3` (Qwen3, klein) or `text_encoder_mistral` (Mistral-Small-3's language model, dev),
    `vae_encoder`/`vae_decoder` (FLUX.2 VAE); `tokenizer` (the text encoder's)."""

    family = "flux2"
    compiled_blocks = ("transformer_blocks", "single_transformer_blocks")
    guidance_hint = " (FLUX.2 [klein]; its base models take cfg_scale)"
    prompt_unit, text_encoders = encode_prompt, ("text_encoder_qwen3",)
    training_sigmas = staticmethod(flux2_training_sigmas)

    def __init__(self, device: str | torch.device = "cuda", torch_dtype: torch.dtype = torch.bfloat16):
        super().__init__(device, torch_dtype, UNITS, flux2_model_fn)
        self.tokenizer = None

    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                        model_configs: Sequence[ModelConfig] = (), tokenizer_config: ModelConfig | str | None = None,
                        vram_limit: float | None = None, parallel: str | None = None) -> "Flux2ImagePipeline":
        """Build the pipeline from checkpoint files (each recognised from its keys and shapes).

        `tokenizer_config`: the `tokenizer/` folder (ModelConfig or path); by default the one beside the text
        encoder's folder (release layout) or from the text encoder's repository. `vram_limit` (GB): enable
        VRAM management with that limit and no further buffer, as DiffSynth-Studio 2.0 does. `parallel`:
        "context" or "tensor" multi-device inference under torchrun, as FluxImagePipeline.from_pretrained.
        """
        device = cls._check_load_args(device, vram_limit, parallel)
        pipe = cls(device=device, torch_dtype=torch_dtype)
        sources = pipe._load_models(model_configs)
        loaded = [e.attribute for e in TEXT_ENCODERS if getattr(pipe, e.attribute) is not None]
        if len(loaded) > 1:
            raise ValueError(f"model_configs hold two FLUX.2 text encoders ({' and '.join(loaded)}): give the one of "
                             "your DiT (Mistral for FLUX.2 [dev], Qwen3 for [klein])")
        if loaded:
            pipe.tokenizer = te.load_tokenizer(tokenizer_dir(tokenizer_config, sources[loaded[0]], "tokenizer",
                                                             "tokenizer_config"))
        if parallel == "tensor":
            pipe._shard_dit()
        if vram_limit is not None:
            pipe.enable_vram_management(vram_limit=vram_limit, vram_buffer=0)
        return pipe

    @torch.no_grad()
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = DEFAULT_EMBEDDED_GUIDANCE, input_image: Image.Image | None = None,
                 denoising_strength: float = 1.0, edit_image: Image.Image | list[Image.Image] | None = None,
                 edit_image_auto_resize: bool = True, height: int | None = None, width: int | None = None,
                 seed: int | None = None, rand_device: str = "cpu", num_inference_steps: int = 30,
                 tiled: bool = False, tile_size: int = 128, tile_stride: int = 64,
                 progress_bar_cmd: Callable = tqdm, num_images: int = 1, output_type: str = "pil",
                 batch_cfg: bool = True, fbcache_thresh: float | None = None):
        """Generate images. Returns one PIL image (a list when num_images > 1), or tensors, see output_type.

        cfg_scale: true classifier-free guidance with `negative_prompt` (klein-base; distilled klein uses 1).
        embedded_guidance: to the DiT's guidance embedder (FLUX.2 [dev]; klein has none: another value than the
        default warns that it does nothing).
        edit_image: reference image(s) to edit or combine; `edit_image_auto_resize` scales each to about 1024x1024
        (DiffSynth-Studio 2.0), otherwise it is only centre-cropped to multiples of 16 pixels.
        input_image + denoising_strength: image-to-image. height/width default to the input image's, else 1024 (also
        when editing, as DiffSynth-Studio 2.0 and diffusers); rounded up to multiples of 16. tile_size/tile_stride (tiled VAE) are in units of 8 pixels.
        output_type: "pil"; "pt" -> (B, 3, H, W) float in [0, 1] on the device; "latent" -> (B, 128, H/16, W/16).
        batch_cfg: with cfg_scale != 1, run the positive and negative branch in one DiT batch.
        fbcache_thresh: First-Block-Cache threshold (larger skips more steps; 0 never skips); what was skipped
        is in `pipe.last_cache_stats`. (TeaCache's polynomial is fitted to FLUX.1: not offered here.)
        """
        check_call_args(locals())  # types, ranges, finiteness, sizes: before anything is allocated
        if not isinstance(self.dit, Flux2DiT):
            raise RuntimeError("no FLUX.2 DiT loaded: add the transformer (transformer/*.safetensors) to model_configs")
        self.warn_if_guidance_unused(embedded_guidance, DEFAULT_EMBEDDED_GUIDANCE)
        shared = dict(cfg_scale=cfg_scale, embedded_guidance=embedded_guidance, input_image=input_image,
                      denoising_strength=denoising_strength, edit_image=edit_image,
                      edit_image_auto_resize=edit_image_auto_resize, height=height, width=width, seed=seed,
                      rand_device=rand_device, num_inference_steps=num_inference_steps, tiled=tiled,
                      tile_size=tile_size, tile_stride=tile_stride, num_images=num_images)
        cache = make_cache(None, fbcache_thresh, num_inference_steps, cfg_scale != 1.0)
        return self.generate(shared, {"prompt": prompt}, {"prompt": negative_prompt}, cfg_scale, batch_cfg, cache,
                             progress_bar_cmd, output_type)
