"""Random CLIP-L / T5 text encoders in the Hugging Face folder layout, with small tokenizers made offline
(a byte-level BPE in which chosen words are single tokens; a unigram sentencepiece trained in memory).

flux-nano's frozen text encoders are built from these, and so are the test models' (diffsynth.testing.tiny).
Every tensor is drawn from its own generator seeded by ``(seed, component, key)``: a seed gives byte-identical
files.
"""
from __future__ import annotations

import io
import json
import os
import random
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from ..models.flux_text_encoders import CLIP_MAX_LENGTH
# --------------------------------------------------------------------------------------
# Tokenizer vocabularies (fixed, independent of the seed)
# --------------------------------------------------------------------------------------

WORDS = """a an the photo of cat dog red blue green yellow black white small big house tree car
sky sun moon river mountain forest city street night day light dark painting portrait woman man
girl boy flower garden sea beach cloud rain snow fire water stone wooden old new beautiful cute
happy sitting standing on in with and at under near table chair book cup window door bird fish
horse castle dragon robot astronaut space planet galaxy ocean wave sunset sunrise morning evening
golden silver glass metal paper drawing sketch watercolor oil digital art style detailed sharp
focus soft cinematic lighting shadow reflection colorful bright quiet busy market bridge tower
road field grass leaf autumn winter spring summer""".split()

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_SP_VOCAB = 256  # sentencepiece pieces, ids 0..255 (pad 0, eos 1, unk 2)
T5_EXTRA_IDS = 100


def byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (printable bytes map to themselves)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars, shift = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


@lru_cache(maxsize=4)
def clip_bpe(words: tuple[str, ...] = tuple(WORDS)) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE: 256 byte symbols, the same with ``</w>``, merges making each of `words` one token,
    then BOS and EOS last."""
    base = byte_chars()
    tokens = base + [c + "</w>" for c in base]
    merges: list[str] = []
    seen = set(tokens)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                seen.add(merged)
                merges.append(f"{left} {right}")
                tokens.append(merged)
            left = merged
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def random_sentences(n: int) -> list[str]:
    rng = random.Random(1234)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        out.append(text.capitalize() + rng.choice([".", "", ",", "!"]))
    return out


@lru_cache(maxsize=4)
def _t5_spiece(sentences: tuple[str, ...] | None = None) -> bytes:
    """Train a tiny unigram sentencepiece model in memory (single thread: deterministic) on `sentences`
    (default: random sentences of the tiny vocabulary)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences or random_sentences(3000)),
        model_writer=buf,
        model_type="unigram",
        vocab_size=T5_SP_VOCAB,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        character_coverage=1.0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()

# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

T5_MAX_LENGTH = 512  # the T5 tokenizer's model_max_length (CLIP's: CLIP_MAX_LENGTH)
TEXT_SIZES: dict[str, dict] = {
    "clip": dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        vocab_size=len(clip_bpe()[0]),  # == tokenizer size; BOS/EOS are the two highest ids
    ),
    "t5": dict(
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        vocab_size=384,  # >= 256 sentencepiece pieces + 100 extra ids
    ),
}

# --------------------------------------------------------------------------------------
# Shape tables -> deterministic random tensors
# --------------------------------------------------------------------------------------

# kind: "w" weight (std 0.5/sqrt(fan_in)), "b" bias (std 0.01), "norm" scale (1 + 0.01 N),
# "emb" embedding table (std 0.1)
Spec = list[tuple[str, tuple[int, ...], str]]


