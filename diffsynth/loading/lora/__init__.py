"""LoRA for the FLUX DiTs (FLUX.1, FLUX.2): read the common file dialects into one canonical form, apply it,
export it. Key names are resolved with the target DiT's `DiTNaming` (`FLUX1`, `FLUX2`; `naming_for(dit)`),
so one set of dialect rules serves both families.

Canonical form (`CanonicalLoRA`):

* ``layers``: internal DiT module name (``blocks.0.attn.a_to_qkv``) -> `LoRAWeights`
  (``down`` (r, in), ``up`` (out, r), ``alpha`` or None, optional ``bias_up`` (out,));
* ``norm_weights``: internal parameter name -> full replacement tensor (BFL Control-LoRA RMSNorm scales);
* ``te_layers``: CLIP text-encoder module name (HF ``text_model.encoder.layers.N.self_attn.q_proj``) -> `LoRAWeights`.

One layer's update is ``W += strength * scale * up @ down`` and ``bias += strength * scale * bias_up``
with ``scale = alpha / rank`` (alpha defaults to the rank, so scale 1). Every layer keeps its own alpha.

Dialects read by `convert_lora` (names from `detect_dialect`):

=============  ==================================================================================
kohya          ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up`` / ``.alpha``;
               CLIP ``lora_te1_*`` / ``lora_te_*``
onetrainer     ``lora_transformer_<diffusers path with _>.lora_down.weight`` (+ ``lora_te1_*``)
comfyui        ``diffusion_model.<BFL key>.lora_down|lora_A...``; CLIP ``text_encoders.clip_l.transformer.*``
peft           diffusers ``transformer.<diffusers path>.lora_A.weight`` (+ ``.alpha`` or header metadata),
               CLIP ``text_encoder.*``; ``diffusers`` is the same without the ``transformer.`` prefix
xlabs          ``double_blocks.0.processor.qkv_lora1.down.weight`` ... (no alpha)
bfl_control    bare BFL keys with ``lora_A/lora_B`` (+ ``lora_B.bias``) and full ``query_norm.scale`` /
               ``key_norm.scale``; its ``img_in`` may be wider than the model's ``x_embedder``
               (`widen_linear_input`). ``bfl`` is the same without the norms.
fal_kontext    ``base_model.model.<BFL key>.lora_A.weight``
diffsynth      internal names: ``blocks.0.attn.a_to_qkv.lora_A.default.weight`` or ``.lora_A.weight``,
               optionally prefixed ``pipe.dit.``
=============  ==================================================================================

FLUX.2 (internal names are diffusers' ``Flux2Transformer2DModel`` names, so ``peft``/``diffusers``/``diffsynth``
coincide): ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (PEFT, also ``base_model.model.``),
kohya ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` and ComfyUI / ai-toolkit
``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` with BFL names. A LoRA of BFL's fused double-block
``qkv`` becomes exact LoRAs of the separate ``to_q/to_k/to_v`` (shared down, row groups of up); kohya export fuses
them back block-diagonally.

Separate q/k/v (and single-block ``proj_mlp``) LoRAs are fused exactly into the fused internal layers (FLUX.1):
the downs are stacked along the rank, the up is block-diagonal (absent parts are zero blocks) and each
part's alpha/rank is folded into its block, so the fused layer has ``alpha=None``.
"""
from __future__ import annotations

from .apply import apply_lora, clear_lora, load_lora_into_pipeline, widen_linear_input
from .export import describe_lora, export_kohya, export_peft, save_lora
from .formats import (FLUX1, FLUX2, NAMINGS, CanonicalLoRA, DiTNaming, LoRAReport, LoRAWeights, convert_lora, detect_dialect,
                      lora_from_peft_model_state, naming_for, read_lora_file)

__all__ = [
    "LoRAWeights", "CanonicalLoRA", "LoRAReport", "detect_dialect", "convert_lora", "apply_lora", "clear_lora",
    "load_lora_into_pipeline", "widen_linear_input", "export_kohya", "export_peft", "save_lora",
    "read_lora_file", "lora_from_peft_model_state", "describe_lora", "DiTNaming", "FLUX1", "FLUX2", "NAMINGS", "naming_for",
]
