"""Every name DiffSynth-Studio's FLUX example scripts import from `diffsynth` imports here.

Gathered by grepping the `from diffsynth... import ...` lines of 1.x's examples/flux/**/*.py (the last commit
before 2.0) and 2.0's examples/flux/**/*.py. Their training entry point (`model_training/train.py`) is the
one exception: it drives DiffSynth-Studio's own trainer classes; this project ships its own train.py with the
same command line (the .sh scripts call it), so those names are listed apart and not provided.
"""
from __future__ import annotations

import importlib

import pytest

STUDIO_1X = {
    "diffsynth.pipelines.flux_image_new": ("FluxImagePipeline", "ModelConfig", "ControlNetInput"),
    "diffsynth": ("load_state_dict", "download_models", "download_customized_models"),
    "diffsynth.controlnets.processors": ("Annotator",),
}
STUDIO_2 = {
    "diffsynth.pipelines.flux_image": ("FluxImagePipeline", "ModelConfig", "ControlNetInput"),
    "diffsynth": ("load_state_dict",),
    "diffsynth.core": ("load_state_dict",),
    "diffsynth.utils.controlnet": ("Annotator",),
}
# Not provided: names only their model_training/train.py imports (examples/flux/model_training/train.py replaces
# it): diffsynth.trainers.utils (DiffusionTrainingModule, ModelLogger, launch_training_task, flux_parser),
# diffsynth.trainers.unified_dataset.UnifiedDataset, diffsynth.models.lora.FluxLoRAConverter (1.x);
# diffsynth.core.UnifiedDataset and `from diffsynth.diffusion import *` (2.0).
IMPORTS = [(m, n) for table in (STUDIO_1X, STUDIO_2) for m, names in table.items() for n in names]


@pytest.mark.parametrize("module,name", IMPORTS)
def test_studio_script_import(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_both_pipeline_paths_expose_the_same_objects():
    old = importlib.import_module("diffsynth.pipelines.flux_image_new")
    new = importlib.import_module("diffsynth.pipelines.flux_image")
    import diffsynth
    for name in ("FluxImagePipeline", "ModelConfig", "ControlNetInput", "load_state_dict"):
        assert getattr(old, name) is getattr(new, name) is getattr(diffsynth, name), name
    from diffsynth.controlnets.processors import Annotator
    from diffsynth.core import load_state_dict
    from diffsynth.utils.controlnet import Annotator as Annotator2, ControlNetInput
    assert Annotator2 is Annotator and load_state_dict is diffsynth.load_state_dict
    assert ControlNetInput is diffsynth.ControlNetInput

