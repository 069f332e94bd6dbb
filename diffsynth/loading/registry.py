"""What a checkpoint is, from its key patterns and tensor shapes, and how to build the model from it.

A file may hold several models (a ComfyUI all-in-one checkpoint holds DiT, CLIP, T5 and VAE); each
becomes one `Detected` component. Nothing here depends on the exact key list: a fine-tune saved in any
supported naming, any depth or width, fp8 or not, is recognised the same way.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops.files import CheckpointError, TensorRef, read_config, scan, strip_prefix

# Pipeline attribute each component fills (DiffSynth-Studio's names).
COMPONENTS = ("dit", "text_encoder_1", "text_encoder_2", "vae_encoder", "vae_decoder")

# Outer prefixes of multi-model files: prefix -> the family expected under it.
BUNDLE_PREFIXES = {
    "model.diffusion_model.": "flux-dit",
    "text_encoders.clip_l.transformer.": "clip",
    "text_encoders.t5xxl.transformer.": "t5",
    "first_stage_model.": "flux-vae",
    "vae.": "flux-vae",
}
# Prefixes stripped from a single model (trainers and UIs add them).
MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "pipe.dit.", "transformer.", "model.")


@dataclass
class Detected:
    family: str                 # flux-dit | flux-vae | clip | t5
    format: str                 # bfl | diffusers | diffsynth | hf
    refs: dict[str, TensorRef]  # keys relative to the model (outer prefixes removed)
    source: str
    config: dict | None = None  # config.json when the model came with one
    components: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self.refs.values())

    @property
    def dtypes(self) -> dict[str, int]:
        return dict(Counter(str(r.dtype).replace("torch.", "") for r in self.refs.values()))

    def quant_types(self) -> dict[str, int]:
        return dict(Counter(str(r.extra) for r in self.refs.values() if isinstance(r.extra, str)))


def _has(keys, *patterns: str) -> bool:
    return any(k.startswith(p) for p in patterns for k in keys)


def classify(refs: dict[str, TensorRef]) -> tuple[str, str, dict[str, TensorRef]] | None:
    """(family, format, refs without wrapper prefix) of a single model, or None."""
    keys = refs.keys()
    for prefix in ("",) + MODEL_PREFIXES:
        sub = strip_prefix(refs, prefix) if prefix else refs
        k = sub.keys()
        if not k:
            continue
        if _has(k, "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
            return "flux-dit", "bfl", sub
        if "x_embedder.weight" in k and _has(k, "transformer_blocks.", "single_transformer_blocks."):
            return "flux-dit", "diffusers", sub
        if "x_embedder.weight" in k and _has(k, "blocks.0.attn.a_to_qkv", "single_blocks.0.to_qkv_mlp"):
            return "flux-dit", "diffsynth", sub
    if _has(keys, "encoder.down.0.block.0.", "decoder.up.0.block.0."):
        return "flux-vae", "bfl", refs
    if _has(keys, "encoder.down_blocks.0.resnets.0.", "decoder.up_blocks.0.resnets.0."):
        return "flux-vae", "diffusers", refs
    from ..models.flux_text_encoders import canonical_clip_keys, is_clip_text_state
    if is_clip_text_state(keys):
        return "clip", "hf", canonical_clip_keys(refs)
    if _has(keys, "encoder.block.0.layer.0.SelfAttention.q"):
        return "t5", "hf", refs
    return None


def _components(family: str, refs) -> tuple[str, ...]:
    if family == "flux-dit":
        return ("dit",)
    if family == "clip":
        return ("text_encoder_1",)
    if family == "t5":
        return ("text_encoder_2",)
    keys = refs.keys()
    return tuple(c for c, p in (("vae_encoder", "encoder."), ("vae_decoder", "decoder.")) if _has(keys, p))


def looks_like_lora(keys) -> bool:
    """LoRA files carry low-rank pairs (lora_A/B, lora_down/up, XLabs `.down`/`.up` processors)."""
    return any(".lora_" in k or "_lora" in k or k.startswith("lora_") for k in keys)


def detect(paths) -> list[Detected]:
    """Recognise every model inside a file, a list of shards, or a folder."""
    refs = scan(paths)
    source = str(paths if isinstance(paths, str) else list(map(str, paths)))
    if looks_like_lora(refs):
        from .lora import detect_dialect
        raise CheckpointError(f"{source} is a LoRA ({detect_dialect(refs)} dialect), not a model: apply it with "
                              f"pipe.load_lora(pipe.dit, path); `diffsynth inspect` describes it")
    config = read_config(paths)
    present = [p for p in BUNDLE_PREFIXES if _has(refs.keys(), p)]
    bundle = len(present) >= 2
    groups = [(p, strip_prefix(refs, p)) for p in present] if bundle else [("", refs)]
    found = []
    for _, sub in groups:
        result = classify(sub)
        if result is None:
            if bundle:
                continue
            sample = sorted(refs)[:8]
            raise CheckpointError(f"{source}: not a recognised FLUX model file (DiT, VAE, CLIP-L or T5). "
                                  f"First keys: {sample}")
        family, fmt, model_refs = result
        found.append(Detected(family, fmt, model_refs, source, None if bundle else config,
                              _components(family, model_refs)))
    if not found:
        raise CheckpointError(f"{source}: no FLUX model recognised in this multi-model file")
    return found


# ----------------------------------------------------------------------------- building

def _assign(model_cls, config, state_dict: dict[str, torch.Tensor], name: str,
            quantized: dict[str, str] | None = None, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Construct on the meta device and adopt the tensors as parameters (no copy, no init work).

    `quantized` {key: GGUF type}: those entries are raw GGUF blocks that stay quantized (Linear weights);
    `scales` {weight key: scale}: scaled-fp8 weights keep their scale beside them.
    """
    from ..ops.quant import install_gguf_weight, install_weight_scale
    from ..ops.gguf import dequantize
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{name}: weights do not fit the inferred architecture; "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    raw = {k: state_dict.pop(k) for k in (quantized or {})}
    for key, t in raw.items():
        module = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(module, nn.Linear) and key.endswith(".weight"):
            install_gguf_weight(module, t, quantized[key], tuple(module.weight.shape))
        else:  # only Linear layers compute from blocks; anything else is dequantized once here
            dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
            state_dict[key] = dequantize(t, quantized[key], dtype).reshape(model.state_dict()[key].shape)
    model.load_state_dict(state_dict, assign=True, strict=False)
    for key, s in (scales or {}).items():
        install_weight_scale(model.get_submodule(key.rsplit(".", 1)[0]), s)
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise CheckpointError(f"{name}: tensors never loaded: {left[:8]}")
    return model.eval().requires_grad_(False)


