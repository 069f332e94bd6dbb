"""IP-Adapter (`ipadapter_images`, `ipadapter_scale`): reference images steer the generation through extra
keys/values in the DiT's attention (InstantX: SigLIP + every block; XLabs: CLIP + double blocks).

Several reference images are supported: their tokens are concatenated (every image query attends to all
of them). Under CFG the negative side gets the adapter too, at the same `ipadapter_scale` as the positive
side, fed a zero image embedding (InstantX) or the embedding of a black image (XLabs, as its authors and
diffusers do).
"""
from __future__ import annotations

import torch
from PIL import Image

from ...models.flux_ipadapter import check_fits, ip_attention
from ...models.flux_dit import merge_heads
from ..units import step_unit, unit
from ._images import image_list


def reference_images(ipadapter_images) -> list[Image.Image]:
    return image_list(ipadapter_images, "ipadapter_images")


@unit(both_branches=True, models=("image_encoder",), uses=("dit", "ipadapter"), outputs=("ipadapter_emb", "ipadapter_scale"),
      model_inputs=("ipadapter_emb", "ipadapter_scale"))
def encode_ipadapter_images(pipe, branches, ipadapter_images=None, ipadapter_scale=1.0, num_images=1):
    """Image embeddings (B, n_images, dim): the images' on the positive side, zeros on the negative one."""
    if ipadapter_images is None:
        if ipadapter_scale != 1.0:  # the default: any other value was meant to do something
            raise ValueError(f"ipadapter_scale={ipadapter_scale!r} is given without ipadapter_images: there is "
                             "nothing to scale (pass the reference images, or drop ipadapter_scale)")
        return [{} for _ in branches]
    if pipe.ipadapter is None:
        raise RuntimeError("ipadapter_images needs an IP-Adapter: add e.g. ModelConfig(model_id="
                           "'InstantX/FLUX.1-dev-IP-Adapter', origin_file_pattern='ip-adapter.bin') to model_configs")
    if pipe.image_encoder is None:
        raise RuntimeError("ipadapter_images needs the IP-Adapter's image encoder: add the SigLIP so400m "
                           "(InstantX) or CLIP ViT-L/14 (XLabs) vision model to model_configs")
    if not isinstance(ipadapter_scale, (int, float)):
        raise TypeError(f"ipadapter_scale must be a number, got {type(ipadapter_scale).__name__}")
    check_fits(pipe.ipadapter, pipe.dit)
    images = reference_images(ipadapter_images)
    device = pipe.compute_device_of("image_encoder")
    emb = pipe.image_encoder(images, device, pipe.torch_dtype)
    emb = emb.to(pipe.device, pipe.torch_dtype)[None].repeat(num_images, 1, 1)  # (B, n_images, dim)
    scale = float(ipadapter_scale)
    out = [{"ipadapter_emb": emb, "ipadapter_scale": scale}]
    if len(branches) > 1:
        if pipe.ipadapter.config.kind == "instantx":
            nega = torch.zeros_like(emb)
        else:
            black = pipe.image_encoder([Image.new("RGB", images[0].size)], device, pipe.torch_dtype)
            nega = black.to(emb)[None].expand_as(emb).clone()
        out.append({"ipadapter_emb": nega, "ipadapter_scale": scale})
    return out


@step_unit()
def ipadapter_attention(models, call, step_index, ipadapter_emb=None, ipadapter_scale=1.0):
    """InstantX: attention hooks on every block; XLabs: its output added after each double block."""
    if ipadapter_emb is None:
        return
    adapter, dit = models.ipadapter, models.dit
    kv = adapter.keys_values(adapter.tokens(ipadapter_emb), dit.config.num_heads)
    num_double = len(dit.blocks)

    def block_kv(kind: str, index: int, rows):
        i = adapter.block_index(kind, index, num_double)
        if i is None:
            return None
        k, v = kv[i]
        return (k, v) if rows is None else (k[rows], v[rows])

    if adapter.config.kind == "instantx":
        def hook(kind, index, q, rows):
            pair = block_kv(kind, index, rows)
            return None if pair is None else ip_attention(q, pair, ipadapter_scale)
        call.attention.append(hook)
        return
    after_block: dict[int, torch.Tensor] = {}
    batch, n_target = call.latents.shape[0], call.image_ids.shape[-2]

    def xlabs_hook(kind, index, q, rows):
        pair = block_kv(kind, index, rows)
        if pair is not None:  # image queries before RoPE; the DiT's own output is left as it is
            out = merge_heads(ip_attention(q, pair, ipadapter_scale))[:, :n_target]  # (b, N, hidden)
            if rows is not None:  # residuals are indexed by the running rows again: scatter to the batch
                out = out.new_zeros(batch, *out.shape[1:]).index_copy(0, rows, out)
            after_block[index] = out
        return None

    def xlabs_residual(kind, index):
        return after_block.pop(index, None) if kind == "double" else None
    call.attention.append(xlabs_hook)
    call.residuals.append(xlabs_residual)


UNITS = [encode_ipadapter_images, ipadapter_attention]
