"""flux-nano: a small model of the exact FLUX.1 architecture that draws the shape its prompt names.

shapes.py (the procedural data and prompt grammar), vae.py (autoencoder training), text.py (random CLIP/T5
folders with offline tokenizers, also used by diffsynth.testing), model.py (sizes, text encoders, folder),
build.py (the one rebuild command), evaluate.py (reading images back), demo.py.
"""
from pathlib import Path

SHIPPED = Path(__file__).parent / "flux-nano"  # the model shipped in the repository
