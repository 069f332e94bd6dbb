"""DiffSynth-Studio 2.0's `diffsynth.utils` import paths (its scripts import the ControlNet helpers from here)."""
