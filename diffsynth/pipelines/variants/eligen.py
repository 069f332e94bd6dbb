"""EliGen (`eligen_entity_prompts`, `eligen_entity_masks`, `eligen_enable_on_negative`, `eligen_enable_inpaint`):
regional prompts. The EliGen weights are a LoRA merged into the DiT (`pipe.load_lora`); this module builds
the text context [entity 1, ..., entity N, global prompt] and the attention mask every block applies:

* entity prompt i <-> image tokens: only inside mask i (both directions);
* prompt i <-> prompt j (entities and the global prompt), i != j: blocked;
* global prompt <-> image tokens, image <-> image: allowed.

Masks (PIL images, any size: resized with nearest-neighbour to the latent grid) are binarised where their
mean RGB value is above half; an image token (2x2 latent patch) is inside when any of its pixels is.
`eligen_enable_inpaint` (with `input_image`): outside the union of the masks the input image is kept; the
predicted velocity there is replaced by the one that leads straight back to the input latents.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ...models import flux_text_encoders as te
from ...ops.attention_mask import GroupMask
from ..images import VAE_FACTOR
from ..units import step_unit, unit
from ...ops.images import convert_image


def entity_masks(masks, count: int, height: int, width: int) -> torch.Tensor:
    """PIL masks -> (N, height/8, width/8) bool on the latent grid."""
    if not isinstance(masks, (list, tuple)) or not all(isinstance(m, Image.Image) for m in masks):
        raise TypeError("eligen_entity_masks must be a list of PIL images, one per entity prompt")
    if len(masks) != count:
        raise ValueError(f"eligen_entity_masks has {len(masks)} masks for {count} eligen_entity_prompts: "
                         "give exactly one mask per entity prompt")
    size = (width // VAE_FACTOR, height // VAE_FACTOR)
    grids = [np.asarray(convert_image(m).resize(size, Image.NEAREST), dtype=np.float32).mean(-1) > 127.5
             for m in masks]
    return torch.from_numpy(np.stack(grids))


def token_regions(masks: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool latent masks -> (N, h/2 * w/2) bool: a token is inside when any pixel of its patch is."""
    n, h, w = masks.shape
    return masks.view(n, h // 2, 2, w // 2, 2).any(4).any(2).reshape(n, -1)


def entity_attention_mask(regions: torch.Tensor, entity_len: int, global_len: int, n_image: int) -> GroupMask:
    """The mask over [entity_1..entity_N, global, image] tokens, in factored form (`.dense()`: (B, 1, L, L)).

    regions (B, N, P) bool: image tokens inside each entity's mask; image tokens beyond P (reference tokens)
    are seen by the global prompt only.
    """
    b, n, p = regions.shape
    device = regions.device
    inside = torch.cat([regions, regions.new_zeros(b, n, n_image - p)], -1)                   # (B, N, n_image)
    inside = torch.cat([inside, regions.new_ones(b, 1, n_image)], 1)                          # (B, N+1, n_image)
    lengths = torch.tensor([entity_len] * n + [global_len], device=device)
    group = torch.arange(n + 1, device=device).repeat_interleave(lengths)                    # (T,)
    return GroupMask(group=group, inside=inside)


def _prompts(eligen_entity_prompts) -> list[str]:
    prompts = eligen_entity_prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("eligen_entity_prompts must be a non-empty list of strings")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"eligen_entity_prompts {empty} are empty: every entity needs a description")
    return list(prompts)


@unit(both_branches=True, models=("text_encoder_2",), outputs=("eligen_prompt_emb", "eligen_regions"),
      model_inputs=("eligen_prompt_emb", "eligen_regions"), needs=("prompt_emb",))
