import numpy as np
import torch
from PIL import Image, ImageFilter
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

image = pipe(prompt="portrait of a beautiful Asian girl, long hair, red t-shirt, sunshine, beach",
             num_inference_steps=50, embedded_guidance=3.5, seed=0)
image.save("image_1.jpg")

# In-painting: white = the region to repaint (the mask has the in-paint image's size).
mask = np.zeros((image.height, image.width, 3), dtype=np.uint8)
mask[image.height * 200 // 1024:image.height * 400 // 1024, image.width * 400 // 1024:image.width * 700 // 1024] = 255
mask = Image.fromarray(mask)
mask.save("image_mask.jpg")
image = pipe(prompt="portrait of a beautiful Asian girl with sunglasses, long hair, red t-shirt, sunshine, beach",
             num_inference_steps=50, embedded_guidance=3.5, flex_inpaint_image=image, flex_inpaint_mask=mask, seed=4)
image.save("image_2.jpg")

# Structural control from an edge map (any canny/depth/pose annotator works; PIL's edge filter here), used
# during the first half of the steps (flex_control_stop=0.5) at strength 0.5.
control_image = image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
control_image.save("image_control.jpg")
image = pipe(prompt="portrait of a beautiful Asian girl with sunglasses, long hair, yellow t-shirt, sunshine, beach",
             num_inference_steps=50, embedded_guidance=3.5, flex_control_image=control_image,
             flex_control_strength=0.5, flex_control_stop=0.5, seed=4)
image.save("image_3.jpg")
