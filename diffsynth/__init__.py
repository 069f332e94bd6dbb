"""diffsynth: FLUX image generation and training on the checkpoint files you already have."""
from .ops.files import CheckpointError, load_state_dict
from .loading.model_config import ModelConfig
from .loading.download import download_customized_models, download_models
from .pipelines.flux_image import FluxImagePipeline
from .pipelines.flux2_image import Flux2ImagePipeline
from .pipelines.variants.controlnet import ControlNetInput

__all__ = ["FluxImagePipeline", "Flux2ImagePipeline", "ModelConfig", "ControlNetInput", "CheckpointError", "load_state_dict",
           "download_models", "download_customized_models"]
__version__ = "0.1.0"
