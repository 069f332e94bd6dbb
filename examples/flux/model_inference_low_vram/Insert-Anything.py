import torch
from PIL import Image
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

# Insert-Anything with every model stored on the CPU in fp8 and computed layer by layer on the GPU in bf16.
offload = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="flux1-fill-dev.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="text_encoder/model.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="text_encoder_2/*.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Fill-dev", origin_file_pattern="ae.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_encoder/model.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_embedder/diffusion_pytorch_model.safetensors", **offload),
    ],
)
# hot-loaded: the fp8-stored DiT keeps its weights, the LoRA computes beside them
pipe.load_lora(pipe.dit, ModelConfig(model_id="HuanJue/Insert-Anything", origin_file_pattern="20250321_steps5000_pytorch_lora_weights.safetensors"), hotload=True)
pipe.enable_vram_management()

# The example photos: modelscope download --dataset HuanJue/example_dataset --include "Insert-Anything/*" --local_dir ./
image = pipe(
    insert_anything_source_image=Image.open("Insert-Anything/source_image.png").convert("RGB"),
    insert_anything_source_mask=Image.open("Insert-Anything/source_mask.png").convert("L"),
    insert_anything_ref_image=Image.open("Insert-Anything/ref_image.png").convert("RGB"),
    insert_anything_ref_mask=Image.open("Insert-Anything/ref_mask.png").convert("L"),
    seed=666, embedded_guidance=30.0, num_inference_steps=50,
)
image.save("image_Insert-Anything_low_vram.jpg")
