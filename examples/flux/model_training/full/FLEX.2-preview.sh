# Full training of the FLEX.2-preview DiT (DeepSpeed ZeRO-2, 8 GPUs, bf16: full/accelerate_config.yaml):
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# Condition columns (flex_inpaint_image, flex_inpaint_mask, flex_control_image, ...) go to --extra_inputs.
# Run from the repository root. Validate with examples/flux/model_training/validate_full/FLEX.2-preview.py
accelerate launch --config_file examples/flux/model_training/full/accelerate_config.yaml \
  examples/flux/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 200 \
  --model_id_with_origin_paths "ostris/Flex.2-preview:Flex.2-preview.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLEX.2-preview_full" \
  --trainable_models "dit" \
  --use_gradient_checkpointing
