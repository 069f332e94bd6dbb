"""Nexus-Gen (V2): a fine-tuned Qwen2.5-VL that "draws" 81 image embeddings, and the adapters that turn them into
the text tokens of a fine-tuned FLUX DiT.

Autoregressive pass (`nexus_gen_embeddings`): the chat [user: prompt (editing: after the reference image),
assistant: "Here is ...: <image>"] is run once with the answer's image slots filled by 81 learned embeddings
(`image_prefill_embeds`, a 9x9 grid of a 252x252 placeholder); the 81 outputs are `vision_head` of the hidden
states one position before each slot (next-token prediction).

Generation: `NexusGenAdapter` (Linear, LayerNorm, ReLU, Linear, LayerNorm) maps them to 81 DiT text tokens.
Editing: `NexusGenMerger` runs one Qwen2.5-VL decoder layer over [81 generated, reference image] embeddings
with mRoPE positions rescaled to a 72x72 grid (non-causal), then an RMSNorm/MLP projector to the DiT width;
the text ids place each token on the latent grid (reference: channel 0 = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image
from torch import nn

from .flux_dit import RMSNorm
from .flux_dit import build as build_flux_dit
from .decoder_lm import DecoderConfig, DecoderLayer
from .mrope import mrope_tables
from .qwen25_vision import smart_resize
from .qwen_vl import QwenVL, QwenVLProcessor, build_with_processor, load_qwen_vl
from .qwen_vl import detect as detect_qwen_vl
from ..ops.images import convert_image
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_key, has_prefix, plain_tensors

NUM_IMAGE_TOKENS = 81            # the 9x9 merged grid of the placeholder image
PLACEHOLDER_SIZE = 252           # 252 = 9 merged tokens x 28 pixels
EDIT_MAX_PIXELS = 262640         # the reference image is bounded to this many pixels first
IMAGE_MARK = "<image>"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
BASE_GRID = 72                   # merger positions are rescaled to a 72x72 grid


class NexusGenLLM(nn.Module):
    """Qwen2.5-VL (qwen_vl.QwenVL) plus Nexus-Gen's `vision_head` and `image_prefill_embeds`."""

    def __init__(self, qwen: QwenVL, vision_head: nn.Linear, image_prefill_embeds: nn.Embedding):
        super().__init__()
        self.qwen, self.vision_head, self.image_prefill_embeds = qwen, vision_head, image_prefill_embeds


def load_nexus_llm(state_dict: dict[str, torch.Tensor], config_dict, source: str, probe_dtype=None) -> NexusGenLLM:
    head = state_dict.pop("vision_head.weight")
    prefill = state_dict.pop("image_prefill_embeds.weight")
    qwen = load_qwen_vl(state_dict, config_dict, source, probe_dtype)
    with torch.device("meta"):
        vision_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        embeds = nn.Embedding(*prefill.shape)
    vision_head.load_state_dict({"weight": head}, assign=True)
    embeds.load_state_dict({"weight": prefill}, assign=True)
    return NexusGenLLM(qwen, vision_head, embeds).eval().requires_grad_(False)


def bound_image(image: Image.Image, processor: QwenVLProcessor, max_pixels: int = EDIT_MAX_PIXELS) -> Image.Image:
    """Resize to multiples of 28 within `max_pixels` (the reference image of an edit)."""
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=factor * factor * 4, max_pixels=max_pixels)
    return image.resize((w, h))


@dataclass
class NexusGenOutput:
    embeds: torch.Tensor            # (81, D) generated image embeddings
    ref_embeds: torch.Tensor | None  # (n, D) the reference image's vision embeddings (editing)
    grids: torch.Tensor             # (images, 3): [reference,] placeholder


