# Full training of the Controlnet-Union-alpha ControlNet (its own weights; the DiT stays frozen), DeepSpeed ZeRO-2.
# Dataset: modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# (metadata_controlnet_canny.csv: image, prompt and the ControlNet columns). Run from the repository root.
# `pipe.controlnet.models.0.` is the first ControlNet (`pipe.controlnet[0]`): the saved keys are its own.
# Validate with examples/flux/model_training/validate_full/FLUX.1-dev-Controlnet-Union-alpha.py
accelerate launch --config_file examples/flux/model_training/full/accelerate_config.yaml examples/flux/model_training/train.py \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_controlnet_canny.csv \
  --data_file_keys "image,controlnet_image" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/,black-forest-labs/FLUX.1-dev:ae.safetensors,InstantX/FLUX.1-dev-Controlnet-Union-alpha:diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.controlnet.models.0." \
  --output_path "./models/train/FLUX.1-dev-Controlnet-Union-alpha_full" \
  --trainable_models "controlnet" \
  --extra_inputs "controlnet_image,controlnet_processor_id" \
  --use_gradient_checkpointing
