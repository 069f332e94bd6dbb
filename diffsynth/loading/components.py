"""The component table: every model the pipeline can hold, and every kind of checkpoint file.

Two small tables, read by the registry (detection and building), VRAM management (groups), training
(trainable names, aliases), the CLI and the pipeline (attributes, in-loop models):

* `COMPONENTS`: pipeline attributes (`dit`, `text_encoder_1`, `controlnet`, ...), how they run.
* `FAMILIES`: checkpoint kinds (`flux-dit`, `flux-vae`, `clip`, ...), how a file of that kind is
  recognised from its keys and shapes, what it builds and which attributes it fills.

Adding a model = its model file + one `Family` entry (+ a `Component` when it fills a new attribute)
+ its pipeline units. Families whose loader does not exist yet are still recognised (build=None), so
that such a file is reported as what it is instead of being misread as another model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..ops.files import TensorRef

Refs = Mapping[str, TensorRef]


@dataclass(frozen=True)
class Component:
    """A pipeline attribute holding a model."""
    name: str
    vram_group: str             # models of one group run together and share the VRAM budget in turn
    in_loop: bool = False       # runs inside the denoising loop: handed to model_fn, on the device then
    trainable: bool = True      # may be named in --trainable_models / --lora_base_model
    many: bool = False          # holds several models (a list in load order), e.g. ControlNets
    activation: str = ""        # activation estimate kind for the VRAM planner ("dit", "vae", "text")
    aliases: tuple[str, ...] = ()
    label: str = ""             # how errors name it when it is missing, with the file that usually holds it

    def describe(self) -> str:
        return self.label or f"the {self.name} model"


@dataclass(frozen=True)
class Family:
    """A kind of checkpoint file."""
    name: str
    description: str
    detect: Callable[[Refs], str | None]           # the layout ("bfl", "diffusers", ...) or None
    components: Callable[[Refs], tuple[str, ...]]  # the attributes a detected file fills
    build: Callable | None = None                  # (Detected, BuildOptions) -> {attribute: module}
    # Prefix under which this family sits inside a multi-model (ComfyUI) file.
    bundle_prefixes: tuple[str, ...] = ()
    # Large weight matrices that tolerate reduced-precision storage (fp8): the CLI's --offload-dtype applies
    # to files holding only such families; the VAE and CLIP stay in the compute dtype.
    low_precision_storage: bool = False
    # Renames a detected file's keys into the one layout the builder reads (e.g. CLIP without `text_model.`).
    normalize: Callable[[Refs], Refs] | None = None
    # The pipeline family that loads it: "flux" (FluxImagePipeline) or "flux2" (Flux2ImagePipeline).
    pipeline: str = "flux"


def has_prefix(keys, *prefixes: str) -> bool:
    return any(k.startswith(p) for p in prefixes for k in keys)


def has_key(keys, *names: str) -> bool:
    return any(n in keys for n in names)


def fills(*names: str) -> Callable[[Refs], tuple[str, ...]]:
    return lambda refs: names


# ----------------------------------------------------------------------------- detectors

_CONTROL_MARKERS = ("controlnet_", "input_hint_block.")


def _no_control(keys) -> bool:
    return not any(k.startswith(_CONTROL_MARKERS) or ".controlnet_" in k for k in keys)


_FLUX2_MODULATION = ("double_stream_modulation_img.", "single_stream_modulation.")


def detect_flux_dit(refs: Refs) -> str | None:
    keys = refs.keys()
    if not _no_control(keys) or has_prefix(keys, "ip_adapter", "redux_", *_FLUX2_MODULATION):
        return None
    if has_prefix(keys, "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        return None if has_prefix(keys, "double_blocks.0.processor.") else "bfl"
    if "x_embedder.weight" in keys and has_prefix(keys, "transformer_blocks.", "single_transformer_blocks."):
        return "diffusers"
    if "x_embedder.weight" in keys and has_prefix(keys, "blocks.0.attn.a_to_qkv", "single_blocks.0.to_qkv_mlp"):
        return "diffsynth"
    return None


def _vae_layout(keys) -> str | None:
    if has_prefix(keys, "encoder.down.0.block.0.", "decoder.up.0.block.0."):
        return "bfl"
    if has_prefix(keys, "encoder.down_blocks.0.resnets.0.", "decoder.up_blocks.0.resnets.0."):
        return "diffusers"
    return None


def detect_flux2_vae(refs: Refs) -> str | None:
    """FLUX.2's VAE: FLUX.1's layout plus the batch-norm statistics of its patchified latents."""
    keys = refs.keys()
    return _vae_layout(keys) if "bn.running_mean" in keys and "bn.running_var" in keys else None


def detect_flux2_dit(refs: Refs) -> str | None:
    """FLUX.2's DiT: modulation shared by all blocks (FLUX.1 modulates inside each block), in BFL's names
    (`*.lin`, `double_blocks.N.img_attn.qkv`) or diffusers' (`*.linear`, `transformer_blocks.N.attn.to_q`)."""
    keys = refs.keys()
    if has_key(keys, "double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight") and \
            has_prefix(keys, "double_blocks.", "single_blocks."):
        return "bfl"
    if has_key(keys, "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight") and \
            has_prefix(keys, "transformer_blocks.", "single_transformer_blocks."):
        return "diffusers"
    return None


