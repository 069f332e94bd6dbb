import torch
from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

# MultiAlign: a timestep LoRA for FLUX.1-dev (its features are scaled and shifted by functions of the timestep,
# so it is applied at every denoising step instead of being merged into the weights).
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
pipe.load_timestep_lora(
    ModelConfig(model_id="DiffSynth-Studio/MultiAlign-FLUX.1-dev", origin_file_pattern="adapter_model.safetensors"),
    alpha=2.0,
)

prompt = ("A rainy night market street: a red paper lantern on the left, a noodle stall with steam rising in the "
          "middle, a bicycle leaning against a blue door on the right, neon reflections on wet stones, and a "
          "wooden sign reading 'OPEN LATE'")
image = pipe(prompt=prompt, seed=0, num_inference_steps=30, t5_sequence_length=128)
image.save("FLUX.1-dev-Timestep-LoRA.jpg")
