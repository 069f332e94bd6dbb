"""Tiny random Qwen2.5-VL folders and Step1X-Edit checkpoints in the real on-disk layouts, for CPU tests.

`build_tiny_qwen_vl(folder)` writes what the Qwen/Qwen2.5-VL-7B-Instruct repository holds, at toy size:

    config.json                      flat (transformers 4.x) config, architectures Qwen2_5_VLForConditionalGeneration
    model-0000i-of-00002.safetensors + model.safetensors.index.json
                                     keys `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`,
                                     `lm_head.weight` (transformers_layout=5: `model.language_model.*`, `model.visual.*`)
    tokenizer.json, tokenizer_config.json   byte-level BPE with Qwen's special tokens (“ and ” single tokens)
    preprocessor_config.json, chat_template.json

The weights come from transformers' own Qwen2_5_VLForConditionalGeneration with a tiny config (seeded init).
`build_tiny_step1x(folder)` writes `step1x-edit-i1258.safetensors` (a BFL-layout DiT + `connector.*`) and
`vae.safetensors`, sized to match the tiny Qwen (connector input = its hidden size).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ..models.step1x import PREFIX
from ..nano.text import WORDS, byte_chars
from .tiny import TINY, fill_spec, linear_spec, norm_spec, write_json, _write_safetensors, \
    _write_sharded, tiny_ae_state_dict, tiny_dit_state_dict

__all__ = ["TINY_QWEN", "build_tiny_qwen_vl", "build_tiny_step1x", "build_tiny_nexus_gen", "tiny_qwen_config", "tiny_connector_state_dict",
           "QWEN_SPECIAL_TOKENS"]

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

TINY_QWEN = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=[2, 2, 2],  # sums to head_dim / 2 = 6
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
    connector_heads=2,
)

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# Qwen2-VL's chat template (system default, "Picture N: " with add_vision_id, vision markers).
_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _split_words(text: str) -> list[str]:
    """The pre-tokenizer's pieces of `text`, merged into words so that Step1X's fixed prefix costs fewer tokens
    (merge chains of different words still interfere: it stays longer than the real vocabulary's 217)."""
    import regex
    return sorted({w for w in regex.findall(_QWEN_SPLIT, text) if len(w) > 1})


@lru_cache(maxsize=1)
def _qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte symbols, word merges (with and without a leading space) and the curly quotes as single tokens."""
    chars = byte_chars()
    encode = lambda text: "".join(chars[b] for b in text.encode("utf-8"))  # noqa: E731
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    words = [*WORDS, *(" " + w for w in WORDS), "“", "”", "Picture", *_split_words(PREFIX)]
    for word in words:
        symbols = list(encode(word))
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    return vocab, merges


def _tokenizer_json() -> dict:
    vocab, merges = _qwen_bpe()
    specials = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, t in enumerate(QWEN_SPECIAL_TOKENS)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def tiny_token_ids() -> dict[str, int]:
    vocab, _ = _qwen_bpe()
    return {t: len(vocab) + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}


def tiny_qwen_config() -> dict:
    """The flat config.json layout of the Qwen2.5-VL-7B-Instruct repository, at toy size."""
    c, ids = TINY_QWEN, tiny_token_ids()
    v = c["vision"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "max_window_layers": c["num_hidden_layers"], "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": c["mrope_section"]}, "sliding_window": 4096,
        "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "float32",
        "vocab_size": max(ids.values()) + 1, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vision_config": {**v, "in_chans": 3, "in_channels": 3, "out_hidden_size": c["hidden_size"],
                          "hidden_act": "silu", "tokens_per_second": 2, "model_type": "qwen2_5_vl"},
    }


def _nexus_extras(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    h = TINY_QWEN["hidden_size"]
    return fill_spec([("vision_head.weight", (h, h), "w"), ("image_prefill_embeds.weight", (81, h), "emb")], seed,
                 "nexus", dtype)


def _tiny_qwen_tensors(seed: int, dtype: torch.dtype, transformers_layout: int) -> dict[str, torch.Tensor]:
    """Random tensors of transformers' own model, renamed to the on-disk layout of the release."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(tiny_qwen_config()))
    out = {}
    for key, t in model.state_dict().items():
        t = t.to(dtype).contiguous()
        if transformers_layout == 4:
            key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        out[key] = t
    return out


def build_tiny_qwen_vl(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       transformers_layout: int = 4, nexus_gen: bool = False) -> Path:
    """Write a tiny Qwen2.5-VL folder (see module docstring); `transformers_layout` 4 (the release's keys) or 5;
    `nexus_gen`: Nexus-GenV2's autoregressive model (+ `vision_head`, `image_prefill_embeds`)."""
    if transformers_layout not in (4, 5):
        raise ValueError(f"transformers_layout must be 4 or 5, got {transformers_layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tiny_qwen_tensors(seed, dtype, transformers_layout)
    if nexus_gen:
        tensors.update(_nexus_extras(seed, dtype))
    _write_sharded(folder, "model", tensors)
    write_json(folder / "config.json", tiny_qwen_config())
    write_json(folder / "tokenizer.json", _tokenizer_json())
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in tiny_token_ids().items()}
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace", "split_special_tokens": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False, "added_tokens_decoder": decoder})
    v = TINY_QWEN["vision"]
    write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": v["patch_size"],
        "temporal_patch_size": v["temporal_patch_size"], "merge_size": v["spatial_merge_size"]})
    write_json(folder / "chat_template.json", {"chat_template": _CHAT_TEMPLATE})
    return folder


