"""DiffSynth-Studio 2.0's import path of the ControlNet helpers: `from diffsynth.utils.controlnet import Annotator`
(1.x: `diffsynth.controlnets.processors`). The same objects as there and in `pipelines.variants.controlnet`."""
from ..controlnets.processors import Annotator
from ..pipelines.variants.controlnet import ControlNetInput

__all__ = ["Annotator", "ControlNetInput"]
