import torch
from PIL import Image
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig


# FLUX.2-dev: a 32B DiT with a guidance embedder (`embedded_guidance`, no classifier-free guidance) and the
# Mistral-Small-3 text encoder (its language model; the prompt follows BFL's system message). 50 steps.
# The models wait in CPU RAM in bf16 and move to the GPU while they run (a GPU with room for the 64 GB DiT);
# smaller GPUs: model_inference_low_vram/FLUX.2-dev.py.
vram_config = {
    "offload_dtype": torch.bfloat16,
    "offload_device": "cpu",
    "onload_dtype": torch.bfloat16,
    "onload_device": "cuda",
    "preparing_dtype": torch.bfloat16,
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
        ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", **vram_config),
    ],
    tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-dev", origin_file_pattern="tokenizer/"),
)

prompt = ("A macro photograph of a hermit crab that has made an old tin can its shell, on wet sand at golden hour; "
          "the can reads `DIFFSYNTH` in faded red letters, waves blurred behind.")
image = pipe(prompt, seed=42, rand_device="cuda", num_inference_steps=50)
image.save("image_FLUX.2-dev.jpg")

# Editing: the image just made is the reference; the prompt says what to change.
prompt = "Turn the photograph into a Japanese anime illustration"
edit_image = [Image.open("image_FLUX.2-dev.jpg")]
image = pipe(prompt, seed=42, rand_device="cuda", edit_image=edit_image, num_inference_steps=50, embedded_guidance=2.5)
image.save("image_edit_FLUX.2-dev.jpg")