def encode_eligen_entities(pipe, branches, height, width, eligen_entity_prompts=None, eligen_entity_masks=None,
                           eligen_enable_on_negative=False, t5_sequence_length=512, num_images=1):
    """Entity prompt embeddings (B, N * L, 4096) and their token regions (B, N, P), per CFG branch.

    The negative side gets EliGen only with `eligen_enable_on_negative`: its own prompt's embedding
    repeated once per entity, with the same masks."""
    if eligen_entity_prompts is None and eligen_entity_masks is None:
        return [{} for _ in branches]
    if eligen_entity_prompts is None or eligen_entity_masks is None:
        raise ValueError("EliGen needs both eligen_entity_prompts and eligen_entity_masks")
    prompts = _prompts(eligen_entity_prompts)
    regions = token_regions(entity_masks(eligen_entity_masks, len(prompts), height, width))
    regions = regions.to(pipe.device)[None].repeat(num_images, 1, 1)                          # (B, N, P)
    if pipe.text_encoder_2 is None:
        raise RuntimeError("eligen_entity_prompts need the T5 text encoder (text_encoder_2)")
    emb = te.encode_prompt_t5(pipe.tokenizer_2, pipe.text_encoder_2, prompts, t5_sequence_length,
                              pipe.compute_device_of("text_encoder_2"))                     # (N, L, 4096)
    emb = emb.to(pipe.device, pipe.torch_dtype).flatten(0, 1)[None].repeat(num_images, 1, 1)
    out = [{"eligen_prompt_emb": emb, "eligen_regions": regions}]
    if len(branches) > 1:
        if eligen_enable_on_negative:
            nega = branches[1]["prompt_emb"]                                                   # (B, L, 4096)
            out.append({"eligen_prompt_emb": nega.repeat(1, len(prompts), 1), "eligen_regions": regions})
        else:
            out.append({})
    return out


@step_unit(after=("apply_controlnets", "append_prompt_tokens"))  # entities go before the whole prompt
def eligen_attention(models, call, step_index, eligen_prompt_emb=None, eligen_regions=None):
    """Entity prompts before the global prompt (text ids 0), and the regional mask for every block."""
    if eligen_prompt_emb is None:
        return
    if call.mask is not None:
        raise RuntimeError("EliGen's regional attention cannot be combined with another attention mask")
    b, n = eligen_regions.shape[:2]
    global_len = call.prompt_emb.shape[1]
    n_image = call.image_ids.shape[-2] + sum(ids.shape[-2] for _, ids in call.ref)
    call.prompt_emb = torch.cat([eligen_prompt_emb.to(call.prompt_emb), call.prompt_emb], 1)
    call.text_ids = torch.cat([call.text_ids.new_zeros(b, eligen_prompt_emb.shape[1], 3), call.text_ids], 1)
    call.mask = entity_attention_mask(eligen_regions, eligen_prompt_emb.shape[1] // n, global_len, n_image)


@unit(outputs=("eligen_inpaint_latents", "eligen_inpaint_keep"),
      model_inputs=("eligen_inpaint_latents", "eligen_inpaint_keep"),
      batched=("eligen_inpaint_latents", "eligen_inpaint_keep"))
def prepare_eligen_inpaint(pipe, height, width, eligen_enable_inpaint=False, eligen_entity_masks=None,
                           input_image=None, input_latents=None):
    """Input latents and the area to keep (1 outside every entity mask) for `eligen_enable_inpaint`."""
    if not eligen_enable_inpaint:
        return {}
    if input_image is None or input_latents is None:
        raise ValueError("eligen_enable_inpaint keeps the input image outside the entity masks: pass input_image")
    if eligen_entity_masks is None:
        raise ValueError("eligen_enable_inpaint needs eligen_entity_masks")
    union = entity_masks(eligen_entity_masks, len(eligen_entity_masks), height, width).any(0)   # (h, w)
    keep = (~union).to(pipe.device, pipe.torch_dtype)[None, None].repeat(input_latents.shape[0], 1, 1, 1)
    return {"eligen_inpaint_latents": input_latents, "eligen_inpaint_keep": keep}


@step_unit()
def eligen_inpaint(models, call, step_index, eligen_inpaint_latents=None, eligen_inpaint_keep=None):
    """Outside the masks, the velocity (x_t - x_0) / sigma: an Euler step then stays on the line to x_0."""
    if eligen_inpaint_latents is None:
        return
    sigma = call.timestep.float().clamp_min(1e-6)[:, None, None, None]
    toward_input = ((call.latents.float() - eligen_inpaint_latents.float()) / sigma)
    keep = eligen_inpaint_keep

    def edit(velocity: torch.Tensor) -> torch.Tensor:
        return torch.lerp(velocity.float(), toward_input, keep.float()).to(velocity.dtype)
    call.output.append(edit)


UNITS = [encode_eligen_entities, prepare_eligen_inpaint, eligen_attention, eligen_inpaint]
