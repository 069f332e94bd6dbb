import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Weights stored on the CPU in fp8, computed layer by layer on the GPU in bf16: about 8 GB of VRAM.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
    ],
)
print(pipe.vram_plan(8))  # what stays on the GPU and what streams, before spending any VRAM
pipe.enable_vram_management()

image = pipe(prompt="a cat wearing a tiny wizard hat, studio photo", seed=0)
image.save("flux_low_vram.jpg")
