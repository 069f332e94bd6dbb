import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Nexus-Gen editing: its autoregressive Qwen2.5-VL (any installed transformers) "draws" the edit as 81 image
# embeddings, merged with the reference image's and decoded by the fine-tuned DiT in edit_decoder.bin.
# The input image: e.g. modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="model*.safetensors"),
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="edit_decoder.bin"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
    # the processor files (tokenizer, image processor, chat template); without it: beside the weights
    nexus_gen_processor_config=ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="processor/"),
)

ref_image = Image.open("data/example_image_dataset/nexus_gen/image_1.png").convert("RGB")
image = pipe(
    prompt="Add a pair of sunglasses.", negative_prompt="",
    seed=0, cfg_scale=1.0, num_inference_steps=50,
    nexus_gen_reference_image=ref_image,
    height=512, width=512,
)
image.save("NexusGen-Edit.jpg")
