"""Nexus-Gen (V2): the autoregressive Qwen2.5-VL's 81 image embeddings become the positive branch's DiT text tokens.

Generation (no `nexus_gen_reference_image`; needs generation_decoder.bin): the generation adapter maps them to
81 tokens with zero ids. Editing (`nexus_gen_reference_image`, needs edit_decoder.bin): the merger combines
them with the reference image's vision embeddings; their ids place each token on the latent grid. CLIP still
gives the pooled vector, and the negative branch keeps the CLIP/T5 encoding of the negative prompt.
"""
from __future__ import annotations


from ...models.nexus_gen import editing_text_ids, nexus_gen_embeddings
from ...ops.images import check_image
from ..units import unit

OUTPUTS = ("prompt_emb", "text_ids")


def _is_nexus_gen(pipe) -> bool:
    return pipe.nexus_gen is not None


@unit(both_branches=True, models=("nexus_gen", "nexus_gen_generation_adapter", "nexus_gen_editing_adapter"),
      outputs=OUTPUTS, model_inputs=OUTPUTS, active=_is_nexus_gen, image_inputs=("nexus_gen_reference_image",),
      needs=OUTPUTS)  # replaces the positive branch's tokens: after the prompt encoder
def encode_nexus_gen_prompt(pipe, branches, noise, nexus_gen_reference_image=None):
    """Positive branch: the Nexus-Gen tokens replace the T5 ones (the negative branch keeps its own)."""
    if not _is_nexus_gen(pipe):  # run outside `active_units` (a no-op for other pipelines)
        return [{} for _ in branches]
    reference = nexus_gen_reference_image
    if reference is not None:
        check_image(reference, "nexus_gen_reference_image")
    adapter = pipe.nexus_gen_generation_adapter if reference is None else pipe.nexus_gen_editing_adapter
    if adapter is None:
        needed = "generation_decoder.bin" if reference is None else "edit_decoder.bin"
        raise RuntimeError(f"Nexus-Gen {'generation' if reference is None else 'editing'} needs {needed} "
                           "(its DiT and adapter) in model_configs")
    device = pipe.compute_device_of("nexus_gen")
    out = nexus_gen_embeddings(pipe.nexus_gen, pipe.nexus_gen.processor, branches[0]["prompt"], reference, device,
                               pipe.torch_dtype)
    b, _, h, w = noise.shape
    if reference is None:
        emb = adapter(out.embeds[None].to(pipe.device, pipe.torch_dtype))
        ids = emb.new_zeros(emb.shape[0], emb.shape[1], 3)
    else:
        emb = adapter(out.embeds[None].to(pipe.device, pipe.torch_dtype), out.grids[1],
                      out.ref_embeds[None].to(pipe.device, pipe.torch_dtype), out.grids[0])
        ids = editing_text_ids(h, w, out.grids[1], out.grids[0], device=pipe.device)
    posi = {"prompt_emb": emb.repeat(b, 1, 1), "text_ids": ids.repeat(b, 1, 1).float()}
    return [posi] + [{} for _ in branches[1:]]


UNITS = [encode_nexus_gen_prompt]