def nexus_gen_embeddings(llm: NexusGenLLM, processor: QwenVLProcessor, prompt: str, reference: Image.Image | None,
                         device: torch.device, dtype: torch.dtype) -> NexusGenOutput:
    """One forward pass of the autoregressive model -> the 81 image embeddings (see the module docstring)."""
    placeholder = Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), (255, 255, 255))
    if reference is None:
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"Here is an image based on the description: {IMAGE_MARK}"}]
        images = [placeholder]
    else:
        instruction = prompt if IMAGE_MARK in prompt else f"{IMAGE_MARK} {prompt}"
        messages = [{"role": "user", "content": instruction},
                    {"role": "assistant", "content": f"Here is the image: {IMAGE_MARK}"}]
        images = [bound_image(convert_image(reference), processor), placeholder]
    text = processor.render(messages, add_generation_prompt=False).replace(IMAGE_MARK, VISION)
    vision = processor.images(images)
    ids = torch.tensor([processor.ids(processor.expand_image_tokens(text, vision["image_grid_thw"]))], device=device)
    qwen = llm.qwen
    image_mask = ids == qwen.config.image_token_id                       # (1, L)
    image_embeds = qwen.visual(vision["pixel_values"].to(device, dtype), vision["image_grid_thw"].to(device))
    # image_embeds: (n_ref + 81, D)
    n_in = image_embeds.shape[0] - NUM_IMAGE_TOKENS
    target = image_mask & (image_mask.cumsum(1) > n_in)                  # the placeholder's slots
    embeds = qwen.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((image_mask & ~target)[..., None], image_embeds[:n_in].to(embeds.dtype))
    prefill = llm.image_prefill_embeds(torch.arange(NUM_IMAGE_TOKENS, device=device))
    embeds = embeds.masked_scatter(target[..., None], prefill.to(embeds.dtype))
    mask = torch.ones_like(ids)
    positions = qwen.rope_index(ids, vision["image_grid_thw"].to(device), mask)
    hidden = qwen.run_language_model(embeds, positions, mask)
    predicted = llm.vision_head(hidden)[:, :-1][target[:, 1:]]         # position p-1 predicts slot p
    return NexusGenOutput(predicted, image_embeds[:n_in] if reference is not None else None,
                          vision["image_grid_thw"])


# ----------------------------------------------------------------------------- adapters

class NexusGenAdapter(nn.Module):
    def __init__(self, in_dim: int = 3584, out_dim: int = 4096):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU(),
                                     nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)