def _load(det: Detected, dtype, device, compute_dtype=None) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(weight refs, scaled-fp8 scale refs, tensors) of a detected model, read into the storage `dtype`.

    With fp8 storage, 1-D tensors (biases, norm scales: ~0.1% of the bytes) use `compute_dtype` instead;
    scaled-fp8 weights and GGUF blocks keep their file format.
    """
    from ..ops.quant import FP8_DTYPES, split_scales
    refs, scale_refs = split_scales(det.refs)
    small = compute_dtype if compute_dtype is not None and dtype in FP8_DTYPES else dtype
    sd = {k: r.load(None if k in scale_refs else (small if len(r.shape) < 2 else dtype), device)
          for k, r in refs.items()}
    return refs, scale_refs, sd


def _dit_converter(fmt: str):
    from ..models.flux_dit import dit_from_bfl, dit_from_diffusers
    return {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers, "diffsynth": dict}[fmt]


def dit_config(det: Detected):
    """A detected DiT's architecture from tensor shapes alone (meta tensors: no weight is read)."""
    from ..models.flux_dit import infer_dit_config
    from ..ops.quant import split_scales
    meta = {k: torch.empty(r.shape, device="meta") for k, r in split_scales(det.refs)[0].items()}
    config = infer_dit_config(_dit_converter(det.format)(meta))
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return config


