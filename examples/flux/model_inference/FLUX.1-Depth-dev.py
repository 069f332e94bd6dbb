import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# FLUX.1-Depth-dev: the control image's latents are extra DiT input channels (argument: flux_control_image).
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Depth-dev", origin_file_pattern="flux1-depth-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)

# The control image is a depth map (white = near) of the scene, from any depth estimator, e.g.
#   controlnet_aux: MidasDetector.from_pretrained("lllyasviel/Annotators")(picture), or Depth-Anything.
control_image = Image.open("depth.png").convert("RGB")
image = pipe(prompt="a robot made of exotic candies and chocolates, studio light", flux_control_image=control_image,
             height=1024, width=1024, seed=1, embedded_guidance=10.0, num_inference_steps=50)
image.save("image_FLUX.1-Depth-dev.jpg")
