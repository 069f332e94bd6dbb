"""Edit an image with the DiT fully trained by full/FLUX.1-Kontext-dev.sh (run from the repository root).

The reference image: any local picture (e.g. one of data/example_image_dataset)."""
import torch
from PIL import Image
from diffsynth import load_state_dict
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Kontext-dev", origin_file_pattern="flux1-kontext-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)
pipe.dit.load_state_dict(load_state_dict("models/train/FLUX.1-Kontext-dev_full/epoch-0.safetensors"))
reference = Image.open("data/example_image_dataset/2.jpg").convert("RGB")
image = pipe(prompt="Make the dog turn its head around.", kontext_images=reference, embedded_guidance=2.5, seed=0)
image.save("image_FLUX.1-Kontext-dev_full.jpg")
