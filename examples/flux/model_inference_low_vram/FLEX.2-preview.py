import torch
from PIL import ImageFilter
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Weights stored on the CPU in fp8, computed layer by layer on the GPU in bf16.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="ostris/Flex.2-preview", origin_file_pattern="Flex.2-preview.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
    ],
)
pipe.enable_vram_management()

image = pipe(prompt="portrait of a beautiful Asian girl, long hair, red t-shirt, sunshine, beach",
             num_inference_steps=50, embedded_guidance=3.5, seed=0)
image.save("image_1.jpg")

control_image = image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
image = pipe(prompt="portrait of a beautiful Asian girl, long hair, yellow t-shirt, sunshine, beach",
             num_inference_steps=50, embedded_guidance=3.5, flex_control_image=control_image, seed=4)
image.save("image_2.jpg")
