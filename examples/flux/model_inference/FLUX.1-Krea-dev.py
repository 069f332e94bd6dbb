import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# FLUX.1-Krea-dev swaps only the DiT; text encoders and VAE come from FLUX.1-dev.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Krea-dev", origin_file_pattern="flux1-krea-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)
image = pipe(prompt="An beautiful woman is riding a bicycle in a park, wearing a red dress", seed=0, embedded_guidance=4.5)
image.save("flux_krea.jpg")
