import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig
from PIL import Image, ImageDraw

# The masks of the examples (one white-on-black PNG per entity):
#   modelscope download --dataset DiffSynth-Studio/examples_in_diffsynth --include "data/examples/eligen/entity_control/*" --local_dir ./
MASK_DIR = "data/examples/eligen/entity_control"
NEGATIVE_PROMPT = "worst quality, low quality, monochrome, zombie, interlocked fingers, Aissist, cleavage, nsfw,"
COLORS = [(165, 238, 173), (76, 102, 221), (221, 160, 77), (204, 93, 71), (145, 187, 149), (134, 141, 172),
          (157, 137, 109), (153, 104, 95)]


def visualize_masks(image, masks, mask_prompts, output_path):
    """The image with each entity's mask tinted and labelled."""
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    for i, (mask, prompt) in enumerate(zip(masks, mask_prompts)):
        color = COLORS[i % len(COLORS)]
        alpha = mask.convert("L").resize(image.size, Image.NEAREST).point(lambda v: 80 if v > 127 else 0)
        layer = Image.new("RGBA", image.size, color + (0,))
        layer.putalpha(alpha)
        box = alpha.getbbox()
        if box is not None:
            ImageDraw.Draw(layer).text((box[0] + 10, box[1] + 10), prompt, fill=(255, 255, 255, 255))
        overlay = Image.alpha_composite(overlay, layer)
    result = Image.alpha_composite(image.convert("RGBA"), overlay)
    result.save(output_path)
    return result


def example(pipe, seeds, example_id, global_prompt, entity_prompts):
    masks = [Image.open(f"{MASK_DIR}/example_{example_id}/{i}.png").convert("RGB") for i in range(len(entity_prompts))]
    for seed in seeds:
        image = pipe(
            prompt=global_prompt,
            cfg_scale=3.0,
            negative_prompt=NEGATIVE_PROMPT,
            num_inference_steps=50,
            embedded_guidance=3.5,
            seed=seed,
            height=1024,
            width=1024,
            eligen_entity_prompts=entity_prompts,
            eligen_entity_masks=masks,
        )
        image.save(f"eligen_example_{example_id}_{seed}.png")
        visualize_masks(image, masks, entity_prompts, f"eligen_example_{example_id}_mask_{seed}.png")


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
pipe.load_lora(pipe.dit, ModelConfig(model_id="DiffSynth-Studio/Eligen", origin_file_pattern="model_bf16.safetensors"), alpha=1)

# example 1
global_prompt = "A breathtaking beauty of Raja Ampat by the late-night moonlight , one beautiful woman from behind wearing a pale blue long dress with soft glow, sitting at the top of a cliff looking towards the beach,pastell light colors, a group of small distant birds flying in far sky, a boat sailing on the sea, best quality, realistic, whimsical, fantastic, splash art, intricate detailed, hyperdetailed, maximalist style, photorealistic, concept art, sharp focus, harmony, serenity, tranquility, soft pastell colors,ambient occlusion, cozy ambient lighting, masterpiece, liiv1, linquivera, metix, mentixis, masterpiece, award winning, view from above\n"
entity_prompts = ["cliff", "sea", "moon", "sailing boat", "a seated beautiful woman", "pale blue long dress with soft glow"]
example(pipe, [0], 1, global_prompt, entity_prompts)

# example 4
global_prompt = "A beautiful girl wearing shirt and shorts in the street,  holding a sign 'Entity Control'"
entity_prompts = ["A beautiful girl", "sign 'Entity Control'", "shorts", "shirt"]
example(pipe, [21], 4, global_prompt, entity_prompts)
