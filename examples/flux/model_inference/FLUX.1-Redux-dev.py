import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# FLUX.1-dev plus FLUX.1-Redux-dev's SigLIP image encoder and Redux embedder: variations of an image.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_embedder/diffusion_pytorch_model.safetensors"),
    ],
)

# Any picture; the seed system's example one:
#   modelscope download --dataset HuanJue/example_dataset --include "FLUX.1-Redux-dev/*" --local_dir ./
flux_redux_image = Image.open("FLUX.1-Redux-dev/robot.png").convert("RGB")

image = pipe(flux_redux_image=flux_redux_image, embedded_guidance=2.5, num_inference_steps=50, seed=0)
image.save("image_FLUX.1-Redux-dev.jpg")

# A prompt steers the variation; its T5 tokens come first, the image's after them.
image = pipe(prompt="in watercolor", flux_redux_image=flux_redux_image, embedded_guidance=2.5, num_inference_steps=50, seed=0)
image.save("image_FLUX.1-Redux-dev_prompt.jpg")
