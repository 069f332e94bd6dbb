"""Annotators: turn a photo into a ControlNet condition image (`Annotator("canny")(image)`).

canny runs on OpenCV (`pip install 'diffsynth-flux[controlnet]'`). The learned annotators (depth, softedge,
lineart, lineart_anime, openpose, normal) come from the `controlnet_aux` package (`pip install
'diffsynth-flux[annotators]'`, optional) and read their weights from a local folder (default `models/Annotators`, the
files of the lllyasviel/Annotators repository): nothing is downloaded here. tile, none and inpaint pass the
image through unchanged.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..ops.images import convert_image


@dataclass(frozen=True)
class _Learned:
    detector: str             # controlnet_aux class
    files: tuple[str, ...]    # weight files it reads from the annotator folder
    kwargs: tuple = ()        # extra call arguments


LEARNED = {
    "depth": _Learned("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "softedge": _Learned("HEDdetector", ("ControlNetHED.pth",)),
    "lineart": _Learned("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "lineart_anime": _Learned("LineartAnimeDetector", ("netG.pth",)),
    "openpose": _Learned("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
                         (("include_body", True), ("include_hand", True), ("include_face", True))),
    "normal": _Learned("NormalBaeDetector", ("scannet.pt",)),
}
PASS_THROUGH = ("tile", "none", "inpaint")
PROCESSOR_IDS = ("canny", *LEARNED, *PASS_THROUGH)


def import_failure(e: ImportError, package: str, needed_by: str, install: str) -> ImportError:
    """The error for a failed `import package`: when the package is absent, what to install; when it is there
    but something it imports is not (controlnet_aux without torchvision), that module, which
    "needs the package" would hide."""
    if e.name == package:
        return ImportError(f"{needed_by} needs the {package} package: {install}")
    cause = f"the module {e.name!r} it imports is missing" if e.name else "its import failed"
    return ImportError(f"{needed_by} needs {package}, which is installed but cannot be imported: {cause} "
                       f"({type(e).__name__}: {e})")


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges (white on black, RGB) of an RGB image, at its own size."""
    try:
        import cv2
    except ImportError as e:
        raise import_failure(e, "cv2", "the canny annotator",
                             "pip install 'diffsynth-flux[controlnet]' (or opencv-python-headless)") from e
    edges = cv2.Canny(np.asarray(convert_image(image)), low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[..., None], 3, -1))


def _preset_hint(processor_id: str) -> str:
    """DiffSynth-Studio 1.x's download preset for the annotator, when there is one (loading.download)."""
    if processor_id == "lineart_anime":
        return ""
    return (f"`diffsynth.download_models(['Annotators:{processor_id.capitalize()}'])` fetches them into "
            "models/Annotators. ")


def _load_learned(processor_id: str, model_path: str, device: str):
    spec = LEARNED[processor_id]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import controlnet_aux
    except ImportError as e:
        raise import_failure(e, "controlnet_aux", f"Annotator({processor_id!r})", "pip install 'diffsynth-flux[annotators]' "
                             "(canny, tile, none and inpaint work without it)") from e
    missing = [f for f in spec.files if not os.path.isfile(os.path.join(model_path, f))]
    if missing:
        raise FileNotFoundError(
            f"Annotator({processor_id!r}) reads {', '.join(spec.files)} from {model_path!r}; missing: "
            f"{', '.join(missing)}. {_preset_hint(processor_id)}Download them from the lllyasviel/Annotators "
            f"repository (ModelScope: sd_lora/Annotators), e.g. "
            f"`huggingface-cli download lllyasviel/Annotators {' '.join(missing)} --local-dir {model_path}`")
    detector = getattr(controlnet_aux, spec.detector).from_pretrained(model_path)
    return detector.to(device) if hasattr(detector, "to") else detector


class Annotator:
    """`Annotator(processor_id)(image)` -> the condition image, at the input image's size.

    processor_id: canny, depth, softedge, lineart, lineart_anime, openpose, normal, tile, none, inpaint.
    model_path: the folder holding the learned annotators' weights. detect_resolution: the side the
    detector works at (default: the image's shorter side). device: where a learned annotator runs
    (default: cuda when available)."""

    def __init__(self, processor_id: str, model_path: str = "models/Annotators", detect_resolution: int | None = None,
                 device: str | None = None, skip_processor: bool = False):
        if processor_id not in PROCESSOR_IDS:
            raise ValueError(f"unknown processor_id {processor_id!r}; known: {', '.join(PROCESSOR_IDS)}")
        if device is None:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor_id, self.detect_resolution = processor_id, detect_resolution
        self.detector = None
        if processor_id in LEARNED and not skip_processor:
            self.detector = _load_learned(processor_id, model_path, device)
        self.skip = skip_processor or processor_id in PASS_THROUGH

    def __call__(self, image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Annotator expects a PIL image, got {type(image).__name__}")
        size = image.size
        if self.skip:
            return image
        if self.processor_id == "canny":
            return canny(image)
        short = min(size)
        out = self.detector(image, detect_resolution=self.detect_resolution or short, image_resolution=short,
                            **dict(LEARNED[self.processor_id].kwargs))
        return out.resize(size)
