"""Tiny random FLUX.1 model folders in the real on-disk layout, for fast CPU tests.

Every tensor is drawn from its own generator seeded by ``(seed, component, key)``, so
the same seed gives byte-identical files, and the same tensor in every layout
(BFL folder, diffusers shards, ComfyUI all-in-one file).

Layout written by :func:`build_tiny_flux`::

    root/flux1-dev.safetensors            BFL DiT keys   (dit_format="bfl")
    root/transformer/...                  diffusers DiT  (dit_format="diffusers", 2 shards + index + config)
    root/ae.safetensors                   BFL autoencoder keys
    root/text_encoder/                    HF CLIPTextModel: model.safetensors + config.json
    root/text_encoder_2/                  HF T5EncoderModel: 2 shards + index + config.json
    root/tokenizer/                       CLIP BPE: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    root/tokenizer_2/                     T5 sentencepiece: spiece.model, tokenizer_config.json, special_tokens_map.json
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
from ..ops.files import save_safetensors

__all__ = [
    "write_clip_tokenizer",
    "write_t5_tokenizer",
    "write_json",
    "write_bytes",
    "TINY",
    "build_tiny_flux",
    "build_tiny_comfy_checkpoint",
    "tiny_dit_state_dict",
    "tiny_ae_state_dict",
    "tiny_clip_state_dict",
    "tiny_t5_state_dict",
    "tiny_clip_config",
    "tiny_t5_config",
    "bfl_to_diffusers_dit",
    "COMFY_PREFIXES",
]

# --------------------------------------------------------------------------------------
# Tokenizer vocabularies (fixed, independent of the seed)
# --------------------------------------------------------------------------------------

_WORDS = """a an the photo of cat dog red blue green yellow black white small big house tree car
sky sun moon river mountain forest city street night day light dark painting portrait woman man
girl boy flower garden sea beach cloud rain snow fire water stone wooden old new beautiful cute
happy sitting standing on in with and at under near table chair book cup window door bird fish
horse castle dragon robot astronaut space planet galaxy ocean wave sunset sunrise morning evening
golden silver glass metal paper drawing sketch watercolor oil digital art style detailed sharp
focus soft cinematic lighting shadow reflection colorful bright quiet busy market bridge tower
road field grass leaf autumn winter spring summer""".split()

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_T5_SP_VOCAB = 256  # sentencepiece pieces, ids 0..255 (pad 0, eos 1, unk 2)
_T5_EXTRA_IDS = 100


def _byte_chars() -> list[str]:
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
def _clip_bpe(words: tuple[str, ...] = tuple(_WORDS)) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE: 256 byte symbols, the same with ``</w>``, merges making each of `words` one token,
    then BOS and EOS last."""
    base = _byte_chars()
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


def _sentences(n: int) -> list[str]:
    rng = random.Random(1234)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
        out.append(text.capitalize() + rng.choice([".", "", ",", "!"]))
    return out


