"""Builders of the component table's families: a detected checkpoint -> modules on the meta device, filled
straight from disk in the storage dtype (no copy, no init work)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.files import CheckpointError
from ..ops.gguf import dequantize, is_quantized
from ..ops.quant import FP8_DTYPES, apply_scales, install_gguf_weight, install_weight_scale, split_scales
from .registry import Detected


@dataclass(frozen=True)
class BuildOptions:
    """`dtype`/`device`: storage (None dtype = the file's own); `compute_dtype` (the pipeline's) keeps small
    tensors precise under fp8 storage."""
    dtype: torch.dtype | None = None
    device: str | torch.device = "cpu"
    compute_dtype: torch.dtype | None = None
    processor_dir: str | None = None  # a Qwen2.5-VL model's processor files, when not beside its weights


def assign(model_cls, config, state_dict: dict[str, torch.Tensor], name: str,
           quantized: dict[str, str] | None = None, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Construct on the meta device and adopt the tensors as parameters (no copy, no init work).

    `quantized` {key: GGUF type}: those entries are raw GGUF blocks that stay quantized (Linear weights);
    `scales` {weight key: scale}: scaled-fp8 weights keep their scale beside them.
    """
    with torch.device("meta"):
        model = model_cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(shapes.keys() - state_dict.keys()), sorted(state_dict.keys() - shapes.keys())
    if missing or unexpected:
        raise CheckpointError(f"{name}: weights do not fit the inferred architecture; "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [f"{k}: {tuple(t.shape)} in the file, {shapes[k]} expected" for k, t in state_dict.items()
             if k not in (quantized or {}) and tuple(t.shape) != shapes[k]]
    if wrong:  # the architecture is read from a few tensors: the others must agree with it
        raise CheckpointError(f"{name}: {len(wrong)} tensor(s) disagree with the architecture the other tensors "
                              f"describe (a damaged or mixed file?): {wrong[:6]}")
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


def load_tensors(det: Detected, options: BuildOptions) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(weight refs, scaled-fp8 scale refs, tensors) of a detected model, read into the storage dtype.

    With fp8 storage, 1-D tensors (biases, norm scales: ~0.1% of the bytes) use the compute dtype instead;
    scaled-fp8 weights and GGUF blocks keep their file format.
    """
    dtype, compute = options.dtype, options.compute_dtype
    refs, scale_refs = split_scales(det.refs)
    small = compute if compute is not None and dtype in FP8_DTYPES else dtype
    sd = {k: r.load(None if k in scale_refs else (small if len(r.shape) < 2 else dtype), options.device)
          for k, r in refs.items()}
    return refs, scale_refs, sd


def plain_tensors(det: Detected, options: BuildOptions) -> dict[str, torch.Tensor]:
    """The tensors of a model that computes from plain weights (scaled-fp8 scales folded in)."""
    _, scale_refs, sd = load_tensors(det, options)
    apply_scales(sd, scale_refs, options.dtype, keep=lambda k, s: False)
    return sd


def _dit_converter(fmt: str):
    from ..models.flux_dit import dit_from_bfl, dit_from_diffusers
    return {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers, "diffsynth": dict}[fmt]


def dit_config(det: Detected):
    """A detected DiT's (FLUX.1 or FLUX.2) architecture from tensor shapes alone (meta tensors: no weight is read)."""
    meta = {k: torch.empty(r.shape, device="meta") for k, r in split_scales(det.refs)[0].items()}
    if det.family == "flux2-dit":
        from ..models import flux2_dit
        config = flux2_dit.infer_dit_config(_flux2_converter(det.format)(meta))
        config.theta = int((det.config or {}).get("rope_theta", config.theta))
    else:
        from ..models.flux_dit import infer_dit_config
        config = infer_dit_config(_dit_converter(det.format)(meta))
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return config


def build_dit(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_dit import FluxDiT, bfl_key_to_internal
    dtype = options.dtype
    convert = _dit_converter(det.format)
    rename = {"bfl": bfl_key_to_internal, "diffsynth": lambda k: k}.get(det.format)  # per-key formats
    config = dit_config(det)
    refs, scale_refs, sd = load_tensors(det, options)
    # per-tensor scales survive renaming; the BFL final layer's halves swap would reorder per-row ones
    keep = lambda k, s: rename is not None and (s.numel() == 1 or not k.startswith("final_layer.adaLN"))  # noqa: E731
    scales = apply_scales(sd, scale_refs, dtype, keep)
    quant = {k: r.extra for k, r in refs.items() if is_quantized(r.extra)}
    if quant and rename is None:  # fused diffusers projections: dequantize once at load
        for k, t in quant.items():
            sd[k] = dequantize(sd[k], t, dtype if dtype is not None else torch.float32).reshape(refs[k].shape)
        quant = {}
    sd = convert(sd)
    return {"dit": assign(FluxDiT, config, sd, f"FLUX DiT from {det.source}",
                          quantized={rename(k): t for k, t in quant.items()},
                          scales={rename(k): s for k, s in scales.items()})}


def build_vae(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_vae import FluxVAEDecoder, FluxVAEEncoder, infer_vae_config, vae_from_bfl, vae_from_diffusers
    sd = plain_tensors(det, options)
    enc, dec = (vae_from_bfl if det.format == "bfl" else vae_from_diffusers)(sd)
    out = {}
    if enc:
        out["vae_encoder"] = assign(FluxVAEEncoder, infer_vae_config(enc), enc, f"VAE encoder from {det.source}")
    if dec:
        out["vae_decoder"] = assign(FluxVAEDecoder, infer_vae_config(dec), dec, f"VAE decoder from {det.source}")
    return out


def _text_encoder(load, det: Detected, options: BuildOptions) -> nn.Module:
    # the tensors are already in their storage dtype (small ones precise under fp8): keep them
    sd = plain_tensors(det, options)
    return load(sd, det.config, None if options.dtype is not None else torch.float32).to(options.device)


def build_clip(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_text_encoders import load_clip_text_encoder
    return {"text_encoder_1": _text_encoder(load_clip_text_encoder, det, options)}


def build_t5(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_text_encoders import load_t5_encoder
    return {"text_encoder_2": _text_encoder(load_t5_encoder, det, options)}


def build_controlnet(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_controlnet import (FluxControlNet, controlnet_from_diffusers, controlnet_from_xlabs,
                                          infer_controlnet_config)
    convert = controlnet_from_xlabs if det.format == "xlabs" else controlnet_from_diffusers
    sd = convert(plain_tensors(det, options))
    config = infer_controlnet_config(sd)
    if det.config and "axes_dims_rope" in det.config:
        config.axes_dim = tuple(det.config["axes_dims_rope"])
    return {"controlnet": assign(FluxControlNet, config, sd, f"FLUX ControlNet from {det.source}")}


def build_siglip(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.siglip import SiglipImageEncoder, load_siglip_vision
    sd = plain_tensors(det, options)  # storage dtype already (small tensors precise under fp8)
    return {"image_encoder": SiglipImageEncoder(load_siglip_vision(sd, det.config)).to(options.device)}


def build_timestep_lora(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_timestep_lora import FluxTimestepLoRA, from_file, infer_timestep_lora_config
    sd = plain_tensors(det, options)
    config = infer_timestep_lora_config({k: tuple(v.shape) for k, v in sd.items()})
    return {"timestep_lora": assign(FluxTimestepLoRA, config, from_file(sd), f"timestep LoRA from {det.source}")}


def build_redux(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_redux import ReduxImageEncoder, infer_redux_config
    sd = plain_tensors(det, options)
    return {"redux": assign(ReduxImageEncoder, infer_redux_config(sd), sd, f"FLUX.1-Redux embedder from {det.source}")}


def build_ipadapter(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_ipadapter import FluxIpAdapter, infer_ipadapter_config, ipadapter_from_xlabs
    sd = plain_tensors(det, options)
    if det.format == "xlabs":
        sd = ipadapter_from_xlabs(sd)
    config = infer_ipadapter_config(det.format, {k: tuple(v.shape) for k, v in sd.items()})
    return {"ipadapter": assign(FluxIpAdapter, config, sd, f"{det.format} IP-Adapter from {det.source}")}


def build_clip_vision(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.clip_vision import load_clip_vision
    return {"image_encoder": load_clip_vision(plain_tensors(det, options), det.config, options.device)}


def build_lora_encoder(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_lora_encoder import FluxLoRAEncoder, infer_lora_encoder_config
    sd = plain_tensors(det, options)
    config = infer_lora_encoder_config({k: tuple(v.shape) for k, v in sd.items()})
    return {"lora_encoder": assign(FluxLoRAEncoder, config, sd, f"LoRA-Encoder from {det.source}")}


def build_value_controller(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_value_control import ValueController, infer_value_controller_config
    sd = plain_tensors(det, options)
    config = infer_value_controller_config({k: tuple(v.shape) for k, v in sd.items()})
    return {"value_controller": assign(ValueController, config, sd, f"value controller from {det.source}")}


def build_lora_patcher(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_lora_patcher import FluxLoraPatcher, infer_patcher_layers
    sd = plain_tensors(det, options)
    layers = infer_patcher_layers({k: tuple(v.shape) for k, v in sd.items()})
    return {"lora_patcher": assign(FluxLoraPatcher, layers, sd, f"LoRA-Fusion patcher from {det.source}")}


def _qwen(det: Detected, options: BuildOptions, load, name: str) -> dict[str, nn.Module]:
    """A Qwen2.5-VL-based model from its HF folder; the processor (tokenizer, image processor, chat template)
    rides along as `<model>.processor`: from `options.processor_dir`, else from the weights' folder, else from
    its `processor/` subfolder (Nexus-GenV2's layout)."""
    from pathlib import Path
    from ..models.qwen_vl import QwenVLProcessor
    folder = Path(next(iter(det.refs.values())).path).parent
    if options.processor_dir is not None:
        folder = Path(options.processor_dir)
    elif not (folder / "preprocessor_config.json").is_file() and (folder / "processor").is_dir():
        folder = folder / "processor"
    processor = QwenVLProcessor.from_folder(folder)  # first: a folder without it fails before any weight is read
    probe = options.compute_dtype if options.dtype in FP8_DTYPES else None
    model = load(plain_tensors(det, options), det.config, f"{det.family} from {det.source}", probe)
    model.processor = processor
    return {name: model}


def build_qwenvl(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.qwen_vl import load_qwen_vl
    return _qwen(det, options, load_qwen_vl, "qwenvl")


def build_nexus_gen_llm(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.nexus_gen import load_nexus_llm
    return _qwen(det, options, load_nexus_llm, "nexus_gen")


def build_nexus_gen_decoder(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    """generation_decoder.bin / edit_decoder.bin: the fine-tuned DiT (`pipe.dit.*`, our layout) and its adapter."""
    from dataclasses import replace
    from ..models.nexus_gen import NexusGenAdapter, NexusGenMerger, infer_merger_config
    dit = build_dit(replace(det, family="flux-dit", format="diffsynth",
                            refs={k[len("pipe.dit."):]: r for k, r in det.refs.items() if k.startswith("pipe.dit.")}),
                    options)
    prefix = "adapter." if det.format == "generation" else "embedding_merger."
    part = replace(det, refs={k[len(prefix):] if prefix != "adapter." else k: r
                              for k, r in det.refs.items() if k.startswith(prefix)})
    sd = plain_tensors(part, options)
    if det.format == "generation":
        w = sd["adapter.0.weight"]
        return {**dit, "nexus_gen_generation_adapter": assign(
            lambda _: NexusGenAdapter(w.shape[1], w.shape[0]), None, sd, f"Nexus-Gen adapter from {det.source}")}
    return {**dit, "nexus_gen_editing_adapter": assign(NexusGenMerger, infer_merger_config(sd), sd,
                                                       f"Nexus-Gen merger from {det.source}")}


def build_step1x(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    """Step1X-Edit's single file: the DiT (BFL layout) and the connector (`connector.*`)."""
    from dataclasses import replace
    from ..models.step1x import Step1XConnector, infer_connector_config
    dit_refs = {k: r for k, r in det.refs.items() if not k.startswith("connector.")}
    conn = replace(det, refs={k[len("connector."):]: r for k, r in det.refs.items() if k.startswith("connector.")})
    sd = plain_tensors(conn, options)
    connector = assign(Step1XConnector, infer_connector_config(sd), sd, f"Step1X connector from {det.source}")
    return {**build_dit(replace(det, family="flux-dit", refs=dit_refs), options), "step1x_connector": connector}


def build_infiniteyou_projector(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux_infiniteyou import InfiniteYouProjector, infer_projector_config, projector_from_file
    sd = projector_from_file(plain_tensors(det, options))
    config = infer_projector_config({k: tuple(v.shape) for k, v in sd.items()})
    model = assign(InfiniteYouProjector, config, sd, f"InfiniteYou projector from {det.source}")
    model.source = det.source
    return {"image_proj_model": model}


def build_flux2_vae(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux2_vae import BATCH_NORM_EPS, Flux2VAEDecoder, Flux2VAEEncoder, flux2_vae_parts, vae_config
    eps = float((det.config or {}).get("batch_norm_eps", BATCH_NORM_EPS))
    enc, dec = flux2_vae_parts(plain_tensors(det, options), det.format)
    return {"vae_encoder": assign(lambda c: Flux2VAEEncoder(c, eps), vae_config(enc), enc,
                                  f"FLUX.2 VAE encoder from {det.source}"),
            "vae_decoder": assign(lambda c: Flux2VAEDecoder(c, eps), vae_config(dec), dec,
                                  f"FLUX.2 VAE decoder from {det.source}")}


def build_qwen3(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux2_text_encoder import load_qwen3
    model = load_qwen3(plain_tensors(det, options), det.config, f"Qwen3 from {det.source}")
    return {"text_encoder_qwen3": model.to(options.device)}


def build_mistral(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    from ..models.flux2_text_encoder import load_mistral
    model = load_mistral(plain_tensors(det, options), det.config, f"Mistral from {det.source}")
    return {"text_encoder_mistral": model.to(options.device)}


def _flux2_converter(fmt: str):
    from ..models.flux2_dit import dit_from_bfl, dit_from_diffusers
    return {"bfl": dit_from_bfl, "diffusers": dit_from_diffusers}[fmt]


def build_flux2_dit(det: Detected, options: BuildOptions) -> dict[str, nn.Module]:
    """FLUX.2 DiT from diffusers' layout (our names) or BFL's; scaled-fp8 scales and GGUF blocks stay as
    stored except on BFL's fused q/k/v, which are split (and so dequantized / folded once here)."""
    from ..models.flux2_dit import Flux2DiT, bfl_key_to_internal
    rename = bfl_key_to_internal if det.format == "bfl" else (lambda k: k)
    config = dit_config(det)
    refs, scale_refs, sd = load_tensors(det, options)
    # per-tensor scales survive renaming; the BFL final layer's halves swap would reorder per-row ones
    keep = lambda k, s: rename(k) is not None and (s.numel() == 1 or not k.startswith("final_layer.adaLN"))  # noqa: E731
    scales = apply_scales(sd, scale_refs, options.dtype, keep)
    quant = {k: r.extra for k, r in refs.items() if is_quantized(r.extra)}
    for k in [k for k in quant if rename(k) is None]:
        dtype = options.dtype if options.dtype is not None else torch.float32
        sd[k] = dequantize(sd[k], quant.pop(k), dtype).reshape(refs[k].shape)
    sd = _flux2_converter(det.format)(sd)
    return {"dit": assign(Flux2DiT, config, sd, f"FLUX.2 DiT from {det.source}",
                          quantized={rename(k): t for k, t in quant.items()},
                          scales={rename(k): s for k, s in scales.items()})}
