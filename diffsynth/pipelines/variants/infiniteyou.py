"""InfiniteYou: `infinityou_id_image` (a face photo) and `infinityou_guidance` (InfuseNet's guidance, default 1).

The face's ArcFace embedding (models.face_id) goes through the projector (`image_proj_model`) into 8 identity
tokens; InfuseNet, loaded as a ControlNet and driven by `controlnet_inputs` (a black image, processor "None"),
then reads those tokens as its text (with all-zero text positions) and `infinityou_guidance` as its guidance,
on both CFG branches (`use_identity` sets them as the call's `controlnet_context`); its residuals enter the
DiT like any ControlNet's (variants.controlnet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.face_id import FaceEmbedder, face_folder
from ..checks import _need_real
from ..denoise import ControlNetContext
from ..units import step_unit, unit
from ._images import check_image


@dataclass
class IdentityContext:
    """What the ControlNets read instead of the prompt: tokens (B, 8, 4096) and guidance (B,)."""
    tokens: torch.Tensor
    guidance: torch.Tensor

    def rows(self, batch: int) -> "IdentityContext":
        if self.tokens.shape[0] == batch:
            return self
        repeat = batch // self.tokens.shape[0]
        return IdentityContext(self.tokens.repeat(repeat, 1, 1), self.guidance.repeat(repeat))

    def text_ids(self) -> torch.Tensor:
        return self.tokens.new_zeros(*self.tokens.shape[:2], 3)

    @classmethod
    def stack(cls, values: list["IdentityContext"]) -> "IdentityContext":
        """Training batches: one sample after the other."""
        return cls(torch.cat([v.tokens for v in values]), torch.cat([v.guidance for v in values]))


def face_embedder(pipe) -> FaceEmbedder:
    """The face pipeline, built at first use from the files beside the projector's checkpoint."""
    key = (str(pipe.device), pipe.torch_dtype)
    cached = getattr(pipe, "_infiniteyou_faces", None)
    if cached is None or cached[0] != key:
        folder = face_folder(getattr(pipe.image_proj_model, "source", ""))
        cached = (key, FaceEmbedder(folder, pipe.device, pipe.torch_dtype))
        pipe._infiniteyou_faces = cached
    return cached[1]


def _number(value):
    """Dataset columns arrive as text: "1.0" -> 1.0; anything else is left for the check to name."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


@unit(models=("image_proj_model",), uses=("controlnet",), image_inputs=("infinityou_id_image",), outputs=("identity_context",),
      model_inputs=("identity_context",), stack=("identity_context",))
def encode_identity(pipe, infinityou_id_image=None, infinityou_guidance=1.0, controlnet_inputs=None):
    if infinityou_id_image is None:
        return {}
    check_image(infinityou_id_image, "infinityou_id_image")
    _need_real("infinityou_guidance", _number(infinityou_guidance))
    if pipe.image_proj_model is None:
        raise RuntimeError("infinityou_id_image needs InfiniteYou's projector: add image_proj_model.bin (and "
                           "InfuseNetModel/*.safetensors as the ControlNet) to model_configs")
    if not len(pipe.controlnet):
        raise RuntimeError("infinityou_id_image needs InfuseNet: add InfuseNetModel/*.safetensors to model_configs "
                           "and pass controlnet_inputs")
    if controlnet_inputs is None:  # the tokens reach the DiT only through InfuseNet's residuals
        raise ValueError("infinityou_id_image acts through InfuseNet: also pass controlnet_inputs=[ControlNetInput("
                         "image=<black image>, processor_id='None')]")
    embedding = face_embedder(pipe)(infinityou_id_image)  # (512,)
    device = pipe.compute_device_of("image_proj_model")
    tokens = pipe.image_proj_model(embedding.reshape(1, -1, embedding.shape[-1]).to(device, pipe.torch_dtype))
    guidance = torch.tensor([_number(infinityou_guidance)], device=device, dtype=pipe.torch_dtype)
    return {"identity_context": IdentityContext(tokens, guidance)}


@step_unit()
def use_identity(models, call, step_index, identity_context=None):
    """The ControlNets read the identity tokens (at text positions 0) and their guidance."""
    if identity_context is None:
        return
    identity = identity_context.rows(call.latents.shape[0])
    call.controlnet_context = ControlNetContext(identity.tokens, identity.text_ids(), identity.guidance)


UNITS = [encode_identity, use_identity]