@lru_cache(maxsize=4)
def _t5_spiece(sentences: tuple[str, ...] | None = None) -> bytes:
    """Train a tiny unigram sentencepiece model in memory (single thread: deterministic) on `sentences`
    (default: random sentences of the tiny vocabulary)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences or _sentences(3000)),
        model_writer=buf,
        model_type="unigram",
        vocab_size=_T5_SP_VOCAB,
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

TINY: dict[str, dict] = {
    "clip": dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        vocab_size=len(_clip_bpe()[0]),  # == tokenizer size; BOS/EOS are the two highest ids
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
    "dit": dict(
        hidden_size=32,
        num_heads=2,
        head_dim=16,
        axes_dim=(4, 6, 6),
        depth=2,
        depth_single_blocks=2,
        in_channels=64,
        context_dim=32,
        pooled_dim=32,
        mlp_ratio=4.0,
        time_dim=256,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        z_channels=16,
    ),
    "tokenizer": dict(clip_max_length=77, t5_max_length=512, t5_sp_vocab=_T5_SP_VOCAB, t5_extra_ids=_T5_EXTRA_IDS),
}

# --------------------------------------------------------------------------------------
# Shape tables -> deterministic random tensors
# --------------------------------------------------------------------------------------

# kind: "w" weight (std 0.5/sqrt(fan_in)), "b" bias (std 0.01), "norm" scale (1 + 0.01 N),
# "emb" embedding table (std 0.1)
_Spec = list[tuple[str, tuple[int, ...], str]]


def _fill(spec: _Spec, seed: int, component: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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


def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> _Spec:
    spec = [(f"{name}.weight", (n_out, n_in), "w")]
    return spec + [(f"{name}.bias", (n_out,), "b")] if bias else spec


def _conv(name: str, n_out: int, n_in: int, k: int) -> _Spec:
    return [(f"{name}.weight", (n_out, n_in, k, k), "w"), (f"{name}.bias", (n_out,), "b")]


def _norm(name: str, n: int, bias: bool = True) -> _Spec:
    spec = [(f"{name}.weight", (n,), "norm")]
    return spec + [(f"{name}.bias", (n,), "b")] if bias else spec


def _dit_spec(guidance: bool) -> _Spec:
    c = TINY["dit"]
    h, d, ctx, pooled, t = c["hidden_size"], c["head_dim"], c["context_dim"], c["pooled_dim"], c["time_dim"]
    m = int(h * c["mlp_ratio"])
    spec: _Spec = []
    spec += _linear("img_in", h, c["in_channels"])
    spec += _linear("txt_in", h, ctx)
    spec += _linear("time_in.in_layer", h, t) + _linear("time_in.out_layer", h, h)
    spec += _linear("vector_in.in_layer", h, pooled) + _linear("vector_in.out_layer", h, h)
    if guidance:
        spec += _linear("guidance_in.in_layer", h, t) + _linear("guidance_in.out_layer", h, h)
    for i in range(c["depth"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            spec += _linear(f"{p}_mod.lin", 6 * h, h)
            spec += _linear(f"{p}_attn.qkv", 3 * h, h)
            spec += [(f"{p}_attn.norm.query_norm.scale", (d,), "norm"), (f"{p}_attn.norm.key_norm.scale", (d,), "norm")]
            spec += _linear(f"{p}_attn.proj", h, h)
            spec += _linear(f"{p}_mlp.0", m, h) + _linear(f"{p}_mlp.2", h, m)
    for i in range(c["depth_single_blocks"]):
        p = f"single_blocks.{i}"
        spec += _linear(f"{p}.linear1", 3 * h + m, h) + _linear(f"{p}.linear2", h, h + m)
        spec += [(f"{p}.norm.query_norm.scale", (d,), "norm"), (f"{p}.norm.key_norm.scale", (d,), "norm")]
        spec += _linear(f"{p}.modulation.lin", 3 * h, h)
    spec += _linear("final_layer.linear", c["in_channels"], h)
    spec += _linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return spec


def _resnet(name: str, c_in: int, c_out: int) -> _Spec:
    spec = _norm(f"{name}.norm1", c_in) + _conv(f"{name}.conv1", c_out, c_in, 3)
    spec += _norm(f"{name}.norm2", c_out) + _conv(f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        spec += _conv(f"{name}.nin_shortcut", c_out, c_in, 1)
    return spec


def _mid(name: str, c: int) -> _Spec:
    spec = _resnet(f"{name}.block_1", c, c) + _norm(f"{name}.attn_1.norm", c)
    for proj in ("q", "k", "v", "proj_out"):
        spec += _conv(f"{name}.attn_1.{proj}", c, c, 1)
    return spec + _resnet(f"{name}.block_2", c, c)


def _ae_spec() -> _Spec:
    c = TINY["vae"]
    ch, mult, nrb, z = c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"]
    levels = len(mult)
    spec: _Spec = _conv("encoder.conv_in", ch, c["in_channels"], 3)
    block_in = ch
    for i in range(levels):
        block_out = ch * mult[i]
        for j in range(nrb):
            spec += _resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != levels - 1:
            spec += _conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    spec += _mid("encoder.mid", block_in)
    spec += _norm("encoder.norm_out", block_in) + _conv("encoder.conv_out", 2 * z, block_in, 3)

    block_in = ch * mult[-1]
    spec += _conv("decoder.conv_in", block_in, z, 3)
    spec += _mid("decoder.mid", block_in)
    for i in reversed(range(levels)):
        block_out = ch * mult[i]
        for j in range(nrb + 1):
            spec += _resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            spec += _conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    spec += _norm("decoder.norm_out", block_in) + _conv("decoder.conv_out", c["out_channels"], block_in, 3)
    return spec


def _clip_spec(c: dict | None = None) -> _Spec:
    c = c or TINY["clip"]
    h, f = c["hidden_size"], c["intermediate_size"]
    spec: _Spec = [
        ("text_model.embeddings.token_embedding.weight", (c["vocab_size"], h), "emb"),
        ("text_model.embeddings.position_embedding.weight", (c["max_position_embeddings"], h), "emb"),
    ]
    for i in range(c["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            spec += _linear(f"{p}.self_attn.{proj}", h, h)
        spec += _norm(f"{p}.layer_norm1", h) + _linear(f"{p}.mlp.fc1", f, h) + _linear(f"{p}.mlp.fc2", h, f)
        spec += _norm(f"{p}.layer_norm2", h)
    return spec + _norm("text_model.final_layer_norm", h)


def _t5_spec(c: dict | None = None) -> _Spec:
    c = c or TINY["t5"]
    d, f, inner = c["d_model"], c["d_ff"], c["num_heads"] * c["d_kv"]
    spec: _Spec = [("shared.weight", (c["vocab_size"], d), "emb")]
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for proj in ("q", "k", "v"):
            spec += _linear(f"{p}.0.SelfAttention.{proj}", inner, d, bias=False)
        spec += _linear(f"{p}.0.SelfAttention.o", d, inner, bias=False)
        if i == 0:
            shape = (c["relative_attention_num_buckets"], c["num_heads"])
            spec.append((f"{p}.0.SelfAttention.relative_attention_bias.weight", shape, "emb"))
        spec += _norm(f"{p}.0.layer_norm", d, bias=False)
        spec += _linear(f"{p}.1.DenseReluDense.wi_0", f, d, bias=False)
        spec += _linear(f"{p}.1.DenseReluDense.wi_1", f, d, bias=False)
        spec += _linear(f"{p}.1.DenseReluDense.wo", d, f, bias=False)
        spec += _norm(f"{p}.1.layer_norm", d, bias=False)
    return spec + _norm("encoder.final_layer_norm", d, bias=False)


def tiny_dit_state_dict(seed: int = 0, guidance: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tiny FLUX DiT weights with BFL key names."""
    return _fill(_dit_spec(guidance), seed, "dit", dtype)