# ----------------------------------------------------------------------------- Step1X-Edit

def _connector_spec(in_dim: int, hidden: int, pooled: int, depth: int = 2) -> list:
    spec = linear_spec("S.input_embedder", hidden, in_dim)
    spec += linear_spec("S.t_embedder.mlp.0", hidden, 256) + linear_spec("S.t_embedder.mlp.2", hidden, hidden)
    spec += linear_spec("S.c_embedder.linear_1", hidden, in_dim) + linear_spec("S.c_embedder.linear_2", hidden, hidden)
    for i in range(depth):
        p = f"S.individual_token_refiner.blocks.{i}"
        spec += norm_spec(f"{p}.norm1", hidden) + linear_spec(f"{p}.self_attn_qkv", 3 * hidden, hidden)
        spec += linear_spec(f"{p}.self_attn_proj", hidden, hidden) + norm_spec(f"{p}.norm2", hidden)
        spec += linear_spec(f"{p}.mlp.fc1", 4 * hidden, hidden) + linear_spec(f"{p}.mlp.fc2", hidden, 4 * hidden)
        spec += linear_spec(f"{p}.adaLN_modulation.1", 2 * hidden, hidden)
    return spec + linear_spec("global_proj_out", pooled, in_dim)


def tiny_connector_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Step1X connector tensors (file names without the `connector.` prefix) for the tiny Qwen and DiT."""
    spec = _connector_spec(TINY_QWEN["hidden_size"], TINY["dit"]["context_dim"], TINY["dit"]["pooled_dim"])
    sd = fill_spec(spec, seed, "step1x", dtype)
    sd["scale_factor"] = torch.full((1,), -(1 - 0.09), dtype=dtype)
    return sd


def build_tiny_step1x(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write `step1x-edit-i1258.safetensors` (DiT, no guidance embedder, + `connector.*`) and `vae.safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tiny_dit_state_dict(seed, guidance=False, dtype=dtype)
    tensors.update({"connector." + k: v for k, v in tiny_connector_state_dict(seed, dtype).items()})
    _write_safetensors(folder / "step1x-edit-i1258.safetensors", tensors)
    _write_safetensors(folder / "vae.safetensors", tiny_ae_state_dict(seed, dtype))
    return folder


# ----------------------------------------------------------------------------- Nexus-Gen

def _merger_spec(hidden: int, out: int, expand: int = 4) -> list:
    c = TINY_QWEN
    kv = c["num_key_value_heads"] * hidden // c["num_attention_heads"]
    attn = "layers.0.self_attn."
    spec = linear_spec(attn + "q_proj", hidden, hidden) + linear_spec(attn + "k_proj", kv, hidden)
    spec += linear_spec(attn + "v_proj", kv, hidden) + linear_spec(attn + "o_proj", hidden, hidden, False)
    for name, shape in (("gate_proj", (c["intermediate_size"], hidden)), ("up_proj", (c["intermediate_size"], hidden)),
                        ("down_proj", (hidden, c["intermediate_size"]))):
        spec.append((f"layers.0.mlp.{name}.weight", shape, "w"))
    spec += norm_spec("layers.0.input_layernorm", hidden, False)
    spec += norm_spec("layers.0.post_attention_layernorm", hidden, False)
    spec += norm_spec("projector.0", hidden, False) + linear_spec("projector.1", out * expand, hidden)
    spec += norm_spec("projector.2", out * expand, False) + linear_spec("projector.4", out, out * expand)
    return spec + norm_spec("projector.5", out, False)


def build_tiny_nexus_gen(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Nexus-GenV2's layout: the autoregressive model (`model-*.safetensors` + processor files, also under
    `processor/`, where DiffSynth-Studio's scripts read them) and the `generation_decoder.bin` /
    `edit_decoder.bin` torch files (DiT as `pipe.dit.*` in our layout + adapter)."""
    import shutil
    from ..models.flux_dit import dit_from_bfl
    folder = build_tiny_qwen_vl(folder, seed, dtype, nexus_gen=True)
    (folder / "processor").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        shutil.copyfile(folder / name, folder / "processor" / name)
    dit = {"pipe.dit." + k: v for k, v in dit_from_bfl(tiny_dit_state_dict(seed, dtype=dtype)).items()}
    h, ctx = TINY_QWEN["hidden_size"], TINY["dit"]["context_dim"]
    adapter_spec = (linear_spec("adapter.0", ctx, h) + norm_spec("adapter.1", ctx) + linear_spec("adapter.3", ctx, ctx)
                    + norm_spec("adapter.4", ctx))
    adapter = fill_spec(adapter_spec, seed, "nexus_adapter", dtype)
    merger = fill_spec(_merger_spec(h, ctx), seed, "nexus_merger", dtype)
    for name, extra in (("generation_decoder.bin", adapter),
                        ("edit_decoder.bin", {"embedding_merger." + k: v for k, v in merger.items()})):
        tmp = folder / (name + ".tmp")
        torch.save({**dit, **extra}, tmp)
        tmp.replace(folder / name)
    return folder
