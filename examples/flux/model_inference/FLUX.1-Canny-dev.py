import torch
from PIL import Image, ImageFilter
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# FLUX.1-Canny-dev: the control image's latents are extra DiT input channels (argument: flux_control_image).
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Canny-dev", origin_file_pattern="flux1-canny-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)

# The control image is an edge map of any picture (a real canny annotator, e.g. OpenCV or controlnet_aux, is
# better; PIL's edge filter keeps this example dependency-free). A picture from the example dataset:
#   modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
picture = Image.open("data/example_image_dataset/1.jpg")
control_image = picture.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
image = pipe(prompt="a robot made of exotic candies and chocolates, studio light", flux_control_image=control_image,
             height=1024, width=1024, seed=1, embedded_guidance=30.0, num_inference_steps=50)
image.save("image_FLUX.1-Canny-dev.jpg")
