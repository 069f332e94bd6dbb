import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Nexus-Gen generation: 81 image embeddings from the autoregressive model, through the generation adapter, into
# the fine-tuned DiT of generation_decoder.bin (CLIP still gives the pooled vector).
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="model*.safetensors"),
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="generation_decoder.bin"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ],
    # the processor files (tokenizer, image processor, chat template); without it: beside the weights
    nexus_gen_processor_config=ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="processor/"),
)

image = pipe(
    prompt="A cute cat sitting on a wooden table, watercolor style.", negative_prompt="",
    seed=0, cfg_scale=1.0, num_inference_steps=50,
    height=512, width=512,
)
image.save("NexusGen-Generation.jpg")
