import torch
from PIL import Image
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig


# FLUX.2-dev on a 16-24 GB GPU: the text encoder (Mistral-Small-3, read up to layer 31) and the 32B DiT are
# read into CPU RAM in fp8 (~18 GB + ~30 GB: 64 GB of RAM or more) and computed in bf16 on the GPU layer by
# layer; whatever fits under vram_limit stays on the GPU. `python benchmarks/vram_plan.py` prints the plans.
vram_config = {
    "offload_dtype": "disk",
    "offload_device": "disk",
    "onload_dtype": torch.float8_e4m3fn,
    "onload_device": "cpu",
    "preparing_dtype": torch.float8_e4m3fn,
    "preparing_device": "cuda",
    "computation_dtype": torch.bfloat16,
    "computation_device": "cuda",
}
pipe = Flux2ImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="text_encoder/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="transformer/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="tokenizer/"),
    vram_limit=torch.cuda.mem_get_info("cuda")[1] / (1024 ** 3) - 0.5,
)

prompt = ("High resolution. An underwater portrait of a calm young woman in a flowing blue dress, her hair "
          "drifting around her face, light shimmering through the water, small bubbles rising.")
image = pipe(prompt, seed=42, rand_device="cuda", num_inference_steps=50)
image.save("image_FLUX.2-dev.jpg")

# Editing: the image just made is the reference; the prompt says what to change.
prompt = "Turn the photograph into a Japanese anime illustration"
edit_image = [Image.open("image_FLUX.2-dev.jpg")]
image = pipe(prompt, seed=42, rand_device="cuda", edit_image=edit_image, num_inference_steps=50, embedded_guidance=2.5)
image.save("image_edit_FLUX.2-dev.jpg")
