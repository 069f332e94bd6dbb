import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
)

prompt = "a girl with silver hair in a blue dress, underwater, air bubbles, refraction, portrait"
for thresh in [None, 0.2, 0.4, 0.6, 0.8]:
    image = pipe(prompt=prompt, seed=0, num_inference_steps=50, tea_cache_l1_thresh=thresh)
    print(f"tea_cache_l1_thresh={thresh}: {pipe.last_cache_stats}")
    image.save(f"image_teacache_{thresh}.jpg")

# First-Block-Cache: skip a step when the first block's output barely changed.
image = pipe(prompt=prompt, seed=0, num_inference_steps=50, fbcache_thresh=0.08)
print(f"fbcache_thresh=0.08: {pipe.last_cache_stats}")
image.save("image_fbcache.jpg")