def detect_flux_vae(refs: Refs) -> str | None:
    keys = refs.keys()
    return None if has_prefix(keys, "bn.running_") else _vae_layout(keys)  # with statistics: FLUX.2's


def vae_parts(refs: Refs) -> tuple[str, ...]:
    keys = refs.keys()
    return tuple(c for c, p in (("vae_encoder", "encoder."), ("vae_decoder", "decoder.")) if has_prefix(keys, p))


def detect_clip(refs: Refs) -> str | None:
    """HF CLIPTextModel, with the `text_model.` level (transformers 4) or without it (transformers 5)."""
    from ..models.flux_text_encoders import is_clip_text_state
    return "hf" if is_clip_text_state(refs.keys()) else None


def canonical_clip(refs: Refs) -> Refs:
    from ..models.flux_text_encoders import canonical_clip_keys
    return canonical_clip_keys(refs)


def detect_qwen3(refs: Refs) -> str | None:
    """Qwen3 language model (FLUX.2 [klein]'s text encoder), keys without the `model.` level."""
    from ..models.flux2_text_encoder import is_qwen3_state
    return "hf" if is_qwen3_state(refs.keys()) else None


def detect_mistral3(refs: Refs) -> str | None:
    """Mistral3ForConditionalGeneration (FLUX.2 [dev]'s text encoder): a Mistral decoder under the language-model
    prefix of transformers 4.x or 5, whatever else the file holds (vision tower, projector)."""
    from ..models.flux2_text_encoder import mistral3_prefix
    return "hf" if mistral3_prefix(refs.keys()) is not None else None


def mistral3_language_model(refs: Refs) -> Refs:
    from ..models.flux2_text_encoder import mistral3_language_model as language_model
    return language_model(refs)


def detect_t5(refs: Refs) -> str | None:
    return "hf" if has_prefix(refs.keys(), "encoder.block.0.layer.0.SelfAttention.q") else None


def detect_diffusers_controlnet(refs: Refs) -> str | None:
    """diffusers FluxControlNetModel (InstantX Union, alimama Inpainting, jasperai Upscaler, ...)."""
    keys = refs.keys()
    if "controlnet_x_embedder.weight" in keys or has_prefix(keys, "controlnet_blocks.0.", "controlnet_single_blocks."):
        if has_prefix(keys, "transformer_blocks.", "single_transformer_blocks.", "x_embedder."):
            return "diffusers"
    return None


def detect_xlabs_controlnet(refs: Refs) -> str | None:
    keys = refs.keys()
    if has_prefix(keys, "input_hint_block.") and has_prefix(keys, "controlnet_blocks.", "double_blocks."):
        return "xlabs"
    return None


