"""DiffSynth-Studio 2.0's import path of the state-dict reader: `from diffsynth.core import load_state_dict`
(its validate scripts use it; 1.x and 2.0 also import it from `diffsynth`)."""
from .ops.files import load_state_dict

__all__ = ["load_state_dict"]
