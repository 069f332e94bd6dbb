import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# FLUX.1-Krea-dev swaps only the DiT; text encoders and VAE come from FLUX.1-dev.
# Weights stored on the CPU in fp8, computed layer by layer on the GPU in bf16: about 8 GB of VRAM.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Krea-dev", origin_file_pattern="flux1-krea-dev.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", offload_device="cpu", offload_dtype=torch.float8_e4m3fn),
    ],
)
pipe.enable_vram_management()

image = pipe(prompt="An beautiful woman is riding a bicycle in a park, wearing a red dress", seed=0, embedded_guidance=4.5)
image.save("flux_krea_low_vram.jpg")
