"""Extra prompt tokens: LoRA-Encoder (`lora_encoder_inputs`, `lora_encoder_scale`) and AttriCtrl value
controllers (`value_controller_inputs`). Both append tokens (text id 0) after the prompt's T5 tokens.

* LoRA-Encoder: each LoRA (a path, a ModelConfig or a list of them; any dialect `pipe.load_lora` reads)
  becomes one token, times `lora_encoder_scale`, on the positive side only. It is meant to be used with
  the same LoRA loaded into the DiT.
* Value controllers: one value in [0, 1] per loaded controller (None skips one), 32 tokens each, on both
  CFG sides.
"""
from __future__ import annotations

import os

import torch

from ...loading.lora import convert_lora, read_lora_file
from ...loading.model_config import ModelConfig
from ..units import step_unit, unit


def lora_paths(lora_encoder_inputs) -> list[str]:
    items = lora_encoder_inputs if isinstance(lora_encoder_inputs, (list, tuple)) else [lora_encoder_inputs]
    if not items:
        raise ValueError("lora_encoder_inputs is an empty list")
    out = []
    for item in items:
        if isinstance(item, ModelConfig):
            item = item.resolve()
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"lora_encoder_inputs takes LoRA paths or ModelConfigs, got {type(item).__name__}")
        out.append(str(item))
    return out


@unit(both_branches=True, models=("lora_encoder",), outputs=("lora_encoder_emb",), model_inputs=("lora_encoder_emb",))
def encode_loras(pipe, branches, lora_encoder_inputs=None, lora_encoder_scale=1.0, num_images=1):
    """(B, n_loras, width) tokens for the positive side."""
    if lora_encoder_inputs is None:
        return [{} for _ in branches]
    if pipe.lora_encoder is None:
        raise RuntimeError("lora_encoder_inputs needs the LoRA-Encoder: add ModelConfig(model_id="
                           "'DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev', origin_file_pattern='model.safetensors')")
    if not isinstance(lora_encoder_scale, (int, float)):
        raise TypeError(f"lora_encoder_scale must be a number, got {type(lora_encoder_scale).__name__}")
    tokens = []
    for path in lora_paths(lora_encoder_inputs):
        lora = convert_lora(*read_lora_file(path))
        if lora.unknown:
            raise ValueError(f"{path}: LoRA entries the encoder cannot place: {sorted(lora.unknown)[:5]}")
        tokens.append(pipe.lora_encoder(lora))                                                  # (1, 1, width)
    emb = (torch.cat(tokens, 1) * lora_encoder_scale).to(pipe.device, pipe.torch_dtype).repeat(num_images, 1, 1)
    return [{"lora_encoder_emb": emb}] + [{}] * (len(branches) - 1)


@unit(models=("value_controller",), outputs=("value_controller_emb",), model_inputs=("value_controller_emb",),
      batched=("value_controller_emb",))
def encode_values(pipe, value_controller_inputs=None, num_images=1):
    """(B, 32 * n_values, width) tokens, shared by both CFG sides."""
    if value_controller_inputs is None:
        return {}
    values = value_controller_inputs
    values = values if isinstance(values, (list, tuple)) else [values]
    controllers = list(pipe.value_controller)
    if len(values) != len(controllers):
        raise ValueError(f"value_controller_inputs has {len(values)} values for {len(controllers)} loaded value "
                         "controllers: give one per controller (None to skip one)")
    tokens = []
    for controller, value in zip(controllers, values):
        if value is None:
            continue
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"value_controller_inputs must be numbers in [0, 1], got {value!r}")
        tokens.append(controller(torch.tensor(float(value))))
    if not tokens:
        return {}
    emb = torch.cat(tokens, 0)[None].to(pipe.device, pipe.torch_dtype).repeat(num_images, 1, 1)
    return {"value_controller_emb": emb}


@step_unit(after=("apply_controlnets",))  # ControlNets read the prompt without the appended tokens
def append_prompt_tokens(models, call, step_index, lora_encoder_emb=None, value_controller_emb=None):
    extra = [t for t in (value_controller_emb, lora_encoder_emb) if t is not None]
    if not extra:
        return
    tokens = torch.cat([t.to(call.prompt_emb) for t in extra], 1)
    call.prompt_emb = torch.cat([call.prompt_emb, tokens], 1)
    call.text_ids = torch.cat([call.text_ids, call.text_ids.new_zeros(*tokens.shape[:2], 3)], 1)


UNITS = [encode_loras, encode_values, append_prompt_tokens]
