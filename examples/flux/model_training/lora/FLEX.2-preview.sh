# LoRA training of FLEX.2-preview on the example dataset:
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# Without condition columns the DiT sees FLEX's empty condition (text-to-image). To train in-painting or
# control, add the columns flex_inpaint_image, flex_inpaint_mask, flex_control_image (image files) and
# flex_control_strength to the metadata and name them in --extra_inputs (image columns are read as images).
# Run from the repository root. Validate with examples/flux/model_training/validate_lora/FLEX.2-preview.py
accelerate launch examples/flux/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "ostris/Flex.2-preview:Flex.2-preview.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLEX.2-preview_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,norm1_a.linear,norm1_b.linear,to_qkv_mlp" \
  --lora_rank 32 \
  --align_to_opensource_format \
  --use_gradient_checkpointing
