"""diffsynth: FLUX image generation and training on the checkpoint files you already have."""
from .core.loading import CheckpointError, load_state_dict
from .core.model_config import ModelConfig
from .pipelines.flux_image import FluxImagePipeline

__all__ = ["FluxImagePipeline", "ModelConfig", "CheckpointError", "load_state_dict"]
__version__ = "0.1.0"
