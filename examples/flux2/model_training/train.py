"""FLUX.2 [klein] training script (DiffSynth-Studio 2.0's FLUX.2 training interface).

    accelerate launch examples/flux2/model_training/train.py --dataset_base_path data/example_image_dataset \
        --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,..." \
        --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" --lora_base_model dit ...

Same arguments as `diffsynth train` (see `--help`); the FLUX.2 pipeline is chosen from the model files.
"""
import sys

from diffsynth.training import main

if __name__ == "__main__":
    sys.exit(main())
