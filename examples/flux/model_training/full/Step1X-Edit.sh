# Full training of the Step1X-Edit DiT (DeepSpeed ZeRO-2, 8 GPUs, bf16: full/accelerate_config.yaml) on the
# example dataset (metadata_step1x.csv: image, prompt, step1x_reference_image columns):
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# Run from the repository root. Validate with examples/flux/model_training/validate_full/Step1X-Edit.py
accelerate launch --config_file examples/flux/model_training/full/accelerate_config.yaml examples/flux/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_step1x.csv \
  --data_file_keys "image,step1x_reference_image" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "Qwen/Qwen2.5-VL-7B-Instruct:model-*.safetensors,stepfun-ai/Step1X-Edit:step1x-edit-i1258.safetensors,stepfun-ai/Step1X-Edit:vae.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Step1X-Edit_full" \
  --trainable_models "dit" \
  --extra_inputs "step1x_reference_image" \
  --use_gradient_checkpointing_offload