def tiny_ae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tiny FLUX autoencoder weights with BFL (``encoder.*``/``decoder.*``) key names."""
    return _fill(_ae_spec(), seed, "ae", dtype)


def tiny_clip_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None
                         ) -> dict[str, torch.Tensor]:
    """Random tiny CLIP text encoder weights with HF ``text_model.*`` key names (sizes: `config`, default TINY)."""
    return _fill(_clip_spec(config), seed, "clip", dtype)


def tiny_t5_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None
                       ) -> dict[str, torch.Tensor]:
    """Random tiny T5 encoder weights with HF key names (``shared.weight`` + ``encoder.*``)."""
    return _fill(_t5_spec(config), seed, "t5", dtype)


def tiny_clip_config(config: dict | None = None) -> dict:
    """config.json contents for the tiny HF CLIPTextModel (sizes: `config`, default TINY)."""
    c = config or TINY["clip"]
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
    """config.json contents for the tiny HF T5EncoderModel (sizes: `config`, default TINY)."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        **(config or TINY["t5"]),
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


def bfl_to_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split BFL FLUX DiT weights into diffusers ``FluxTransformer2DModel`` names."""
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd[f"{src}.{suffix}"]

    def split(dsts: list[str], src: str, sizes: list[int]) -> None:
        for suffix in ("weight", "bias"):
            for dst, part in zip(dsts, torch.split(sd[f"{src}.{suffix}"], sizes, dim=0)):
                out[f"{dst}.{suffix}"] = part.contiguous()

    h = sd["img_in.weight"].shape[0]
    put("x_embedder", "img_in")
    put("context_embedder", "txt_in")
    put("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    put("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    put("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    put("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    put("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    put("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")})
    for i in blocks:
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        put(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        put(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.img_attn.qkv", [h, h, h])
        split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{s}.txt_attn.qkv", [h, h, h])
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = sd[f"{s}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = sd[f"{s}.txt_attn.norm.key_norm.scale"]
        put(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        put(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
        put(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        put(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        put(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        put(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_blocks.")})
    for i in singles:
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m = sd[f"{s}.linear1.weight"].shape[0] - 3 * h
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{s}.linear1", [h, h, h, m])
        put(f"{d}.proj_out", f"{s}.linear2")
        out[f"{d}.attn.norm_q.weight"] = sd[f"{s}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = sd[f"{s}.norm.key_norm.scale"]
        put(f"{d}.norm.linear", f"{s}.modulation.lin")
    put("proj_out", "final_layer.linear")
    # BFL chunks the final modulation as (shift, scale); diffusers as (scale, shift).
    for suffix in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{suffix}"].chunk(2, dim=0)
        out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift], dim=0)
    return out


def _diffusers_dit_config(guidance: bool) -> dict:
    c = TINY["dit"]
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0",
        "attention_head_dim": c["head_dim"],
        "axes_dims_rope": list(c["axes_dim"]),
        "guidance_embeds": guidance,
        "in_channels": c["in_channels"],
        "joint_attention_dim": c["context_dim"],
        "num_attention_heads": c["num_heads"],
        "num_layers": c["depth"],
        "num_single_layers": c["depth_single_blocks"],
        "patch_size": 1,
        "pooled_projection_dim": c["pooled_dim"],
    }


# --------------------------------------------------------------------------------------
# Atomic file writing
# --------------------------------------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_safetensors(tensors, path, metadata={"format": "pt"})


def _write_sharded(folder: Path, stem: str, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """HF-style sharding: ``{stem}-0000i-of-0000n.safetensors`` + ``{stem}.safetensors.index.json``."""
    keys = list(tensors)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        _write_safetensors(folder / name, part)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = tuple(_WORDS)) -> None:
    """CLIP BPE tokenizer files in which each of `words` is a single token."""
    vocab, merges = _clip_bpe(words)
    special = {"bos_token": _CLIP_BOS, "eos_token": _CLIP_EOS, "unk_token": _CLIP_EOS, "pad_token": _CLIP_EOS}
    write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TINY["tokenizer"]["clip_max_length"],
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)


def write_t5_tokenizer(folder: Path, sentences: tuple[str, ...] | None = None,
                       max_length: int = TINY["tokenizer"]["t5_max_length"]) -> None:
    """T5 sentencepiece tokenizer files trained on `sentences`; `max_length` becomes model_max_length."""
    extra = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extra}
    write_bytes(folder / "spiece.model", _t5_spiece(sentences))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": max_length,
        "extra_ids": _T5_EXTRA_IDS,
        "legacy": True,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)


# --------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------


def build_tiny_flux(
    root: str | Path,
    seed: int = 0,
    guidance: bool = True,
    dit_format: str = "bfl",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random FLUX.1-dev folder (see module docstring) under ``root`` and return it.

    ``guidance=False`` drops the guidance embedder (schnell-like); ``dit_format`` is ``"bfl"``
    (``root/flux1-dev.safetensors``) or ``"diffusers"`` (``root/transformer/``, 2 shards).
    """
    if dit_format not in ("bfl", "diffusers"):
        raise ValueError(f"dit_format must be 'bfl' or 'diffusers', got {dit_format!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    dit = tiny_dit_state_dict(seed, guidance, dtype)
    if dit_format == "bfl":
        _write_safetensors(root / "flux1-dev.safetensors", dit)
    else:
        _write_sharded(root / "transformer", "diffusion_pytorch_model", bfl_to_diffusers_dit(dit))
        write_json(root / "transformer" / "config.json", _diffusers_dit_config(guidance))
    _write_safetensors(root / "ae.safetensors", tiny_ae_state_dict(seed, dtype))

    _write_safetensors(root / "text_encoder" / "model.safetensors", tiny_clip_state_dict(seed, dtype))
    write_json(root / "text_encoder" / "config.json", tiny_clip_config())
    _write_sharded(root / "text_encoder_2", "model", tiny_t5_state_dict(seed, dtype))
    write_json(root / "text_encoder_2" / "config.json", tiny_t5_config())

    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")
    return root


COMFY_PREFIXES: dict[str, str] = {
    "dit": "model.diffusion_model.",
    "clip": "text_encoders.clip_l.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
    "vae": "vae.",
}


def build_tiny_comfy_checkpoint(
    path: str | Path, seed: int = 0, guidance: bool = True, dtype: torch.dtype = torch.float32
) -> Path:
    """Write ONE ComfyUI-style all-in-one safetensors file (same tensors as :func:`build_tiny_flux`)."""
    path = Path(path)
    parts = {
        "dit": tiny_dit_state_dict(seed, guidance, dtype),
        "clip": tiny_clip_state_dict(seed, dtype),
        "t5": tiny_t5_state_dict(seed, dtype),
        "vae": tiny_ae_state_dict(seed, dtype),
    }
    tensors = {COMFY_PREFIXES[name] + k: v for name, sd in parts.items() for k, v in sd.items()}
    _write_safetensors(path, tensors)
    return path
