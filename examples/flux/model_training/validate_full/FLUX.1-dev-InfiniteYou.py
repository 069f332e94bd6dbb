"""Generate with InfuseNet and the projector fully trained by full/FLUX.1-dev-InfiniteYou.sh (run from the repository root)."""
import csv

import numpy as np
import torch
from PIL import Image
from diffsynth import load_state_dict
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig, ControlNetInput

pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
        ModelConfig(model_id="ByteDance/InfiniteYou", origin_file_pattern="infu_flux_v1.0/aes_stage2/image_proj_model.bin"),
        ModelConfig(model_id="ByteDance/InfiniteYou", origin_file_pattern="infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors"),
    ],
)
state_dict = load_state_dict("models/train/FLUX.1-dev-InfiniteYou_full/epoch-0.safetensors")
for prefix, model in (("image_proj_model.", pipe.image_proj_model), ("controlnet.models.0.", pipe.controlnet.models[0])):
    model.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})

# the first training sample's prompt and identity photo
dataset = "data/diffsynth_example_dataset/flux/FLUX.1-dev-InfiniteYou"
with open(f"{dataset}/metadata.csv", newline="") as f:
    sample = next(csv.DictReader(f))
image = pipe(
    prompt=sample["prompt"],
    infinityou_id_image=Image.open(f"{dataset}/{sample['infinityou_id_image']}").convert("RGB"),
    infinityou_guidance=1.0,
    controlnet_inputs=[ControlNetInput(image=Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)), processor_id="None")],
    height=1024, width=1024,
    seed=0, rand_device="cuda",
)
image.save("image_FLUX.1-dev-InfiniteYou_full.jpg")
