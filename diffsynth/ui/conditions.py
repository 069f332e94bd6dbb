"""The Edit / condition tab's model side: which conditions the loaded models can use, the annotators this
install has, and the page's inputs turned into the pipeline's variant arguments."""
from __future__ import annotations

import importlib.util

import numpy as np
from PIL import Image

from ..pipelines.variants._images import BASE_CHANNELS, CONTROL_CHANNELS, FILL_CHANNELS, dit_channels
from ..ops.images import convert_image

KONTEXT, FILL, CONTROL, CONTROLNET, IPADAPTER = "kontext", "fill", "control", "controlnet", "ipadapter"
REFERENCE = "reference"  # FLUX.2's reference images (`edit_image`)


def available(pipe) -> set[str]:
    """The conditions of the Edit tab that the loaded models can use (FLUX.2: its reference images; FLUX.1: the
    DiT's input width tells Fill and Canny/Depth DiTs apart; ControlNet and IP-Adapter need their models loaded)."""
    from ..pipelines.flux2_image import Flux2ImagePipeline
    if isinstance(pipe, Flux2ImagePipeline):
        return {REFERENCE}
    names = set(pipe.loaded_models())
    channels = dit_channels(pipe)
    found = {KONTEXT} if channels == BASE_CHANNELS else set()
    found |= {FILL} if channels == FILL_CHANNELS else set()
    found |= {CONTROL} if channels == CONTROL_CHANNELS else set()
    found |= {CONTROLNET} if any(n.split(".")[0] == "controlnet" for n in names) else set()
    found |= {IPADAPTER} if {"ipadapter", "image_encoder"} <= names else set()
    return found


def annotators() -> list[str]:
    """Annotators this install can run: canny with OpenCV, the learned ones with controlnet_aux, and the
    pass-through ones always."""
    from ..controlnets.processors import LEARNED, PASS_THROUGH
    found = ["canny"] if importlib.util.find_spec("cv2") else []
    found += list(LEARNED) if importlib.util.find_spec("controlnet_aux") else []
    return found + list(PASS_THROUGH)


def annotate(image: Image.Image | None, processor: str) -> Image.Image | None:
    """The condition image the annotator makes (what the preview shows and the model gets)."""
    if image is None:
        return None
    from ..controlnets.processors import Annotator
    return Annotator(processor)(convert_image(image))


def editor_mask(value: dict | None) -> tuple[Image.Image, Image.Image] | None:
    """(image, mask) from an image editor's value: the mask is white wherever a layer was painted."""
    if not value or value.get("background") is None:
        return None
    background = convert_image(value["background"])
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        alpha = np.asarray(convert_image(layer, "RGBA").resize(background.size))[..., 3]
        painted |= alpha > 0
    if not painted.any():
        raise ValueError("inpaint: paint the area to repaint on the image (the mask is empty)")
    return background, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def conditions(kinds: set[str], reference_images: list[Image.Image], fill: dict | None,
               control: tuple[Image.Image | None, str], controlnet: tuple[Image.Image | None, str, float],
               ipadapter: tuple[Image.Image | None, float]) -> dict:
    """The variant arguments for what the page filled in (only for conditions in `kinds`)."""
    out: dict = {}
    if KONTEXT in kinds and reference_images:
        out["kontext_images"] = reference_images
    if REFERENCE in kinds and reference_images:
        out["edit_image"] = reference_images
    masked = editor_mask(fill) if FILL in kinds else None
    if masked is not None:
        out["flux_fill_image"], out["flux_fill_mask"] = masked
    if CONTROL in kinds and control[0] is not None:
        out["flux_control_image"] = annotate(*control)
    if CONTROLNET in kinds and controlnet[0] is not None:
        from ..pipelines.variants.controlnet import ControlNetInput
        image, processor, scale = controlnet
        out["controlnet_inputs"] = [ControlNetInput(image=annotate(image, processor), scale=scale,
                                                    processor_id=processor)]
    if IPADAPTER in kinds and ipadapter[0] is not None:
        out["ipadapter_images"], out["ipadapter_scale"] = convert_image(ipadapter[0]), ipadapter[1]
    return out
