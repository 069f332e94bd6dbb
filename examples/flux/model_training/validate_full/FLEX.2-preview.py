"""Generate with the DiT fully trained by full/FLEX.2-preview.sh (run from the repository root)."""
import torch
from diffsynth import load_state_dict
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="ostris/Flex.2-preview", origin_file_pattern="Flex.2-preview.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)
pipe.dit.load_state_dict(load_state_dict("models/train/FLEX.2-preview_full/epoch-0.safetensors"))
image = pipe(prompt="a dog", seed=0, embedded_guidance=3.5)
image.save("image_FLEX.2-preview_full.jpg")
