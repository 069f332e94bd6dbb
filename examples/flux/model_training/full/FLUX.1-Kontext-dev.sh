# Full training of the FLUX.1-Kontext-dev DiT (DeepSpeed ZeRO-2, 8 GPUs, bf16: full/accelerate_config.yaml) on
# the example dataset's metadata_kontext.csv (columns image,prompt,kontext_images):
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# Run from the repository root. Validate with examples/flux/model_training/validate_full/FLUX.1-Kontext-dev.py
accelerate launch --config_file examples/flux/model_training/full/accelerate_config.yaml \
  examples/flux/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_kontext.csv \
  --data_file_keys "image,kontext_images" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-Kontext-dev:flux1-kontext-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.1-Kontext-dev_full" \
  --trainable_models "dit" \
  --extra_inputs "kontext_images" \
  --use_gradient_checkpointing
