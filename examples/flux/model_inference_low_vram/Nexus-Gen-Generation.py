import torch
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Every model stored on the CPU in fp8 and computed layer by layer on the GPU in bf16: the 7B autoregressive model
# writes the 81 image embeddings first, then the generation decoder's DiT denoises.
offload = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="model*.safetensors", **offload),
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="generation_decoder.bin", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", **offload),
    ],
    nexus_gen_processor_config=ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="processor/"),
)
pipe.enable_vram_management()

image = pipe(
    prompt="A cute cat sitting on a wooden table, watercolor style.", negative_prompt="",
    seed=0, cfg_scale=1.0, num_inference_steps=50,
    height=1024, width=1024,
)
image.save("NexusGen-Generation_low_vram.jpg")
