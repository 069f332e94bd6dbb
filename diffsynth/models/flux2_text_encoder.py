"""FLUX.2's prompt encoders: a decoder language model read as three of its hidden states.

Both run the same path: the prompt becomes a chat (`PromptFormat`), the chat template renders it, the
text is padded (right) to 512 tokens and runs with the padding masked; the hidden states after three
layers are concatenated per token: (B, 512, 3 * hidden) = the DiT's context (all 512 positions, unmasked).

* [klein]: Qwen3 (`text_encoder/`: Qwen3ForCausalLM shards, `model.*` keys). One user message, the
  assistant's turn opened, thinking switched off; layers 9, 18, 27 (the 28th to 36th are never read).
* [dev]: Mistral-Small-3.x (`text_encoder/`: Mistral3ForConditionalGeneration shards). BFL's system
  message, then the user message as a text block; layers 10, 20, 30. Only the language model is read: the
  Pixtral vision tower, its projector, the LM head, the final norm and layers 31-40 (the 31st on) are set
  aside by name: their output is never used (10 of Mistral-Small's 40 layers, ~5.6B parameters).
  ComfyUI's single files hold the language model alone (`model.*`), whole or cut after layer 30; llama.cpp's
  GGUF conversions use its own names and rotary row order, and load dequantized.
  The tokenizer folder is a PixtralProcessor's; its text tokenizer alone is read (no torchvision).

The model is our `DecoderLM` (decoder_lm.py: transformers' parameter names and numbers, no transformers import),
built with only the layers before the last state read: later layers, the final norm and the LM head are never
read from the file. The weights are adopted without a copy (meta-device model, tensors assigned in their storage
dtype). Without a config.json (a single file) the architecture is read from the tensor shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..ops.files import CheckpointError
from ..ops.gguf import dequantize, is_quantized
from .chat_tokenizers import ChatTokenizer, load_chat_tokenizer
from .decoder_lm import DecoderConfig, DecoderLM
from .entry import BuildOptions, Component, Detected, Family, fills, plain_tensors
from .hf_adopt import adopt_weights

MAX_SEQUENCE_LENGTH = 512

# diffusers' Flux2Pipeline SYSTEM_MESSAGE (BFL's flux2 repository), newline included: DiffSynth-Studio 2.0 writes
# a space there, which changes the prompt tokens and the image.
MISTRAL_SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing "
                          "on object relationships, object\nattribution and actions without speculation.")


@dataclass(frozen=True)
class PromptFormat:
    """How one FLUX.2 text encoder reads a prompt."""
    layers: tuple[int, ...]                 # hidden states concatenated per token (0 = the embeddings)
    system_message: str | None = None       # a system turn before the prompt
    content_blocks: bool = False            # message content as [{"type": "text", ...}] (multimodal templates)
    template_args: tuple[tuple[str, object], ...] = ()  # extra chat-template variables
    removed: tuple[str, ...] = ()           # strings taken out of the prompt (the image placeholder)

    def messages(self, prompt: str) -> list[dict]:
        for text in self.removed:
            prompt = prompt.replace(text, "")
        wrap = (lambda t: [{"type": "text", "text": t}]) if self.content_blocks else (lambda t: t)  # noqa: E731
        system = [{"role": "system", "content": wrap(self.system_message)}] if self.system_message is not None else []
        return system + [{"role": "user", "content": wrap(prompt)}]


QWEN3_FORMAT = PromptFormat(layers=(9, 18, 27),
                            template_args=(("add_generation_prompt", True), ("enable_thinking", False)))
# (Pixtral's processor refuses a prompt whose [IMG] count changes under truncation: diffusers removes them)
MISTRAL_FORMAT = PromptFormat(layers=(10, 20, 30), system_message=MISTRAL_SYSTEM_MESSAGE, content_blocks=True,
                              template_args=(("add_generation_prompt", False),), removed=("[IMG]",))


# ----------------------------------------------------------------------------- the shared path

def load_tokenizer(folder: str | Path) -> ChatTokenizer:
    """The text tokenizer of a `tokenizer/` folder (tokenizer.json, or vocab.json + merges.txt), with its chat
    template (tokenizer_config.json or chat_template.jinja/.json), read as transformers' AutoTokenizer reads it
    (chat_tokenizers.py: same ids, no transformers import). A PixtralProcessor folder reads the same way: its
    image processor is not loaded, FLUX.2 feeds the encoder text only."""
    return load_chat_tokenizer(folder)


def chat_text(tokenizer: ChatTokenizer, prompt: str, fmt: PromptFormat = QWEN3_FORMAT) -> str:
    """The prompt rendered by the chat template as `fmt` formats it."""
    return tokenizer.chat_text(fmt.messages(prompt), **dict(fmt.template_args))


def tokenize_chat(tokenizer: ChatTokenizer, prompts: Sequence[str], fmt: PromptFormat,
                  max_length: int = MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, max_length), padded on the right. A template that writes the BOS itself
    (Mistral's) gets no second one from the tokenizer, as transformers' processors decide."""
    texts = [chat_text(tokenizer, p, fmt) for p in prompts]
    bos = tokenizer.bos_token
    return tokenizer(texts, max_length, add_special_tokens=not (bos and texts[0].startswith(bos)))


