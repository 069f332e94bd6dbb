"""FLUX.1-Redux-dev (`flux_redux_image`: one image or a list): image variation through extra text tokens.

SigLIP (`image_encoder`) patch features of each image go through the Redux embedder (`redux`) into T5
space; those tokens are appended to the positive prompt's T5 embedding (text ids zero), as diffusers'
FluxPriorReduxPipeline hands them to FluxPipeline. The pooled CLIP embedding stays the prompt's, and
the negative side (true CFG) keeps its own prompt without image tokens. The prompt may be empty.

`redux_replaces_prompt=True` is DiffSynth-Studio's Redux conditioning instead (Insert-Anything sets it): on
both CFG branches the prompt's T5 embedding becomes zeros of its length followed by the image tokens, and the
pooled CLIP embedding zeros.
"""
from __future__ import annotations

import torch

from ..denoise import PROMPT_OUTPUTS
from ..units import unit
from ._images import image_list


def redux_tokens(pipe, images) -> torch.Tensor:
    """(1, images x patches, T5 width) Redux tokens of the images, in order."""
    missing = [n for n in ("image_encoder", "redux") if getattr(pipe, n) is None]
    if missing:
        raise RuntimeError(f"flux_redux_image needs the SigLIP image encoder (FLUX.1-Redux-dev image_encoder/) and "
                           f"the Redux embedder (flux1-redux-dev.safetensors); not loaded: {', '.join(missing)}")
    images = image_list(images, "flux_redux_image")
    pipe.load_models_to_device(("image_encoder", "redux"))
    features = pipe.image_encoder.patch_features(images, pipe.compute_device_of("image_encoder"), pipe.torch_dtype)
    tokens = pipe.redux(features.to(pipe.compute_device_of("redux"), pipe.torch_dtype))
    return tokens.reshape(1, -1, tokens.shape[-1]).to(pipe.device, pipe.torch_dtype)


@unit(both_branches=True, uses=("image_encoder", "redux"), image_inputs=("flux_redux_image",), outputs=PROMPT_OUTPUTS,
      needs=PROMPT_OUTPUTS)
def append_redux_tokens(pipe, branches, flux_redux_image=None, redux_replaces_prompt=False):
    if flux_redux_image is None:
        return [{} for _ in branches]
    posi = branches[0]
    tokens = redux_tokens(pipe, flux_redux_image)
    if tokens.shape[-1] != posi["prompt_emb"].shape[-1]:
        raise ValueError(f"the Redux embedder makes {tokens.shape[-1]}-wide tokens but the T5 prompt embedding is "
                         f"{posi['prompt_emb'].shape[-1]} wide: Redux and the text encoder do not belong together")
    b = posi["prompt_emb"].shape[0]
    tokens = tokens.repeat(b, 1, 1)
    ids = torch.zeros(b, tokens.shape[1], 3, device=posi["text_ids"].device, dtype=posi["text_ids"].dtype)
    if redux_replaces_prompt:
        emb = torch.cat([torch.zeros_like(posi["prompt_emb"]), tokens], 1)
        replaced = {"prompt_emb": emb, "pooled_prompt_emb": torch.zeros_like(posi["pooled_prompt_emb"]),
                    "text_ids": torch.zeros(b, emb.shape[1], 3, device=ids.device, dtype=ids.dtype)}
        return [dict(replaced) for _ in branches]
    first = {"prompt_emb": torch.cat([posi["prompt_emb"], tokens], 1),
             "text_ids": torch.cat([posi["text_ids"], ids], 1)}
    return [first] + [{} for _ in branches[1:]]


UNITS = [append_redux_tokens]
