import torch
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig


# FLUX.2-klein-base-4B is the undistilled base model: 50 steps with true classifier-free guidance (cfg_scale).
# The base model ships only its transformer; text encoder, VAE and tokenizer come from FLUX.2-klein-4B.
# Low VRAM: the text encoder and the transformer are read into CPU RAM in fp8 and computed in bf16 on the
# GPU layer by layer; whatever fits under vram_limit stays on the GPU.
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
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="text_encoder/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-base-4B", origin_file_pattern="transformer/*.safetensors", **vram_config),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ],
    tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="tokenizer/"),
    vram_limit=torch.cuda.mem_get_info("cuda")[1] / (1024 ** 3) - 0.5,
)

prompt = "A watercolor fox curled up asleep in a field of lavender at dusk, soft light."
image = pipe(prompt, seed=0, rand_device="cuda", num_inference_steps=50, cfg_scale=4)
image.save("image_FLUX.2-klein-base-4B.jpg")

# Editing: the image just made is the reference; the prompt says what to change.
prompt = "Make it winter: snow on the ground and on the fox's fur"
image = pipe(prompt, edit_image=[image], seed=1, rand_device="cuda", num_inference_steps=50, cfg_scale=4)
image.save("image_edit_FLUX.2-klein-base-4B.jpg")
