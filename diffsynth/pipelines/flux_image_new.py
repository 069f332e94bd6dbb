"""Import path of DiffSynth-Studio 1.x code:
`from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig`."""
from ..loading.model_config import ModelConfig
from .flux_image import FluxImagePipeline
from .variants.controlnet import ControlNetInput

__all__ = ["FluxImagePipeline", "ModelConfig", "ControlNetInput"]
