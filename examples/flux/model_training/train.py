"""FLUX.1 training script (DiffSynth-Studio's FLUX training interface).

    accelerate launch examples/flux/model_training/train.py --dataset_base_path data/example_image_dataset ...

Same arguments as `diffsynth train` (see `--help`).
"""
import sys

from diffsynth.training import main

if __name__ == "__main__":
    sys.exit(main())