def encode_prompt(tokenizer: ChatTokenizer, model: DecoderLM, prompts: Sequence[str], device: torch.device | str,
                  fmt: PromptFormat, max_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """(B, max_length, len(fmt.layers) * hidden): the hidden states after `fmt.layers`, side by side per token."""
    ids, mask = tokenize_chat(tokenizer, prompts, fmt, max_length)
    return torch.cat(model(ids.to(device), mask.to(device), fmt.layers), dim=-1)


def _build(config: Mapping, sd: Mapping[str, torch.Tensor], fmt: PromptFormat, qk_norm: bool, source: str,
           name: str) -> DecoderLM:
    """Our DecoderLM with the layers `fmt` runs (the first max(fmt.layers)), built empty, adopting the entries of
    `sd` that `fmt` reads (later layers, the final norm and an LM head are left out)."""
    sd = {k: t for k, t in sd.items() if read_by(fmt, k)}
    config = DecoderConfig.from_dict(config, qk_norm=qk_norm)
    needed = max(fmt.layers)
    if config.num_hidden_layers < needed:
        raise CheckpointError(f"{source}: FLUX.2 reads the hidden state after layer {needed}, this {name} has "
                              f"{config.num_hidden_layers} layers")
    with torch.device("meta"):
        model = DecoderLM(replace(config, num_hidden_layers=needed))
    return adopt_weights(model, sd, source, f"the {name} config")


def read_by(fmt: PromptFormat, key: str) -> bool:
    """Whether `fmt` reads anything computed by this language-model entry: the layers before the last state read.
    Later layers, the final norm and the LM head never load (their bytes are not even read)."""
    if key.startswith(("norm.", "lm_head.")):
        return False
    return not key.startswith("layers.") or int(key.split(".", 2)[1]) < max(fmt.layers)


def _num_layers(shapes: Mapping[str, Sequence[int]]) -> int:
    n = 0
    while f"layers.{n}.self_attn.q_proj.weight" in shapes:
        n += 1
    return n


# ----------------------------------------------------------------------------- llama.cpp's GGUF conversions

# llama.cpp's tensor names -> transformers' (both encoders); `output.*` (the LM head) is never used.
GGUF_NAMES = {"token_embd.": "embed_tokens.", "output_norm.": "norm.", "attn_norm.": "input_layernorm.",
              "attn_q.": "self_attn.q_proj.", "attn_k.": "self_attn.k_proj.", "attn_v.": "self_attn.v_proj.",
              "attn_output.": "self_attn.o_proj.", "attn_q_norm.": "self_attn.q_norm.",
              "attn_k_norm.": "self_attn.k_norm.", "ffn_norm.": "post_attention_layernorm.",
              "ffn_gate.": "mlp.gate_proj.", "ffn_up.": "mlp.up_proj.", "ffn_down.": "mlp.down_proj."}


def _gguf_to_hf(key: str) -> str:
    layer, rest = ("", key) if not key.startswith("blk.") else (f"layers.{key.split('.')[1]}.", key.split(".", 2)[2])
    for gguf_name, hf_name in GGUF_NAMES.items():
        if rest.startswith(gguf_name):
            return layer + hf_name + rest[len(gguf_name):]
    return key  # (unknown: kept, so that loading names it)


def is_gguf_llm(refs) -> bool:
    return "token_embd.weight" in refs and "blk.0.attn_q.weight" in refs


def hf_names(refs: Mapping) -> dict:
    """A llama.cpp conversion's entries under transformers' names (others returned as they are)."""
    if not is_gguf_llm(refs):
        return dict(refs)
    return {_gguf_to_hf(k): r for k, r in refs.items() if not k.startswith("output.")}


def dequantized(sd: dict[str, torch.Tensor], refs: Mapping, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """GGUF blocks in `sd` dequantized into `dtype` (float32 if None); plain tensors as they are."""
    return {k: dequantize(t, refs[k].extra, torch.float32).reshape(refs[k].shape).to(dtype or torch.float32)
            if is_quantized(refs[k].extra) else t for k, t in sd.items()}


def rotate_half_rows(sd: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """q/k projection rows put back in rotate-half order: llama.cpp's converter interleaves each head's two halves
    for its rotary kernel in Llama-type models (Mistral), not in Qwen's."""
    def fix(t):
        rows, cols = t.shape
        return t.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return {k: fix(t) if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) else t
            for k, t in sd.items()}


def plain_language_model(det: Detected, options: BuildOptions, rotary_head_dim: int | None = None) -> dict:
    """The tensors of a detected language model, GGUF ones dequantized (and, given `rotary_head_dim`, their q/k
    rows reordered)."""
    sd = plain_tensors(det, options)
    if det.format != "gguf":
        return sd
    sd = dequantized(sd, det.refs, options.dtype)
    return rotate_half_rows(sd, rotary_head_dim) if rotary_head_dim else sd


# ----------------------------------------------------------------------------- Qwen3 ([klein])

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
    return {**_QWEN3_DEFAULTS, "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden,
            "head_dim": head_dim, "num_hidden_layers": _num_layers(shapes),
            "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0]}


def qwen3_language_model(refs: Mapping) -> dict:
    """A Qwen3 file's entries under transformers' names (llama.cpp names translated), without what FLUX.2 never
    reads (Qwen3-4B/8B have 36 layers; [klein] reads the state after 27, so 9 are skipped: ~1.8 / 3.5 GB of bf16)."""
    return {k: v for k, v in hf_names(refs).items() if read_by(QWEN3_FORMAT, k)}


def load_qwen3(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping | None, source: str = "Qwen3") -> DecoderLM:
    """The Qwen3 language model adopting `state_dict` (keys without `model.`), with only the layers FLUX.2 runs."""
    shapes = {k: t.shape for k, t in state_dict.items()}
    config = dict(config_dict) if config_dict is not None else infer_qwen3_config(shapes)
    return _build(config, state_dict, QWEN3_FORMAT, True, source, "Qwen3")


# ----------------------------------------------------------------------------- Mistral-Small-3.x ([dev])

# Where Mistral3ForConditionalGeneration keeps its language model: transformers 5 / 4.52+ save it under
# `model.language_model.`, earlier versions (and the FLUX.2-dev release) under `language_model.model.`.
MISTRAL3_LM_PREFIXES = ("model.language_model.", "language_model.model.")
# What a Mistral3 file also holds and FLUX.2 does not use: the Pixtral vision tower, its projector, the LM head.
MISTRAL3_UNUSED = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.",
                   "lm_head.", "language_model.lm_head.")
# Mistral-Small-3's Tekken vocabulary: what tells its language model saved alone (ComfyUI's
# `mistral_3_small_flux2_*.safetensors`: `model.*` keys) from other decoders of the same design (Llama).
MISTRAL_VOCAB = 131072
# Mistral-Small-3.1/3.2's values for what the tensors do not show (head_dim among them: no per-head norm).
_MISTRAL_DEFAULTS = dict(model_type="mistral", head_dim=128, rope_theta=1_000_000_000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, hidden_act="silu", sliding_window=None,
                         tie_word_embeddings=False)


def _mistral_decoder_at(keys, p: str) -> bool:
    """A Mistral decoder (no per-head norms, no attention biases) under prefix `p`."""
    return f"{p}embed_tokens.weight" in keys and f"{p}layers.0.self_attn.q_proj.weight" in keys and \
        f"{p}layers.0.self_attn.q_norm.weight" not in keys and f"{p}layers.0.self_attn.q_proj.bias" not in keys


def mistral3_prefix(keys) -> str | None:
    """The language-model prefix of a Mistral3ForConditionalGeneration state dict, or None."""
    return next((p for p in MISTRAL3_LM_PREFIXES if _mistral_decoder_at(keys, p)), None)


def mistral3_language_model(refs: Mapping) -> dict:
    """The language model's entries under transformers' names (prefix removed, llama.cpp names translated), the
    unused parts (vision tower, projector, LM head, late layers) dropped by name, anything else kept as it is so
    that loading refuses it."""
    refs = hf_names(refs)
    p = mistral3_prefix(refs.keys()) or ""  # ("": the language model alone, ComfyUI's layout)
    kept = {(k[len(p):] if k.startswith(p) else k): v for k, v in refs.items() if not k.startswith(MISTRAL3_UNUSED)}
    return {k: v for k, v in kept.items() if read_by(MISTRAL_FORMAT, k)}


def infer_mistral_config(shapes: Mapping[str, Sequence[int]], source: str = "Mistral") -> dict:
    """A Mistral text config from tensor shapes (language-model keys), Mistral-Small-3's head_dim assumed."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = _MISTRAL_DEFAULTS["head_dim"]
    widths = (shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0])
    if any(w % head_dim for w in widths):
        raise CheckpointError(f"{source}: no config.json, and the attention widths {widths} are not multiples of "
                              f"Mistral-Small-3's head_dim {head_dim}: put the model's config.json beside the file")
    return {**_MISTRAL_DEFAULTS, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": _num_layers(shapes),
            "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
            "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
            "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0]}


def mistral_text_config(config_dict: Mapping | None, shapes: Mapping[str, Sequence[int]], source: str) -> dict:
    """The language model's config: the Mistral3 config.json's `text_config` (or a Mistral config.json), else
    read from the tensor shapes (language-model keys)."""
    if config_dict is None:
        return infer_mistral_config(shapes, source)
    return dict(config_dict.get("text_config", config_dict))


def load_mistral(state_dict: Mapping[str, torch.Tensor], config: dict, source: str = "Mistral") -> DecoderLM:
    """The language model of a Mistral3 checkpoint adopting `state_dict` (keys without the prefix), with only the
    layers FLUX.2 runs. `config`: the language model's (`mistral_text_config`)."""
    return _build({**config, "model_type": "mistral"}, state_dict, MISTRAL_FORMAT, False, source, "Mistral")


# ----------------------------------------------------------------------------- table entry

def detect_qwen3(refs) -> str | None:
    """Qwen3 language model (FLUX.2 [klein]'s text encoder), keys without the `model.` level ("hf"), or llama.cpp's
    conversion of it ("gguf": per-head q/k norms, no attention biases)."""
    if is_qwen3_state(refs.keys()):
        return "hf"
    return "gguf" if is_gguf_llm(refs) and "blk.0.attn_q_norm.weight" in refs and "blk.0.attn_q.bias" not in refs \
        else None


def detect_mistral3(refs) -> str | None:
    """FLUX.2 [dev]'s text encoder: Mistral3ForConditionalGeneration ("hf": a Mistral decoder under the
    language-model prefix of transformers 4.x or 5, whatever else the file holds: vision tower, projector), or its
    language model alone with Mistral's vocabulary ("lm": ComfyUI's single files, 40 layers or cut to 30; "gguf":
    llama.cpp's conversions)."""
    if mistral3_prefix(refs.keys()) is not None:
        return "hf"
    if _mistral_decoder_at(refs.keys(), "") and refs["embed_tokens.weight"].shape[0] == MISTRAL_VOCAB:
        return "lm"
    if is_gguf_llm(refs) and "blk.0.attn_q_norm.weight" not in refs and refs["token_embd.weight"].shape[0] == MISTRAL_VOCAB:
        return "gguf"
    return None


def build_qwen3(det: Detected, options: BuildOptions) -> dict:
    model = load_qwen3(plain_language_model(det, options), det.config, f"Qwen3 from {det.source}")
    return {"text_encoder_qwen3": model.to(options.device)}


def build_mistral(det: Detected, options: BuildOptions) -> dict:
    source = f"Mistral from {det.source}"
    config = mistral_text_config(det.config, {k: r.shape for k, r in det.refs.items()}, source)
    sd = plain_language_model(det, options, rotary_head_dim=config.get("head_dim", _MISTRAL_DEFAULTS["head_dim"]))
    model = load_mistral(sd, config, source)
    return {"text_encoder_mistral": model.to(options.device)}


COMPONENTS = (Component("text_encoder_qwen3", "text", activation="text"),     # FLUX.2 [klein]'s prompt encoder
              Component("text_encoder_mistral", "text", activation="text"))   # FLUX.2 [dev]'s prompt encoder
FAMILIES = (Family("qwen3", "Qwen3 text encoder (FLUX.2 [klein])", detect_qwen3, fills("text_encoder_qwen3"),
                   build_qwen3, low_precision_storage=True, normalize=qwen3_language_model, pipeline="flux2"),
            Family("mistral3", "Mistral-Small-3 text encoder (FLUX.2 [dev])", detect_mistral3,
                   fills("text_encoder_mistral"), build_mistral, low_precision_storage=True,
                   normalize=mistral3_language_model, pipeline="flux2"))
