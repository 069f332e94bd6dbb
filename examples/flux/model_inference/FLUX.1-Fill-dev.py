import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="flux1-fill-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)

# Any picture and a mask of its size (mode "L", white = repaint). The seed system's example pair:
#   modelscope download --dataset HuanJue/example_dataset --include "FLUX.1-Fill-dev/*" --local_dir ./
flux_fill_image = Image.open("FLUX.1-Fill-dev/cup.png").convert("RGB")
flux_fill_mask = Image.open("FLUX.1-Fill-dev/cup_mask.png").convert("L")
image = pipe(prompt="a white paper cup", flux_fill_image=flux_fill_image, flux_fill_mask=flux_fill_mask,
             height=1632, width=1232, seed=0, embedded_guidance=30.0, num_inference_steps=50)
image.save("image_FLUX.1-Fill-dev.jpg")
