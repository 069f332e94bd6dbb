"""Import path of DiffSynth-Studio 1.x code:
`from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig, ControlNetInput`.
Exposes the same names as `flux_image` (2.0's path)."""
from .flux_image import ControlNetInput, FluxImagePipeline, ModelConfig, load_state_dict

__all__ = ["FluxImagePipeline", "ModelConfig", "ControlNetInput", "load_state_dict"]
