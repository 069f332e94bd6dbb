import torch
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

image_1 = pipe(prompt="a beautiful Asian long-haired female college student.", embedded_guidance=2.5, seed=1)
image_1.save("image_1.jpg")

# Edit: the reference image is encoded at its own resolution and attended to by every block.
image_2 = pipe(prompt="transform the style to anime style.", kontext_images=image_1, embedded_guidance=2.5, seed=2)
image_2.save("image_2.jpg")

image_3 = pipe(prompt="let her smile.", kontext_images=image_1, embedded_guidance=2.5, seed=3)
image_3.save("image_3.jpg")

# Several references sit side by side (distinct positions). kontext_auto_resize=True would also resize each
# one to the Kontext training resolution closest to its aspect ratio (about one megapixel).
image_4 = pipe(prompt="the girl of the first picture in the style of the second.", kontext_images=[image_1, image_2],
               embedded_guidance=2.5, seed=4)
image_4.save("image_4.jpg")
