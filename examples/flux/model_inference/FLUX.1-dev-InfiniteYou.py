import numpy as np
import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig, ControlNetInput

# InfiniteYou's face pipeline needs `pip install 'diffsynth-flux[infiniteyou]'` (onnxruntime, OpenCV), the antelopev2
# face detector of the InfiniteYou repository (fetched below) and facexlib's ArcFace weights:
#   wget -P models/ByteDance/InfiniteYou/supports/facexlib \
#     https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth
# The identity photos: modelscope download --dataset DiffSynth-Studio/examples_in_diffsynth \
#   --include "data/examples/infiniteyou/*" --local_dir ./
ModelConfig(model_id="ByteDance/InfiniteYou", origin_file_pattern="supports/insightface/models/antelopev2/").resolve()
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

# InfuseNet is driven as a ControlNet with a black control image; the identity comes from the face photo.
height, width = 1024, 1024
controlnet_inputs = [ControlNetInput(image=Image.fromarray(np.zeros((height, width, 3), np.uint8)), scale=1.0,
                                     processor_id="None")]
for name, prompt in (("man", "A man, portrait, cinematic"), ("woman", "A woman, portrait, cinematic")):
    image = pipe(
        prompt=prompt, seed=1,
        infinityou_id_image=Image.open(f"data/examples/infiniteyou/{name}.jpg").convert("RGB"),
        infinityou_guidance=1.0,
        controlnet_inputs=controlnet_inputs,
        num_inference_steps=50, embedded_guidance=3.5,
        height=height, width=width,
    )
    image.save(f"{name}.jpg")