def fill_spec(spec: Spec, seed: int, component: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, shape, kind in spec:
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{component}/{key}".encode())) % 2**62)
        x = torch.randn(shape, generator=g)
        if kind == "w":
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x * (0.5 / fan_in**0.5)
        elif kind == "b":
            x = x * 0.01
        elif kind == "norm":
            x = 1.0 + 0.01 * x
        elif kind == "emb":
            x = x * 0.1
        else:
            raise ValueError(kind)
        out[key] = x.to(dtype).contiguous()
    return out


def linear_spec(name: str, n_out: int, n_in: int, bias: bool = True) -> Spec:
    spec = [(f"{name}.weight", (n_out, n_in), "w")]
    return spec + [(f"{name}.bias", (n_out,), "b")] if bias else spec


def conv_spec(name: str, n_out: int, n_in: int, k: int) -> Spec:
    return [(f"{name}.weight", (n_out, n_in, k, k), "w"), (f"{name}.bias", (n_out,), "b")]


def norm_spec(name: str, n: int, bias: bool = True) -> Spec:
    spec = [(f"{name}.weight", (n,), "norm")]
    return spec + [(f"{name}.bias", (n,), "b")] if bias else spec



def _clip_spec(c: dict | None = None) -> Spec:
    c = c or TEXT_SIZES["clip"]
    h, f = c["hidden_size"], c["intermediate_size"]
    spec: Spec = [
        ("text_model.embeddings.token_embedding.weight", (c["vocab_size"], h), "emb"),
        ("text_model.embeddings.position_embedding.weight", (c["max_position_embeddings"], h), "emb"),
    ]
    for i in range(c["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            spec += linear_spec(f"{p}.self_attn.{proj}", h, h)
        spec += norm_spec(f"{p}.layer_norm1", h) + linear_spec(f"{p}.mlp.fc1", f, h) + linear_spec(f"{p}.mlp.fc2", h, f)
        spec += norm_spec(f"{p}.layer_norm2", h)
    return spec + norm_spec("text_model.final_layer_norm", h)


def _t5_spec(c: dict | None = None) -> Spec:
    c = c or TEXT_SIZES["t5"]
    d, f, inner = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"]
    spec: Spec = [("shared.weight", (c["vocab_size"], d), "emb")]
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for proj in ("q", "k", "v"):
            spec += linear_spec(f"{p}.0.SelfAttention.{proj}", inner, d, bias=False)
        spec += linear_spec(f"{p}.0.SelfAttention.o", d, inner, bias=False)
        if i == 0:
            shape = (c["relative_attention_num_buckets"], c["num_heads"])
            spec.append((f"{p}.0.SelfAttention.relative_attention_bias.weight", shape, "emb"))
        spec += norm_spec(f"{p}.0.layer_norm", d, bias=False)
        spec += linear_spec(f"{p}.1.DenseReluDense.wi_0", f, d, bias=False)
        spec += linear_spec(f"{p}.1.DenseReluDense.wi_1", f, d, bias=False)
        spec += linear_spec(f"{p}.1.DenseReluDense.wo", d, f, bias=False)
        spec += norm_spec(f"{p}.1.layer_norm", d, bias=False)
    return spec + norm_spec("encoder.final_layer_norm", d, bias=False)



def tiny_clip_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None
                         ) -> dict[str, torch.Tensor]:
    """Random tiny CLIP text encoder weights with HF ``text_model.*`` key names (sizes: `config`, default
    TEXT_SIZES)."""
    return fill_spec(_clip_spec(config), seed, "clip", dtype)


def tiny_t5_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None
                       ) -> dict[str, torch.Tensor]:
    """Random tiny T5 encoder weights with HF key names (``shared.weight`` + ``encoder.*``)."""
    return fill_spec(_t5_spec(config), seed, "t5", dtype)


def tiny_clip_config(config: dict | None = None) -> dict:
    """config.json contents for the tiny HF CLIPTextModel (sizes: `config`, default TEXT_SIZES)."""
    c = config or TEXT_SIZES["clip"]
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **c,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "pad_token_id": 1,
        "bos_token_id": c["vocab_size"] - 2,
        "eos_token_id": c["vocab_size"] - 1,
        "torch_dtype": "float32",
    }


def tiny_t5_config(config: dict | None = None) -> dict:
    """config.json contents for the tiny HF T5EncoderModel (sizes: `config`, default TEXT_SIZES)."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        **(config or TEXT_SIZES["t5"]),
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "initializer_factor": 1.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }



def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())



def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = tuple(WORDS)) -> None:
    """CLIP BPE tokenizer files in which each of `words` is a single token."""
    vocab, merges = clip_bpe(words)
    special = {"bos_token": _CLIP_BOS, "eos_token": _CLIP_EOS, "unk_token": _CLIP_EOS, "pad_token": _CLIP_EOS}
    write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)


def write_t5_tokenizer(folder: Path, sentences: tuple[str, ...] | None = None,
                       max_length: int = T5_MAX_LENGTH) -> None:
    """T5 sentencepiece tokenizer files trained on `sentences`; `max_length` becomes model_max_length."""
    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}
    write_bytes(folder / "spiece.model", _t5_spiece(sentences))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": max_length,
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)
