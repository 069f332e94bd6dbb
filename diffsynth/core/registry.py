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

from .loading import CheckpointError, TensorRef, load_tensors, read_config, scan

# Pipeline attribute each component fills (SPEC.md's names).
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


def _strip(refs: dict[str, TensorRef], prefix: str) -> dict[str, TensorRef]:
    return {k[len(prefix):]: r for k, r in refs.items() if k.startswith(prefix)}


def classify(refs: dict[str, TensorRef]) -> tuple[str, str, dict[str, TensorRef]] | None:
    """(family, format, refs without wrapper prefix) of a single model, or None."""
    keys = refs.keys()
    for prefix in ("",) + MODEL_PREFIXES:
        sub = _strip(refs, prefix) if prefix else refs
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
    if _has(keys, "text_model.encoder.layers.0.self_attn.q_proj"):
        return "clip", "hf", refs
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


def detect(paths) -> list[Detected]:
    """Recognise every model inside a file, a list of shards, or a folder."""
    refs = scan(paths)
    source = str(paths if isinstance(paths, str) else list(map(str, paths)))
    config = read_config(paths)
    present = [p for p in BUNDLE_PREFIXES if _has(refs.keys(), p)]
    bundle = len(present) >= 2
    groups = [(p, _strip(refs, p)) for p in present] if bundle else [("", refs)]
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

def _assign(model_cls, config, state_dict: dict[str, torch.Tensor], name: str) -> nn.Module:
    """Construct on the meta device and adopt the tensors as parameters (no copy, no init work)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{name}: weights do not fit the inferred architecture; "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict(state_dict, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def build_dit(det: Detected, dtype=None, device="cpu") -> nn.Module:
    from ..models.flux_dit import FluxDiT, dit_from_bfl, dit_from_diffusers, infer_dit_config
    sd = load_tensors(det.refs, dtype, device)
    sd = {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers, "diffsynth": dict}[det.format](sd)
    config = infer_dit_config(sd)
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return _assign(FluxDiT, config, sd, f"FLUX DiT from {det.source}")


def build_vae(det: Detected, dtype=None, device="cpu") -> dict[str, nn.Module]:
    from ..models.flux_vae import FluxVAEDecoder, FluxVAEEncoder, infer_vae_config, vae_from_bfl, vae_from_diffusers
    sd = load_tensors(det.refs, dtype, device)
    enc, dec = (vae_from_bfl if det.format == "bfl" else vae_from_diffusers)(sd)
    out = {}
    if enc:
        out["vae_encoder"] = _assign(FluxVAEEncoder, infer_vae_config(enc), enc, f"VAE encoder from {det.source}")
    if dec:
        out["vae_decoder"] = _assign(FluxVAEDecoder, infer_vae_config(dec), dec, f"VAE decoder from {det.source}")
    return out


def build(det: Detected, dtype: torch.dtype | None = None, device="cpu") -> dict[str, nn.Module]:
    """Build the detected model(s): {pipeline attribute: module}."""
    if det.family == "flux-dit":
        return {"dit": build_dit(det, dtype, device)}
    if det.family == "flux-vae":
        return build_vae(det, dtype, device)
    from ..models import flux_text_encoders as te
    sd = load_tensors(det.refs, dtype, device)
    if det.family == "clip":
        return {"text_encoder_1": te.load_clip_text_encoder(sd, det.config, dtype or torch.float32).to(device)}
    return {"text_encoder_2": te.load_t5_encoder(sd, det.config, dtype or torch.float32).to(device)}


def describe(det: Detected) -> dict:
    """What `diffsynth inspect` prints for one model."""
    info = {"family": det.family, "format": det.format, "components": list(det.components),
            "parameters": det.num_params, "dtypes": det.dtypes}
    quant = det.quant_types()
    if quant:
        info["quant_types"] = quant
    if det.family == "flux-dit":
        from ..models.flux_dit import dit_from_bfl, dit_from_diffusers, infer_dit_config
        meta = {k: torch.empty(r.shape, device="meta") for k, r in det.refs.items()}
        sd = {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers, "diffsynth": dict}[det.format](meta)
        c = infer_dit_config(sd)
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
