import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Weights stored on the CPU in fp8, computed layer by layer on the GPU in bf16.
fp8 = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors", **fp8),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", **fp8),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", **fp8),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", **fp8),
        ModelConfig(model_id="InstantX/FLUX.1-dev-IP-Adapter", origin_file_pattern="ip-adapter.bin", **fp8),
        ModelConfig(model_id="google/siglip-so400m-patch14-384", origin_file_pattern="model.safetensors", **fp8),
    ],
)
pipe.enable_vram_management()

origin_prompt = "a rabbit in a garden, colorful flowers"
image = pipe(prompt=origin_prompt, height=1280, width=960, seed=42)
image.save("style image.jpg")

image = pipe(prompt="A piggy", height=1280, width=960, seed=42,
             ipadapter_images=[image], ipadapter_scale=0.7)
image.save("A piggy.jpg")
