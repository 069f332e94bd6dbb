"""ControlNets: `controlnet_inputs=[ControlNetInput(image=..., scale=..., start=..., end=..., processor_id=...,
inpaint_mask=..., controlnet_id=...)]`.

`encode_controlnet_inputs` VAE-encodes every control image once per call (resized to the generated size),
with the Inpainting ControlNet's masked image and keep-mask channel. `apply_controlnets` runs the active
ControlNets at every DiT evaluation and adds their scaled residuals to the base DiT's blocks; several
ControlNets are summed. A ControlNet is active while end <= progress <= start, where progress =
(N - 1 - step) / (N - 1) runs from 1 (first step) to 0 (last step).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from ...models.flux_controlnet import UNION_MODES
from ...models.flux_dit import patchify
from ..images import image_to_tensor, vae_encode
from ..units import step_unit, unit
from ...ops.images import check_image, convert_image

# processor_id values that mean "no annotator" (the image is the condition as is)
PLAIN_PROCESSORS = (None, "None", "none", "tile", "inpaint")


@dataclass
class ControlNetInput:
    """One ControlNet condition. `controlnet_id`: index of the ControlNet in load order (`pipe.controlnet`).
    `start`/`end`: the active window in denoising progress (1 = first step, 0 = last). `processor_id`: the
    control mode of a union ControlNet (canny, tile, depth, blur, pose, gray, lq). `inpaint_mask`: white =
    region to repaint (Inpainting ControlNets only)."""
    image: Image.Image | None = None
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0
    processor_id: str | None = None
    inpaint_mask: Image.Image | None = None
    controlnet_id: int = 0


@dataclass
class ControlCondition:
    controlnet_id: int
    cond: torch.Tensor               # (B, N, cond_channels) packed VAE latents (+ keep-mask); XLabs: (B, 3, H, W)
    mode: torch.Tensor | None        # (B,) long: union control mode
    scale: float
    start: float
    end: float


@dataclass
class ControlNetConditions:
    """What `apply_controlnets` reads at every step (one model input, shared by the CFG branches)."""
    items: list[ControlCondition] = field(default_factory=list)
    num_steps: int = 1

    def active(self, step_index: int) -> list[ControlCondition]:
        progress = (self.num_steps - 1 - step_index) / max(self.num_steps - 1, 1)
        return [c for c in self.items if c.end <= progress <= c.start]

    @classmethod
    def stack(cls, values: list["ControlNetConditions"]) -> "ControlNetConditions":
        """Training batches: one sample's conditions after the other along the batch."""
        first = values[0]
        items = []
        for i, c in enumerate(first.items):
            parts = [v.items[i] for v in values]
            mode = None if c.mode is None else torch.cat([p.mode for p in parts])
            items.append(replace(c, cond=torch.cat([p.cond for p in parts]), mode=mode))
        return cls(items, first.num_steps)


