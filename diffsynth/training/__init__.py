"""FLUX.1 training: LoRA and full fine-tuning with accelerate (see `diffsynth train --help`)."""
from ..ops.lazy import lazy_exports

_EXPORTS = {"build_parser": ".args", "check_args": ".args", "DatasetError": ".data",
            "FluxTrainingModule": ".module", "main": ".trainer", "train": ".trainer"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