def build_dit(det: Detected, dtype=None, device="cpu", compute_dtype=None) -> nn.Module:
    from ..models.flux_dit import FluxDiT, bfl_key_to_internal
    from ..ops.gguf import dequantize, is_quantized
    from ..ops.quant import apply_scales
    convert = _dit_converter(det.format)
    rename = {"bfl": bfl_key_to_internal, "diffsynth": lambda k: k}.get(det.format)  # per-key formats
    config = dit_config(det)
    refs, scale_refs, sd = _load(det, dtype, device, compute_dtype)
    # per-tensor scales survive renaming; the BFL final layer's halves swap would reorder per-row ones
    keep = lambda k, s: rename is not None and (s.numel() == 1 or not k.startswith("final_layer.adaLN"))  # noqa: E731
    scales = apply_scales(sd, scale_refs, dtype, keep)
    quant = {k: r.extra for k, r in refs.items() if is_quantized(r.extra)}
    if quant and rename is None:  # fused diffusers projections: dequantize once at load
        for k, t in quant.items():
            sd[k] = dequantize(sd[k], t, dtype if dtype is not None else torch.float32).reshape(refs[k].shape)
        quant = {}
    sd = convert(sd)
    return _assign(FluxDiT, config, sd, f"FLUX DiT from {det.source}",
                   quantized={rename(k): t for k, t in quant.items()},
                   scales={rename(k): s for k, s in scales.items()})


def build_vae(det: Detected, sd: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    from ..models.flux_vae import FluxVAEDecoder, FluxVAEEncoder, infer_vae_config, vae_from_bfl, vae_from_diffusers
    enc, dec = (vae_from_bfl if det.format == "bfl" else vae_from_diffusers)(sd)
    out = {}
    if enc:
        out["vae_encoder"] = _assign(FluxVAEEncoder, infer_vae_config(enc), enc, f"VAE encoder from {det.source}")
    if dec:
        out["vae_decoder"] = _assign(FluxVAEDecoder, infer_vae_config(dec), dec, f"VAE decoder from {det.source}")
    return out


def build(det: Detected, dtype: torch.dtype | None = None, device="cpu",
          compute_dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """Build the detected model(s): {pipeline attribute: module}.

    `dtype`/`device` are the storage ones; `compute_dtype` (the pipeline's) keeps small tensors precise
    under fp8 storage. Scaled-fp8 scales are kept for the DiT and folded into the weights elsewhere.
    """
    if det.family == "flux-dit":
        return {"dit": build_dit(det, dtype, device, compute_dtype)}
    from ..ops.quant import apply_scales
    _, scale_refs, sd = _load(det, dtype, device, compute_dtype)
    apply_scales(sd, scale_refs, dtype, keep=lambda k, s: False)
    if det.family == "flux-vae":
        return build_vae(det, sd)
    from ..models import flux_text_encoders as te
    load = te.load_clip_text_encoder if det.family == "clip" else te.load_t5_encoder
    # `sd` already holds each tensor in its storage dtype (small ones precise under fp8): keep them
    model = load(sd, det.config, None if dtype is not None else torch.float32).to(device)
    return {"text_encoder_1" if det.family == "clip" else "text_encoder_2": model}


def describe(det: Detected) -> dict:
    """What `diffsynth inspect` prints for one model."""
    info = {"family": det.family, "format": det.format, "components": list(det.components),
            "parameters": det.num_params, "dtypes": det.dtypes}
    quant = det.quant_types()
    if quant:
        info["quant_types"] = quant
    if det.family == "flux-dit":
        c = dit_config(det)
        info["architecture"] = {
            "hidden_size": c.hidden_size, "heads": c.num_heads, "double_blocks": c.num_double_blocks,
            "single_blocks": c.num_single_blocks, "in_channels": c.in_channels,
            "guidance_embedder": c.guidance_embed,
            "variant": _dit_variant(c)}
    return info


def _dit_variant(c) -> str:
    if not c.guidance_embed:
        return "FLUX.1-schnell-like (no guidance embedder)"
    return {64: "FLUX.1-dev-like", 128: "FLUX.1-Canny/Depth-like (control channels)",
            384: "FLUX.1-Fill-like"}.get(c.in_channels, f"FLUX-like, {c.in_channels} input channels")
