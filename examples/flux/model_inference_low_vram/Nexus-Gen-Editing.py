import torch
from PIL import Image
from diffsynth.pipelines.flux_image_new import FluxImagePipeline, ModelConfig

# Every model stored on the CPU in fp8 and computed layer by layer on the GPU in bf16: the 7B autoregressive model
# runs first, then the DiT denoises.
# The input image: e.g. modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
offload = dict(offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
pipe = FluxImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="model*.safetensors", **offload),
        ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="edit_decoder.bin", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/", **offload),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors", **offload),
    ],
    # the processor files (tokenizer, image processor, chat template); without it: beside the weights
    nexus_gen_processor_config=ModelConfig(model_id="DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="processor/"),
)
pipe.enable_vram_management()

ref_image = Image.open("data/example_image_dataset/nexus_gen/image_1.png").convert("RGB")
image = pipe(
    prompt="Add a pair of sunglasses.", negative_prompt="",
    seed=0, cfg_scale=1.0, num_inference_steps=50,
    nexus_gen_reference_image=ref_image,
    height=512, width=512,
)
image.save("NexusGen-Edit_low_vram.jpg")
