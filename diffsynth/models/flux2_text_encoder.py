"""FLUX.2 [klein]'s prompt encoder: transformers' Qwen3 language model, read as three of its hidden states.

The release ships `text_encoder/` (Qwen3ForCausalLM shards, `model.*` keys, config.json) and `tokenizer/`.
The prompt goes through the chat template as one user message with the assistant's turn opened and
thinking switched off, is padded (right) to 512 tokens, and runs with the padding masked; the hidden
states after layers 9, 18 and 27 are concatenated per token: (B, 512, 3 * hidden) = the DiT's context.

The weights are adopted without a copy (meta-device model, tensors assigned in their storage dtype);
`lm_head` is not needed and dropped. Without a config.json (a ComfyUI `qwen_3_4b.safetensors`) the
architecture is read from the tensor shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..ops.files import CheckpointError
from .hf_adopt import adopt_weights
from .entry import BuildOptions, Component, Detected, Family, fills, plain_tensors

HIDDEN_STATE_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512
# Qwen3's values for what the tensors do not show.
_QWEN3_DEFAULTS = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960, hidden_act="silu",
                       attention_bias=False, tie_word_embeddings=True)


def is_qwen3_state(keys) -> bool:
    """Qwen3 (not Qwen2/2.5: those have no per-head q/k norms), text only, keys without the `model.` level."""
    return "embed_tokens.weight" in keys and "layers.0.self_attn.q_norm.weight" in keys and \
        "layers.0.mlp.gate_proj.weight" in keys and not any(k.startswith("visual.") for k in keys)


def infer_qwen3_config(shapes: Mapping[str, Sequence[int]]) -> dict:
    """A Qwen3 config.json's architecture fields from tensor shapes (keys without `model.`)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    layers = 0
    while f"layers.{layers}.self_attn.q_proj.weight" in shapes:
        layers += 1
    return {**_QWEN3_DEFAULTS, "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden,
            "head_dim": head_dim, "num_hidden_layers": layers,
            "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0]}


def load_qwen3(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping | None, source: str = "Qwen3"):
    """transformers' Qwen3Model adopting `state_dict` (keys without `model.`; `lm_head.*` ignored)."""
    from accelerate import init_empty_weights
    from transformers import Qwen3Config, Qwen3Model
    sd = {k: t for k, t in state_dict.items() if not k.startswith("lm_head.")}
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    config = Qwen3Config.from_dict(dict(config_dict) if config_dict is not None else infer_qwen3_config(shapes))
    config._attn_implementation = "sdpa"
    needed = max(HIDDEN_STATE_LAYERS)
    if config.num_hidden_layers < needed:
        raise CheckpointError(f"{source}: FLUX.2 reads the hidden state after layer {needed}, this Qwen3 has "
                              f"{config.num_hidden_layers} layers")
    with init_empty_weights(include_buffers=False):
        model = Qwen3Model(config)
    return adopt_weights(model, sd, source, "the Qwen3 config")


def load_qwen3_tokenizer(folder: str | Path):
    """The Qwen tokenizer of a `tokenizer/` folder (tokenizer.json or vocab.json + merges.txt, with the chat
    template in tokenizer_config.json or chat_template.jinja)."""
    from transformers import AutoTokenizer
    folder = Path(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise FileNotFoundError(f"{str(folder)!r} is not a Qwen tokenizer folder: no tokenizer.json or vocab.json")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise FileNotFoundError(f"the tokenizer in {str(folder)!r} has no chat template (FLUX.2 formats its prompt "
                                "as a chat message): expected it in tokenizer_config.json or chat_template.jinja")
    return tokenizer


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as one user message, the assistant's turn opened, thinking off."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def encode_prompt_qwen3(tokenizer, model, prompts: Sequence[str], device: torch.device | str,
                        max_length: int = MAX_SEQUENCE_LENGTH,
                        layers: Sequence[int] = HIDDEN_STATE_LAYERS) -> torch.Tensor:
    """(B, max_length, len(layers) * hidden): the hidden states after `layers`, side by side per token."""
    batch = tokenizer([chat_text(tokenizer, p) for p in prompts], return_tensors="pt", padding="max_length",
                      truncation=True, max_length=max_length)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[k] for k in layers], dim=-1)


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """Qwen3 language model (FLUX.2 [klein]'s text encoder), keys without the `model.` level."""
    return "hf" if is_qwen3_state(refs.keys()) else None


def build(det: Detected, options: BuildOptions) -> dict:
    model = load_qwen3(plain_tensors(det, options), det.config, f"Qwen3 from {det.source}")
    return {"text_encoder_qwen3": model.to(options.device)}


COMPONENTS = (Component("text_encoder_qwen3", "text", activation="text"),)
FAMILIES = (Family("qwen3", "Qwen3 text encoder (FLUX.2 [klein])", detect, fills("text_encoder_qwen3"), build,
                   low_precision_storage=True, pipeline="flux2"),)