def detect_ipadapter(refs: Refs) -> str | None:
    keys = refs.keys()
    if any(k.startswith("ip_adapter.") and ".to_k_ip." in k for k in keys):
        return "instantx"  # ip-adapter.bin (nested ip_adapter/image_proj dicts) or its flat safetensors form
    if has_prefix(keys, "ip_adapter_proj_model.") or any(".ip_adapter_double_stream_" in k for k in keys):
        return "xlabs"
    return None


def detect_infiniteyou_projector(refs: Refs) -> str | None:
    """InfiniteYou's image_proj_model.bin: a Perceiver resampler under `image_proj.` (no IP-Adapter layers)."""
    keys = refs.keys()
    for prefix in ("image_proj.", ""):
        if has_key(keys, prefix + "latents") and has_key(keys, prefix + "proj_in.weight") and \
                has_prefix(keys, prefix + "layers.0.0.to_kv.") and not has_prefix(keys, "ip_adapter."):
            return "infiniteyou"
    return None


def detect_lora_encoder(refs: Refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if has_key(keys, "special_embeds") and has_prefix(keys, "embedder.model_dict.") else None


def detect_value_controller(refs: Refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if "positional_embedding" in keys and "prefer_value_embedder.0.weight" in keys else None


def detect_lora_patcher(refs: Refs) -> str | None:
    keys = refs.keys()
    return "diffsynth" if any(k.startswith("model_dict.") and k.endswith(".weight_cross") for k in keys) else None


def detect_timestep_lora(refs: Refs) -> str | None:
    """DiffSynth-Studio's timestep LoRA: PEFT names with per-layer timestep modulation (`lora_time_gamma`)."""
    return "peft" if any(k.startswith("base_model.model.") and ".lora_time_gamma." in k for k in refs.keys()) else None


def detect_redux(refs: Refs) -> str | None:
    return "bfl" if has_key(refs.keys(), "redux_up.weight") and has_key(refs.keys(), "redux_down.weight") else None


def detect_siglip(refs: Refs) -> str | None:
    """A SigLIP vision tower: alone (`vision_model.*`, or unnested as transformers 5 saves it) or inside a
    whole SiglipModel (text tower beside it). CLIP's vision tower has a class token; SigLIP's has none."""
    keys = refs.keys()
    for p in ("vision_model.", ""):
        if has_key(keys, f"{p}embeddings.patch_embedding.weight") and \
                has_prefix(keys, f"{p}encoder.layers.0.self_attn.q_proj.") and \
                not has_key(keys, f"{p}embeddings.class_embedding"):
            return "hf"
    return None


def detect_clip_vision(refs: Refs) -> str | None:
    """CLIPVisionModelWithProjection weights (alone or inside a full CLIPModel file)."""
    keys = refs.keys()
    return "hf" if has_key(keys, "vision_model.embeddings.class_embedding") and \
        has_key(keys, "visual_projection.weight") else None


def detect_step1x(refs: Refs) -> str | None:
    """Step1X-Edit's single file: a BFL-layout DiT and its Qwen connector (`connector.*`)."""
    keys = refs.keys()
    if has_prefix(keys, "connector.S.input_embedder.") and has_prefix(keys, "double_blocks.0.img_attn.qkv"):
        return "bfl"
    return None


def detect_nexus_gen_llm(refs: Refs) -> str | None:
    """Nexus-Gen's autoregressive Qwen2.5-VL: Qwen keys plus `image_prefill_embeds` and `vision_head`."""
    keys = refs.keys()
    return "hf" if has_key(keys, "image_prefill_embeds.weight") and detect_qwen_vl(refs) else None


def detect_nexus_gen_decoder(refs: Refs) -> str | None:
    """Nexus-Gen's generation_decoder.bin / edit_decoder.bin: a DiT (`pipe.dit.*`) and its adapter."""
    keys = refs.keys()
    if not has_prefix(keys, "pipe.dit."):
        return None
    return "generation" if has_prefix(keys, "adapter.") else "editing" if has_prefix(keys, "embedding_merger.") else None


def nexus_gen_decoder_parts(refs: Refs) -> tuple[str, ...]:
    adapter = "nexus_gen_generation_adapter" if has_prefix(refs.keys(), "adapter.") else "nexus_gen_editing_adapter"
    return ("dit", adapter)


def detect_qwen_vl(refs: Refs) -> str | None:
    keys = refs.keys()
    vision = has_prefix(keys, "visual.patch_embed.", "model.visual.patch_embed.")
    text = has_prefix(keys, "model.layers.0.self_attn.", "model.language_model.layers.0.self_attn.")
    return "hf" if vision and text else None


# ----------------------------------------------------------------------------- the tables

COMPONENTS: tuple[Component, ...] = (
    Component("dit", "denoise", in_loop=True, activation="dit", label="the FLUX DiT (flux1-dev.safetensors)"),
    Component("text_encoder_1", "text", activation="text", aliases=("text_encoder",),
              label="the CLIP text encoder (text_encoder/model.safetensors)"),
    Component("text_encoder_2", "text", activation="text", label="the T5 text encoder (text_encoder_2/)"),
    Component("vae_encoder", "vae_encoder", activation="vae", label="the VAE encoder (ae.safetensors)"),
    Component("vae_decoder", "vae_decoder", activation="vae", label="the VAE decoder (ae.safetensors)"),
    # ControlNets run with the DiT at every step: on the device together, offloaded after denoising.
    Component("controlnet", "denoise", in_loop=True, many=True, activation="dit"),
    Component("ipadapter", "denoise", in_loop=True),
    Component("image_encoder", "image_encoder", activation="text", aliases=("siglip",)),
    Component("redux", "image_encoder", activation="text"),
    Component("image_proj_model", "image_encoder"),                 # InfiniteYou: face embedding -> id tokens
    Component("lora_encoder", "prompt_tokens"),
    Component("value_controller", "prompt_tokens", many=True),
    Component("lora_patcher", "denoise", in_loop=True),
    Component("timestep_lora", "denoise", in_loop=True, trainable=False),  # hooks DiT layers per evaluation
    Component("text_encoder_qwen3", "text", activation="text"),     # FLUX.2 [klein]'s Qwen3 prompt encoder
    Component("text_encoder_mistral", "text", activation="text"),   # FLUX.2 [dev]'s Mistral-Small-3 prompt encoder
    Component("qwenvl", "text", activation="text"),                 # Qwen2.5-VL prompt encoder (Step1X, Nexus-Gen)
    Component("step1x_connector", "denoise", in_loop=True),         # per-step: conditioned on the timestep
    Component("nexus_gen", "text", activation="text"),              # Nexus-Gen's autoregressive Qwen2.5-VL
    Component("nexus_gen_generation_adapter", "text"),
    Component("nexus_gen_editing_adapter", "text"),
)


def _builders():
    from . import builders
    return builders


def _lazy(name: str) -> Callable:
    """A builder of `loading.builders`, looked up at call time (builders import the models)."""
    return lambda det, options: getattr(_builders(), name)(det, options)


FAMILIES: tuple[Family, ...] = (
    # Recognised before the DiT so that files which also carry DiT-like blocks are never misread.
    Family("flux-controlnet", "FLUX ControlNet (diffusers layout)", detect_diffusers_controlnet, fills("controlnet"),
           _lazy("build_controlnet")),
    Family("xlabs-controlnet", "XLabs FLUX ControlNet", detect_xlabs_controlnet, fills("controlnet"),
           _lazy("build_controlnet")),
    Family("flux-ipadapter", "FLUX IP-Adapter (InstantX or XLabs)", detect_ipadapter, fills("ipadapter"),
           _lazy("build_ipadapter")),
    Family("flux-lora-encoder", "FLUX LoRA-Encoder", detect_lora_encoder, fills("lora_encoder"),
           _lazy("build_lora_encoder")),
    Family("flux-value-controller", "FLUX AttriCtrl value controller", detect_value_controller,
           fills("value_controller"), _lazy("build_value_controller")),
    Family("flux-lora-patcher", "FLUX LoRA-Fusion patcher", detect_lora_patcher, fills("lora_patcher"),
           _lazy("build_lora_patcher")),
    Family("flux-timestep-lora", "FLUX timestep LoRA", detect_timestep_lora, fills("timestep_lora"),
           _lazy("build_timestep_lora")),
    Family("flux-redux", "FLUX.1-Redux image embedder", detect_redux, fills("redux"), _lazy("build_redux")),
    Family("infiniteyou-projector", "InfiniteYou image projector", detect_infiniteyou_projector,
           fills("image_proj_model"), _lazy("build_infiniteyou_projector")),
    Family("siglip", "SigLIP vision encoder", detect_siglip, fills("image_encoder"), _lazy("build_siglip")),
    Family("clip-vision", "CLIP vision encoder", detect_clip_vision, fills("image_encoder"),
           _lazy("build_clip_vision")),
    Family("nexus-gen-llm", "Nexus-Gen autoregressive Qwen2.5-VL", detect_nexus_gen_llm, fills("nexus_gen"),
           _lazy("build_nexus_gen_llm")),
    Family("nexus-gen-decoder", "Nexus-Gen decoder (DiT + adapter)", detect_nexus_gen_decoder, nexus_gen_decoder_parts,
           _lazy("build_nexus_gen_decoder")),
    Family("qwen2.5-vl", "Qwen2.5-VL", detect_qwen_vl, fills("qwenvl"), _lazy("build_qwenvl")),
    Family("step1x", "Step1X-Edit DiT + connector", detect_step1x, fills("dit", "step1x_connector"),
           _lazy("build_step1x")),
    Family("flux2-dit", "FLUX.2 DiT", detect_flux2_dit, fills("dit"), _lazy("build_flux2_dit"),
           bundle_prefixes=("model.diffusion_model.",), low_precision_storage=True, pipeline="flux2"),
    Family("flux-dit", "FLUX DiT", detect_flux_dit, fills("dit"), _lazy("build_dit"),
           bundle_prefixes=("model.diffusion_model.",), low_precision_storage=True),
    Family("flux2-vae", "FLUX.2 VAE", detect_flux2_vae, vae_parts, _lazy("build_flux2_vae"),
           pipeline="flux2"),
    Family("flux-vae", "FLUX VAE", detect_flux_vae, vae_parts, _lazy("build_vae"),
           bundle_prefixes=("first_stage_model.", "vae.")),
    Family("clip", "CLIP-L text encoder", detect_clip, fills("text_encoder_1"), _lazy("build_clip"),
           bundle_prefixes=("text_encoders.clip_l.transformer.",), normalize=canonical_clip),
    Family("qwen3", "Qwen3 text encoder (FLUX.2 [klein])", detect_qwen3, fills("text_encoder_qwen3"),
           _lazy("build_qwen3"), low_precision_storage=True, pipeline="flux2"),
    Family("mistral3", "Mistral-Small-3 text encoder (FLUX.2 [dev])", detect_mistral3, fills("text_encoder_mistral"),
           _lazy("build_mistral"), low_precision_storage=True, normalize=mistral3_language_model, pipeline="flux2"),
    Family("t5", "T5 text encoder", detect_t5, fills("text_encoder_2"), _lazy("build_t5"),
           bundle_prefixes=("text_encoders.t5xxl.transformer.",), low_precision_storage=True),
)

COMPONENT_BY_NAME = {c.name: c for c in COMPONENTS}
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
ALIASES = {a: c.name for c in COMPONENTS for a in c.aliases}


def component(name: str) -> Component:
    name = ALIASES.get(name, name)
    if name not in COMPONENT_BY_NAME:
        raise KeyError(f"{name!r} is not a model of the pipeline; known: {', '.join(COMPONENT_BY_NAME)}")
    return COMPONENT_BY_NAME[name]


def in_loop_names() -> tuple[str, ...]:
    return tuple(c.name for c in COMPONENTS if c.in_loop)


def vram_groups() -> tuple[tuple[str, ...], ...]:
    """Component names grouped by `vram_group`, in table order."""
    groups: dict[str, list[str]] = {}
    for c in COMPONENTS:
        groups.setdefault(c.vram_group, []).append(c.name)
    return tuple(tuple(g) for g in groups.values())

