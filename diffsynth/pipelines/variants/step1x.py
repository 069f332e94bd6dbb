"""Step1X-Edit: image editing with a Qwen2.5-VL prompt encoder and a per-step connector.

`step1x_reference_image` (PIL) is both shown to Qwen2.5-VL with the prompt and VAE-encoded as reference
tokens appended after the target tokens, with the target grid's position ids (channel 0 = 0). It is resized
to the target size first (the model was trained on same-size pairs), with a warning when that changes it.
CLIP/T5 `encode_prompt` is replaced: the positive and negative prompts are embedded in one Qwen batch, and
at every DiT evaluation the connector turns those embeddings into the DiT's text tokens and pooled vector
(it is conditioned on the timestep).
"""
from __future__ import annotations

import warnings

import torch
from PIL import Image

from ...models.flux_dit import image_ids, patchify
from ...models.step1x import encode_step1x_prompts
from ..denoise import PROMPT_OUTPUTS
from ..images import image_to_tensor, vae_encode
from ..units import step_unit, unit
from ...ops.images import check_image, convert_image

LLM_OUTPUTS = ("step1x_llm_embedding", "step1x_mask")


def _is_step1x(pipe) -> bool:
    return pipe.step1x_connector is not None


def _reference(pipe, image) -> Image.Image:
    if pipe.qwenvl is None:
        raise RuntimeError("Step1X-Edit needs Qwen2.5-VL: add ModelConfig(model_id='Qwen/Qwen2.5-VL-7B-Instruct') "
                           "(the whole HF folder) to model_configs")
    if image is None:
        raise ValueError("Step1X-Edit edits an image: pass step1x_reference_image= (a PIL image)")
    return convert_image(check_image(image, "step1x_reference_image"))


@unit(both_branches=True, models=("qwenvl",), uses=("step1x_connector",), outputs=(*LLM_OUTPUTS, *PROMPT_OUTPUTS),
      model_inputs=(*LLM_OUTPUTS, *PROMPT_OUTPUTS), replaces=("encode_prompt",), active=_is_step1x,
      image_inputs=("step1x_reference_image",))
def encode_step1x_prompt(pipe, branches, step1x_reference_image=None, num_images=1):
    """Qwen2.5-VL embeddings of the positive (and negative) prompt with the reference image, one batch."""
    if not _is_step1x(pipe):  # run outside `active_units` (a no-op for other pipelines)
        return [{} for _ in branches]
    image = _reference(pipe, step1x_reference_image)
    prompts = [b["prompt"] for b in branches]
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompt must be a string, got {type(p).__name__}")
    emb, mask = encode_step1x_prompts(pipe.qwenvl, pipe.qwenvl.processor, prompts, image,
                                      pipe.compute_device_of("qwenvl"), pipe.torch_dtype)
    emb, mask = emb.to(pipe.device), mask.to(pipe.device)
    # the DiT's text inputs are filled at every step by the connector (step1x_step); None until then
    return [{"step1x_llm_embedding": emb[i:i + 1].repeat(num_images, 1, 1),
             "step1x_mask": mask[i:i + 1].repeat(num_images, 1), **dict.fromkeys(PROMPT_OUTPUTS)}
            for i in range(len(prompts))]


@unit(uses=("qwenvl", "vae_encoder"), outputs=("step1x_reference_latents",), model_inputs=("step1x_reference_latents",),
      batched=("step1x_reference_latents",), image_inputs=("step1x_reference_image",))  # not cacheable: the cache expects every unit's cacheable outputs
def encode_step1x_reference(pipe, noise, height, width, step1x_reference_image=None, tiled=False, tile_size=128,
                            tile_stride=64):
    """The reference image's latents (B, 16, h, w), at the target size."""
    if step1x_reference_image is None:
        return {}
    image = _reference(pipe, step1x_reference_image)
    if image.size != (width, height):
        warnings.warn(f"step1x_reference_image is {image.width}x{image.height}; resized to the target "
                      f"{width}x{height} (Step1X-Edit edits same-size images)", stacklevel=4)
        image = image.resize((width, height), Image.LANCZOS)
    latents = vae_encode(pipe, image_to_tensor(image, width, height), "step1x_reference_image", tiled, tile_size,
                         tile_stride)
    return {"step1x_reference_latents": latents.repeat(noise.shape[0], 1, 1, 1)}


@step_unit()
def step1x_step(models, call, step_index, step1x_llm_embedding=None, step1x_mask=None,
                step1x_reference_latents=None):
    """Connector -> the DiT's text tokens (zero ids) and pooled vector; reference tokens on the target grid."""
    if step1x_llm_embedding is not None:
        call.prompt_emb, call.pooled_prompt_emb = models.step1x_connector(
            step1x_llm_embedding, call.timestep, step1x_mask)
        call.text_ids = torch.zeros(call.prompt_emb.shape[0], call.prompt_emb.shape[1], 3,
                                    device=call.prompt_emb.device)
    if step1x_reference_latents is not None:
        b, _, h, w = step1x_reference_latents.shape
        call.ref.append((patchify(step1x_reference_latents), image_ids(h, w, b, device=step1x_reference_latents.device)))


UNITS = [encode_step1x_prompt, encode_step1x_reference, step1x_step]