@dataclass
class MergerConfig:
    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    intermediate: int = 18944
    out_dim: int = 4096
    expand: int = 4
    theta: float = 1000000.0
    tokens_per_second: int = 2
    merge: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mrope_section(self) -> tuple[int, int, int]:
        """(16, 24, 24) for head_dim 128: 3/16 of the head each for height and width, the rest for time."""
        hw = 3 * self.head_dim // 16
        return (self.head_dim // 2 - 2 * hw, hw, hw)


def infer_merger_config(sd: dict[str, torch.Tensor]) -> MergerConfig:
    """From the shapes; head_dim 128 (Qwen2.5-VL), 12 below 256 wide (tiny test models)."""
    hidden = sd["layers.0.self_attn.q_proj.weight"].shape[0]
    head_dim = 128 if hidden >= 256 else 12
    return MergerConfig(hidden=hidden, heads=hidden // head_dim,
                        kv_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                        intermediate=sd["layers.0.mlp.gate_proj.weight"].shape[0],
                        out_dim=sd["projector.4.weight"].shape[0],
                        expand=sd["projector.1.weight"].shape[0] // sd["projector.4.weight"].shape[0])


class NexusGenMerger(nn.Module):
    """[generated, reference] embeddings -> DiT text tokens (file keys `embedding_merger.*`)."""

    def __init__(self, config: MergerConfig | None = None):
        super().__init__()
        self.config = c = config or MergerConfig()
        layer = DecoderConfig(vocab_size=0, hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=1,
                              num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
                              rope_theta=c.theta, qkv_bias=True, mrope_section=c.mrope_section, causal=False)
        self.layers = nn.ModuleList([DecoderLayer(layer)])  # a Qwen2.5-VL decoder layer, bidirectional
        wide = c.out_dim * c.expand
        self.projector = nn.Sequential(RMSNorm(c.hidden), nn.Linear(c.hidden, wide), RMSNorm(wide), nn.SiLU(),
                                       nn.Linear(wide, c.out_dim), RMSNorm(c.out_dim))

    def positions(self, grid: torch.Tensor) -> torch.Tensor:
        """(3, L) float positions of one image's merged tokens, rows/columns rescaled to the 72x72 base grid."""
        t, h, w = (int(v) for v in grid)
        gh, gw = h // self.config.merge, w // self.config.merge
        tt = (torch.arange(t) * self.config.tokens_per_second).repeat_interleave(gh * gw).float()
        hh = torch.arange(gh).repeat_interleave(gw).repeat(t) * (BASE_GRID / h)
        ww = torch.arange(gw).repeat(t * gh) * (BASE_GRID / w)
        return torch.stack([tt, hh.float(), ww.float()])

    def forward(self, embeds: torch.Tensor, grid: torch.Tensor, ref_embeds: torch.Tensor | None = None,
                ref_grid: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, 81, D) on `grid` (t, h, w) [+ ref_embeds (B, n, D) on ref_grid] -> (B, 81 [+ n], out_dim)."""
        positions, x = self.positions(grid), embeds
        if ref_embeds is not None:
            positions = torch.cat([positions, self.positions(ref_grid)], 1)
            x = torch.cat([embeds, ref_embeds.to(embeds.dtype)], 1)
        c = self.config
        cos, sin = mrope_tables(positions[:, None], c.head_dim, c.theta, c.mrope_section, x)  # (1, 1, L, head_dim)
        for layer in self.layers:
            x = layer(x, cos, sin, None)
        return self.projector(x)


def editing_text_ids(latent_h: int, latent_w: int, grid: torch.Tensor, ref_grid: torch.Tensor,
                     batch: int = 1, device=None) -> torch.Tensor:
    """(B, 81 + n, 3) ids of the merger's tokens: each on the latent grid where its patch lies (reference: ch. 0 = 1)."""
    def ids(g: torch.Tensor, index: float) -> torch.Tensor:
        h, w = int(g[1]), int(g[2])
        out = torch.zeros(h // 2, w // 2, 3)
        out[..., 0] = index
        out[..., 1] = torch.arange(h // 2)[:, None] * (latent_h / h)
        out[..., 2] = torch.arange(w // 2)[None, :] * (latent_w / w)
        return out.reshape(1, -1, 3)
    return torch.cat([ids(grid, 0.0), ids(ref_grid, 1.0)], 1).repeat(batch, 1, 1).to(device)


# ----------------------------------------------------------------------------- table entry

def detect_llm(refs) -> str | None:
    """Nexus-Gen's autoregressive Qwen2.5-VL: Qwen keys plus `image_prefill_embeds` and `vision_head`."""
    return "hf" if has_key(refs.keys(), "image_prefill_embeds.weight") and detect_qwen_vl(refs) else None


def detect_decoder(refs) -> str | None:
    """Nexus-Gen's generation_decoder.bin / edit_decoder.bin: a DiT (`pipe.dit.*`) and its adapter."""
    keys = refs.keys()
    if not has_prefix(keys, "pipe.dit."):
        return None
    return "generation" if has_prefix(keys, "adapter.") else "editing" if has_prefix(keys, "embedding_merger.") else None


def decoder_parts(refs) -> tuple[str, ...]:
    adapter = "nexus_gen_generation_adapter" if has_prefix(refs.keys(), "adapter.") else "nexus_gen_editing_adapter"
    return ("dit", adapter)


def build_llm(det: Detected, options: BuildOptions) -> dict:
    return build_with_processor(det, options, load_nexus_llm, "nexus_gen")


def build_decoder(det: Detected, options: BuildOptions) -> dict:
    """The fine-tuned DiT (`pipe.dit.*`, our layout) and its adapter."""
    dit = build_flux_dit(replace(det, family="flux-dit", format="diffsynth", refs={
        k[len("pipe.dit."):]: r for k, r in det.refs.items() if k.startswith("pipe.dit.")}), options)
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


COMPONENTS = (Component("nexus_gen", "text", activation="text"),  # the autoregressive Qwen2.5-VL
              Component("nexus_gen_generation_adapter", "text"),
              Component("nexus_gen_editing_adapter", "text"))
FAMILIES = (Family("nexus-gen-llm", "Nexus-Gen autoregressive Qwen2.5-VL", detect_llm, fills("nexus_gen"), build_llm),
            Family("nexus-gen-decoder", "Nexus-Gen decoder (DiT + adapter)", detect_decoder, decoder_parts,
                   build_decoder))
