# Full training of the LoRA-Encoder (metadata.csv columns: image, prompt, lora_encoder_inputs = a LoRA file path):
#   modelscope download --dataset DiffSynth-Studio/diffsynth_example_dataset --include "flux/FLUX.1-dev-LoRA-Encoder/*" --local_dir ./data/diffsynth_example_dataset
# Run from the repository root. Validate with examples/flux/model_training/validate_full/FLUX.1-dev-LoRA-Encoder.py
accelerate launch examples/flux/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux/FLUX.1-dev-LoRA-Encoder \
  --dataset_metadata_path data/diffsynth_example_dataset/flux/FLUX.1-dev-LoRA-Encoder/metadata.csv \
  --data_file_keys "image" \
  --max_pixels 1048576 \
  --dataset_repeat 100 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,black-forest-labs/FLUX.1-dev:ae.safetensors,DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev:model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.lora_encoder." \
  --output_path "./models/train/FLUX.1-dev-LoRA-Encoder_full" \
  --trainable_models "lora_encoder" \
  --extra_inputs "lora_encoder_inputs" \
  --use_gradient_checkpointing
