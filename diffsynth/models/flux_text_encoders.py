"""FLUX.1 text encoders: CLIP-L (pooled vector) and T5-XXL (token sequence): loading and prompt encoding.

The models (clip_text.py, t5_encoder.py) and tokenizers (text_tokenizers.py) are the project's own, with
transformers' parameter names and token ids; nothing here imports transformers (about 2 s per process).
Weights come as plain state dicts (HF key names), optionally with the ComfyUI all-in-one
prefixes. Models are built on the meta device and the given tensors are assigned in place
(``load_state_dict(assign=True)``), so loading never holds two copies of the weights.
When no ``config.json`` is at hand, the config is inferred from tensor shapes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from ..ops.files import strip_first_prefix, strip_prefix
from .clip_text import ClipTextConfig, ClipTextModel
from .t5_encoder import T5EncoderConfig, T5EncoderModel
from .text_tokenizers import PromptTokenizer, load_clip_tokenizer, load_t5_tokenizer
from .entry import BuildOptions, Component, Detected, Family, fills, has_prefix, hf_model

__all__ = [
    "CLIP_PREFIX",
    "T5_PREFIX",
    "strip_prefix",
    "is_clip_text_state",
    "canonical_clip_keys",
    "infer_clip_config",
    "infer_t5_config",
    "load_clip_text_encoder",
    "load_t5_encoder",
    "load_clip_tokenizer",
    "load_t5_tokenizer",
    "load_tokenizers",
    "encode_prompt_clip",
    "encode_prompt_t5",
]

CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
CLIP_MAX_LENGTH = 77

# Present in some CLIP-L files but not part of CLIPTextModel: dropped silently.
_CLIP_IGNORED = ("text_model.embeddings.position_ids", "embeddings.position_ids", "text_projection.weight",
                 "logit_scale")
_T5_EMBED = "encoder.embed_tokens.weight"

StateDict = Mapping[str, torch.Tensor]


def layer_count(sd: StateDict, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not ids:
        raise ValueError(f"no '{prefix}N.*' keys found")
    return max(ids) + 1


def _require(sd: StateDict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{what}: missing key {key!r}")
    return sd[key]


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------


def _clip_key(key: str) -> str:
    """Canonical on-disk CLIP key: always ``text_model.*``."""
    return key if key.startswith("text_model.") else "text_model." + key


# transformers 4 wrote CLIPTextModel weights as ``text_model.*``; transformers 5's save_pretrained drops
# that level (``embeddings.*``, ``encoder.layers.*``). Both are the same model, so both are recognised.
_CLIP_MARKERS = (("text_model.encoder.layers.0.self_attn.q_proj.weight",),
                 ("encoder.layers.0.self_attn.q_proj.weight", "embeddings.token_embedding.weight"))


def is_clip_text_state(keys: Collection[str]) -> bool:
    """True for HF CLIPTextModel weights in either layout (with or without the ``text_model.`` level)."""
    return any(all(k in keys for k in marker) for marker in _CLIP_MARKERS)


def canonical_clip_keys(state: Mapping[str, object]) -> dict[str, object]:
    """The same entries under ``text_model.*`` names, whichever layout the file used."""
    return {k if k in _CLIP_IGNORED else _clip_key(k): v for k, v in state.items()}


def infer_clip_config(state_dict: StateDict) -> ClipTextConfig:
    """The CLIP text config from the shapes of an HF CLIP text state dict (either key layout).

    Heads: ``hidden // 64`` (CLIP-L 768 -> 12, CLIP-G 1280 -> 20); below 64 (tiny test models)
    the fallback is head_dim 8, i.e. ``max(1, hidden // 8)`` heads. BOS/EOS are the two highest ids.
    """
    sd = {_clip_key(k): v for k, v in state_dict.items() if k not in _CLIP_IGNORED}
    what = "CLIP text encoder"
    tok = _require(sd, "text_model.embeddings.token_embedding.weight", what)
    pos = _require(sd, "text_model.embeddings.position_embedding.weight", what)
    fc1 = _require(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what)
    vocab, hidden = tok.shape
    return ClipTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layer_count(sd, "text_model.encoder.layers."),
        num_attention_heads=hidden // 64 if hidden >= 64 else max(1, hidden // 8),
        max_position_embeddings=pos.shape[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )


def load_clip_text_encoder(
    state_dict: StateDict, config_dict: Mapping | None = None, dtype: torch.dtype | None = torch.float32
) -> ClipTextModel:
    """Build the CLIP text model from ``text_model.*`` weights (or transformers 5's names without that level;
    ComfyUI prefix stripped if present).

    ``config_dict`` is the content of a ``config.json`` (CLIPTextConfig or full CLIPConfig); when None
    the config is inferred (:func:`infer_clip_config`). Raises ValueError on unknown/missing keys.
    """
    raw = strip_first_prefix(state_dict, (CLIP_PREFIX,))
    config = ClipTextConfig.from_dict(config_dict) if config_dict is not None else infer_clip_config(raw)
    sd = {_clip_key(k): v for k, v in raw.items() if k not in _CLIP_IGNORED}
    _check_depth(config.num_hidden_layers, layer_count(sd, "text_model.encoder.layers."), "CLIP",
                 "num_hidden_layers")
    with torch.device("meta"):
        model = ClipTextModel(config)
    _assign(model, sd, dtype, "CLIP text encoder", file_prefix="text_model.")
    _check_materialized(model, "CLIP text encoder")
    return model.eval()


# --------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------


def infer_t5_config(state_dict: StateDict) -> T5EncoderConfig:
    """The T5 encoder config from the shapes of an HF T5 encoder state dict.

    ``relative_attention_max_distance`` cannot be seen in the weights: the T5 default 128 is used.
    """
    sd = state_dict
    what = "T5 encoder"
    shared = sd.get("shared.weight", sd.get(_T5_EMBED))
    if shared is None:
        raise ValueError(f"{what}: missing key 'shared.weight'")
    rel = _require(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    q = _require(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", what)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = _require(sd, f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", what)
    buckets, heads = rel.shape
    return T5EncoderConfig(
        vocab_size=shared.shape[0],
        d_model=shared.shape[1],
        d_kv=q.shape[0] // heads,
        d_ff=wi.shape[0],
        num_layers=layer_count(sd, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def load_t5_encoder(
    state_dict: StateDict, config_dict: Mapping | None = None, dtype: torch.dtype | None = torch.float32
) -> T5EncoderModel:
    """Build the T5 encoder from ``shared.weight`` + ``encoder.*`` weights.

    The ComfyUI prefix is stripped if present; ``encoder.embed_tokens.weight`` may be absent
    (it is tied to ``shared.weight``). Decoder keys or other unknown keys raise ValueError.
    """
    sd = strip_first_prefix(state_dict, (T5_PREFIX,))
    embed = sd.pop(_T5_EMBED, None)
    if "shared.weight" not in sd and embed is not None:
        sd["shared.weight"] = embed
    config = T5EncoderConfig.from_dict(config_dict) if config_dict is not None else infer_t5_config(sd)
    _check_depth(config.num_layers, layer_count(sd, "encoder.block."), "T5", "num_layers")
    with torch.device("meta"):
        model = T5EncoderModel(config)
    _assign(model, sd, dtype, "T5 encoder", optional={_T5_EMBED})
    _check_materialized(model, "T5 encoder")
    return model.eval()


# --------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------


def _check_depth(configured, found: int, what: str, field: str) -> None:
    """Compare config.json's depth with the weights before building: a corrupt or hostile value
    (num_hidden_layers=10**9) would otherwise spin and grow memory building empty layers."""
    if configured != found:
        raise ValueError(f"{what} text encoder: config.json says {field}={configured!r} but the weights hold "
                         f"{found} layers")


def _short(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _assign(
    model: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    what: str,
    optional: Collection[str] = (),
    file_prefix: str = "",
) -> None:
    """Check keys and shapes, then assign ``sd`` (cast to ``dtype``; None keeps each tensor's) into a meta model.

    ``sd`` keys are the on-disk names: ``file_prefix`` + the module's state-dict key.
    """
    expected = {file_prefix + k: v for k, v in model.state_dict().items()}
    unexpected = sorted(set(sd) - set(expected))
    missing = sorted(set(expected) - set(sd) - set(optional))
    if unexpected or missing:
        parts = [f"unexpected keys: {_short(unexpected)}"] if unexpected else []
        parts += [f"missing keys: {_short(missing)}"] if missing else []
        raise ValueError(f"{what}: " + "; ".join(parts))
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in sd.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"{what}: shape mismatch (file != config): {_short(bad)}")
    cast = {k[len(file_prefix):]: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in sd.items()}
    model.load_state_dict(cast, strict=False, assign=True)


def _check_materialized(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: tensors never loaded: {_short(left)}")


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


def load_tokenizers(clip_dir: str | Path, t5_dir: str | Path) -> tuple[PromptTokenizer, PromptTokenizer]:
    """Both FLUX tokenizers: (CLIP from ``clip_dir``, T5 from ``t5_dir``)."""
    return load_clip_tokenizer(clip_dir), load_t5_tokenizer(t5_dir)


# --------------------------------------------------------------------------------------
# Prompt encoding
# --------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def encode_prompt_clip(
    tokenizer: PromptTokenizer, model: ClipTextModel, prompts: list[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Pooled CLIP embedding ``(B, hidden)``: final-layer-norm state at the first EOS token.

    Prompts are padded/truncated to ``min(tokenizer.model_max_length, 77)`` tokens. Equals transformers'
    ``pooler_output`` whenever EOS is the highest token id (as in CLIP-L).
    """
    max_length = min(tokenizer.model_max_length, CLIP_MAX_LENGTH)
    ids = tokenizer(list(prompts), max_length).to(_model_device(model, device))
    hidden = model(ids)
    eos = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]


def t5_length(tokenizer, max_length: int) -> int:
    """The T5 tokens a prompt gets: `t5_sequence_length`, capped by what the tokenizer declares."""
    return min(max_length, tokenizer.model_max_length)


def encode_prompt_t5(
    tokenizer: PromptTokenizer, model: T5EncoderModel, prompts: list[str], max_length: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """T5 token embeddings ``(B, L, d_model)``, ``L = min(max_length, tokenizer.model_max_length)``, padded,
    no attention mask (as BFL's reference code and diffusers' FluxPipeline do). The cap is the one CLIP gets:
    a model trained on short prompts (flux-nano: 16 tokens) declares it, and real T5 tokenizers say 512."""
    ids = tokenizer(list(prompts), t5_length(tokenizer, max_length)).to(_model_device(model, device))
    return model(ids)


# ----------------------------------------------------------------------------- table entry

def detect_clip(refs) -> str | None:
    """CLIP text weights as transformers writes them, with the `text_model.` level (transformers 4) or without it (transformers 5)."""
    return "hf" if is_clip_text_state(refs.keys()) else None


def detect_t5(refs) -> str | None:
    return "hf" if has_prefix(refs.keys(), "encoder.block.0.layer.0.SelfAttention.q") else None


def build_clip(det: Detected, options: BuildOptions) -> dict:
    return {"text_encoder_1": hf_model(load_clip_text_encoder, det, options)}


def build_t5(det: Detected, options: BuildOptions) -> dict:
    return {"text_encoder_2": hf_model(load_t5_encoder, det, options)}


COMPONENTS = (Component("text_encoder_1", "text", activation="text", aliases=("text_encoder",),
                        label="the CLIP text encoder (text_encoder/model.safetensors)"),
              Component("text_encoder_2", "text", activation="text", label="the T5 text encoder (text_encoder_2/)"))
FAMILIES = (Family("clip", "CLIP-L text encoder", detect_clip, fills("text_encoder_1"), build_clip,
                   bundle_prefixes=("text_encoders.clip_l.transformer.",), normalize=canonical_clip_keys),
            Family("t5", "T5 text encoder", detect_t5, fills("text_encoder_2"), build_t5,
                   bundle_prefixes=("text_encoders.t5xxl.transformer.",), low_precision_storage=True))
