import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Weights stored on the CPU in fp8, computed layer by layer on the GPU in bf16.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Kontext-dev", origin_file_pattern="flux1-kontext-dev.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
    ],
)
pipe.enable_vram_management()

image_1 = pipe(prompt="a beautiful Asian long-haired female college student.", embedded_guidance=2.5, seed=1)
image_1.save("image_1.jpg")

image_2 = pipe(prompt="transform the style to anime style.", kontext_images=image_1, embedded_guidance=2.5, seed=2)
image_2.save("image_2.jpg")
