import torch
from PIL import Image
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

# Insert-Anything: the object of a reference photo (where its mask is white) is inserted where the source mask is
# white. FLUX.1-Fill completes a diptych [reference | source crop], FLUX.1-Redux sees the reference, the
# Insert-Anything LoRA ties them; the result is the whole source photo with the object in place.
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="flux1-fill-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="text_encoder_2/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="ae.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_embedder/diffusion_pytorch_model.safetensors"),
    ],
)
pipe.load_lora(pipe.dit, ModelConfig(model_id="HuanJue/Insert-Anything", origin_file_pattern="20250321_steps5000_pytorch_lora_weights.safetensors"))

# The example photos: modelscope download --dataset HuanJue/example_dataset --include "Insert-Anything/*" --local_dir ./
image = pipe(
    insert_anything_source_image=Image.open("Insert-Anything/source_image.png").convert("RGB"),
    insert_anything_source_mask=Image.open("Insert-Anything/source_mask.png").convert("L"),
    insert_anything_ref_image=Image.open("Insert-Anything/ref_image.png").convert("RGB"),
    insert_anything_ref_mask=Image.open("Insert-Anything/ref_mask.png").convert("L"),
    seed=666, embedded_guidance=30.0, num_inference_steps=50,
)
image.save("image_Insert-Anything.jpg")
