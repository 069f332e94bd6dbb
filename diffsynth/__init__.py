"""diffsynth: FLUX image generation and training on the checkpoint files you already have."""
from .ops.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": ".ops.files", "load_state_dict": ".ops.files",
    "ModelConfig": ".loading.model_config",
    "download_customized_models": ".loading.download", "download_models": ".loading.presets",
    "FluxImagePipeline": ".pipelines.flux_image", "Flux2ImagePipeline": ".pipelines.flux2_image",
    "ControlNetInput": ".pipelines.variants.controlnet",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