def _mask_array(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """(H, W) float in [0, 1]: the mask's mean over RGB, resized to the generated size (white = repaint)."""
    return np.asarray(convert_image(mask).resize((width, height)), dtype=np.float32).mean(-1) / 255.0


def _checked(pipe, inp, i: int) -> None:
    name = f"controlnet_inputs[{i}]"
    if not isinstance(inp, ControlNetInput):
        raise TypeError(f"{name} must be a ControlNetInput, got {type(inp).__name__}")
    n = len(pipe.controlnet)
    if not isinstance(inp.controlnet_id, int) or not 0 <= inp.controlnet_id < n:
        raise ValueError(f"{name}.controlnet_id={inp.controlnet_id!r}: {n} ControlNet(s) loaded "
                         f"(ids 0..{n - 1}, in the order of model_configs)")
    check_image(inp.image, f"{name}.image")
    if inp.inpaint_mask is not None:
        check_image(inp.inpaint_mask, f"{name}.inpaint_mask")
    if not inp.start >= inp.end:
        raise ValueError(f"{name}: start ({inp.start}) must be >= end ({inp.end}); progress runs from 1 "
                         "(first step) to 0 (last step)")
    net = pipe.controlnet[inp.controlnet_id]
    if net.is_union and inp.processor_id not in UNION_MODES:
        raise ValueError(f"{name}.processor_id={inp.processor_id!r}: ControlNet {inp.controlnet_id} is a union "
                         f"ControlNet; give one of {sorted(UNION_MODES)}")
    if not net.is_union and inp.processor_id not in PLAIN_PROCESSORS and inp.processor_id not in UNION_MODES:
        raise ValueError(f"{name}.processor_id={inp.processor_id!r} is unknown; known: {sorted(UNION_MODES)}")
    extra = 0 if net.config.pixel_condition else net.config.extra_channels
    if inp.inpaint_mask is not None and extra == 0:
        raise ValueError(f"{name}.inpaint_mask: ControlNet {inp.controlnet_id} is not an inpainting ControlNet "
                         "(load FLUX.1-dev-Controlnet-Inpainting-Beta for masks)")
    if extra and inp.inpaint_mask is None:
        raise ValueError(f"{name}: ControlNet {inp.controlnet_id} is an inpainting ControlNet; give inpaint_mask")
    if extra not in (0, 4):
        raise ValueError(f"ControlNet {inp.controlnet_id} takes {extra} extra condition channels; only 0 or 4 "
                         "(the inpainting mask) are known")


def encode_condition(pipe, inp: ControlNetInput, height: int, width: int, tiled: bool, tile_size: int,
                     tile_stride: int) -> torch.Tensor:
    """(1, N, 64|68) packed condition: the control image's VAE latents; for inpainting, of the image with the
    masked pixels set to black, plus the keep-mask (1 - mask, nearest-resized to the latent) as a 17th channel.
    Pixel-condition (XLabs) ControlNets take the image itself, (1, 3, H, W) in [-1, 1]."""
    if pipe.controlnet[inp.controlnet_id].config.pixel_condition:
        return image_to_tensor(inp.image, width, height).to(pipe.device, pipe.torch_dtype)
    image = convert_image(inp.image)
    if inp.inpaint_mask is not None:
        pixels = np.array(image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image)
        pixels[_mask_array(inp.inpaint_mask, width, height) > 0.5] = 0
        image = Image.fromarray(pixels)
    latents = vae_encode(pipe, image_to_tensor(image, width, height), "controlnet_inputs", tiled, tile_size,
                         tile_stride)
    if inp.inpaint_mask is not None:
        mask = torch.from_numpy(_mask_array(inp.inpaint_mask, width, height))[None, None]
        keep = 1 - torch.nn.functional.interpolate(mask, size=latents.shape[-2:], mode="nearest")
        latents = torch.cat([latents, keep.to(latents)], 1)
    return patchify(latents)


@unit(outputs=("controlnet_inputs",))
def collect_controlnet_columns(pipe, controlnet_inputs=None, controlnet_image=None, controlnet_processor_id=None,
                               controlnet_inpaint_mask=None, controlnet_scale=1.0):
    """Training data columns (`--extra_inputs controlnet_image,controlnet_processor_id`): `controlnet_<field>`
    become one ControlNetInput for ControlNet 0."""
    if controlnet_image is None:
        return {}
    if controlnet_inputs is not None:
        raise ValueError("give either controlnet_inputs or controlnet_image (+ controlnet_processor_id, ...), not both")
    if controlnet_processor_id == "":  # empty CSV cell
        controlnet_processor_id = None
    return {"controlnet_inputs": [ControlNetInput(image=controlnet_image, processor_id=controlnet_processor_id,
                                                  inpaint_mask=controlnet_inpaint_mask,
                                                  scale=float(controlnet_scale))]}


@unit(uses=("controlnet", "vae_encoder"), outputs=("controlnet_conditions",), model_inputs=("controlnet_conditions",),
      stack=("controlnet_conditions",))
def encode_controlnet_inputs(pipe, height, width, sigmas, controlnet_inputs=None, num_images=1, tiled=False,
                             tile_size=128, tile_stride=64):
    if controlnet_inputs is None:
        return {}
    if isinstance(controlnet_inputs, ControlNetInput):
        controlnet_inputs = [controlnet_inputs]
    if not len(pipe.controlnet):
        raise RuntimeError("controlnet_inputs need a ControlNet: add its checkpoint to model_configs")
    if pipe.vae_encoder is None:
        raise RuntimeError("controlnet_inputs need the VAE encoder: load ae.safetensors")
    for i, inp in enumerate(controlnet_inputs):
        _checked(pipe, inp, i)
    items = []
    for inp in controlnet_inputs:
        cond = encode_condition(pipe, inp, height, width, tiled, tile_size, tile_stride)
        mode = None
        if pipe.controlnet[inp.controlnet_id].is_union:
            mode = torch.tensor([UNION_MODES[inp.processor_id]], device=pipe.device)
        items.append(ControlCondition(inp.controlnet_id, _rows(cond, num_images),
                                      None if mode is None else mode.repeat(num_images),
                                      float(inp.scale), float(inp.start), float(inp.end)))
    return {"controlnet_conditions": ControlNetConditions(items, len(sigmas))}


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a per-sample tensor over the CFG branches batched together."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"ControlNet condition batch {t.shape[0]} does not divide the DiT batch {batch}")
    return t.repeat(batch // t.shape[0], *[1] * (t.ndim - 1))


@step_unit(after=("step1x_step", "use_identity"))  # the prompt they read: the connector's, or the identity
def apply_controlnets(models, call, step_index, controlnet_conditions=None):
    """The ControlNets read the prompt and embedded guidance, or `call.controlnet_context` when a unit set one."""
    if controlnet_conditions is None:
        return
    active = controlnet_conditions.active(step_index)
    if not active:
        return
    batch = call.latents.shape[0]
    img = patchify(call.latents)  # the ControlNets see the 16 latent channels of the target only
    txt, txt_ids, guidance = call.prompt_emb, call.text_ids, call.guidance
    if call.controlnet_context is not None:
        context = call.controlnet_context
        txt, txt_ids, guidance = context.prompt_emb, context.text_ids, context.guidance
    outputs = []
    for c in active:
        net = models.controlnet[c.controlnet_id]
        out = net(img, call.image_ids, txt, txt_ids, call.timestep, call.pooled_prompt_emb, guidance,
                  cond=_rows(c.cond, batch), mode=None if c.mode is None else _rows(c.mode, batch))
        outputs.append((out, c.scale))
    counts = {"double": len(models.dit.blocks), "single": len(models.dit.single_blocks)}

    def residual(kind: str, index: int) -> torch.Tensor | None:
        parts = [(r, s) for r, s in ((o.for_block(kind, index, counts[kind]), s) for o, s in outputs) if r is not None]
        if not parts:
            return None
        total = parts[0][0] * parts[0][1]
        for r, s in parts[1:]:
            total = total + r * s
        return total
    call.residuals.append(residual)


UNITS = [collect_controlnet_columns, encode_controlnet_inputs, apply_controlnets]
