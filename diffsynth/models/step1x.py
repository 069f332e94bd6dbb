"""Step1X-Edit: the Qwen2.5-VL prompt embedding and the connector that turns it into the DiT's text input.

Prompt embedding (`encode_step1x_prompts`): a chat message [fixed instruction prefix, reference image, user
prompt] is tokenised with quoted characters split into one token each (helps text rendering); the last hidden
state of Qwen2.5-VL loses its first 217 tokens (the system turn and the prefix) and is padded or truncated
to 640 tokens, with a mask of the real ones.

Connector (`Step1XConnector`, `connector.*` in the Step1X single file): a token refiner (2 blocks of self-
attention + MLP gated by a vector of timestep embedding + projected masked mean) maps the 3584-wide Qwen
states to the 4096-wide DiT context; the pooled vector is a projection (3584 -> 768) of the masked mean
scaled by (1 + a learned scale). Module names are the file's, so the checkpoint loads as it is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .flux_dit import build as build_flux_dit
from .flux_dit import timestep_embedding
from .qwen_vl import VISION_END, QwenVLProcessor, hidden_states, right_pad
from ..ops.images import convert_image
from .entry import BuildOptions, Component, Detected, Family, assign, fills, has_prefix, plain_tensors

PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:\n'
    '- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial '
    'relationships to create vivid and concrete scenes.\n'
    '- If the prompt is already detailed, refine and enhance the existing details slightly without '
    'overcomplicating.\n\n'
    'Here are examples of how to transform or refine prompts:\n'
    '- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping '
    'peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n'
    '- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street '
    'lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass '
    'skyscrapers.\n\n'
    'Please generate only the enhanced description for the prompt below and avoid including any additional '
    'commentary or evaluations:\nUser Prompt:')
PREFIX_TOKENS = 217           # tokens dropped from the front of the hidden states (system turn + prefix)
MAX_TOKENS = 640              # the connector's sequence: padded or truncated to this, with a mask
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 324 * 28 * 28   # the reference image as Qwen sees it
QUOTE_SCAN_START = 156        # quotes before this character of the chat text (the prefix's own) stay text
OPEN_QUOTE, CLOSE_QUOTE = "\u201c", "\u201d"
MASKED_TOKEN_ID = 0           # Step1X's attention mask drops token id 0 ("!" in Qwen's vocabulary): kept for parity


# ----------------------------------------------------------------------------- prompt tokens

def split_quoted(text: str) -> list[str]:
    """Pieces of the chat text: runs outside quotes as they are, each quoted character alone wrapped in curly
    quotes (its own token). Curly and single quotes count as straight ones; the quote marks stay with the text
    outside. Quotes in the first QUOTE_SCAN_START characters (the fixed prefix) are ordinary text."""
    text = text.replace(OPEN_QUOTE, '"').replace(CLOSE_QUOTE, '"').replace("'", '"')
    pieces, current, quoted = [], "", False
    for i, ch in enumerate(text):
        if ch == '"' and i >= QUOTE_SCAN_START:
            current += ch
            if not quoted:
                pieces.append(current)
                current = ""
            quoted = not quoted
        elif quoted:
            pieces.append(OPEN_QUOTE + ch + CLOSE_QUOTE)
        else:
            current += ch
    return pieces + ([current] if current else [])


def quoted_ids(processor: QwenVLProcessor, text: str) -> list[int]:
    """Token ids of `text` with quoted characters tokenised one by one (their curly wrappers dropped when the
    character came out as one token between them)."""
    wrap = (processor.ids(OPEN_QUOTE), processor.ids(CLOSE_QUOTE))
    out: list[int] = []
    for piece in split_quoted(text):
        ids = processor.ids(piece)
        if len(wrap[0]) == len(wrap[1]) == 1 and ids and ids[0] == wrap[0][0] and ids[-1] == wrap[1][0]:
            ids = ids[1:-1]
        out += ids
    return out


@dataclass
class QwenInputs:
    ids: list[int]                  # text and expanded image tokens
    pixel_values: torch.Tensor      # (patches, C*T*P*P)
    grid_thw: torch.Tensor          # (1, 3)


def step1x_inputs(processor: QwenVLProcessor, prompt: str, image: Image.Image) -> QwenInputs:
    """The Qwen input of one prompt: the chat [prefix, image, prompt]; the image tokens come from the plain
    tokenisation, everything from `<|vision_end|>` on from the quote-splitting one."""
    text = processor.chat([{"type": "text", "text": PREFIX}, {"type": "image", "image": image},
                           {"type": "text", "text": prompt}])
    vision = processor.images([image], MIN_PIXELS, MAX_PIXELS)
    plain = processor.ids(processor.expand_image_tokens(text, vision["image_grid_thw"]))
    split = quoted_ids(processor, text)
    end = processor.token_id(VISION_END)
    ids = plain[:plain.index(end)] + split[split.index(end):]
    return QwenInputs(ids, vision["pixel_values"], vision["image_grid_thw"])


def encode_step1x_prompts(model, processor: QwenVLProcessor, prompts: list[str], image: Image.Image,
                          device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL embeddings of `prompts` (one batch, all with the reference `image`).

    Returns (embeddings (B, 640, hidden), mask (B, 640) long). Prompts beyond the 640-token budget are
    truncated, with a warning.
    """
    inputs = [step1x_inputs(processor, p, convert_image(image)) for p in prompts]
    pad = processor.tokenizer.pad_token_id
    ids, real = right_pad([x.ids for x in inputs], MASKED_TOKEN_ID if pad is None else pad)
    attention = real * (ids != MASKED_TOKEN_ID)
    pixels = torch.cat([x.pixel_values for x in inputs]).to(dtype)
    grids = torch.cat([x.grid_thw for x in inputs])
    states = hidden_states(model, ids, attention, pixels, grids, device)
    emb = torch.zeros(len(prompts), MAX_TOKENS, states.shape[-1], device=device, dtype=dtype)
    mask = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long, device=device)
    for i, x in enumerate(inputs):
        n = len(x.ids) - PREFIX_TOKENS
        if n > MAX_TOKENS:
            warnings.warn(f"Step1X prompt {prompts[i][:40]!r}...: {n} tokens with the reference image; only the "
                          f"first {MAX_TOKENS} are used", stacklevel=3)
        n = max(0, min(n, MAX_TOKENS))
        emb[i, :n] = states[i, PREFIX_TOKENS:PREFIX_TOKENS + n].to(dtype)
        mask[i, :n] = 1
    return emb, mask


# ----------------------------------------------------------------------------- connector

@dataclass
class Step1XConnectorConfig:
    in_dim: int = 3584       # Qwen2.5-VL-7B hidden size
    hidden: int = 4096       # the DiT's context width
    heads: int = 32
    depth: int = 2
    pooled_dim: int = 768


def infer_connector_config(sd: dict[str, torch.Tensor]) -> Step1XConnectorConfig:
    """Widths and depth from the shapes; heads = hidden / 128 (Step1X: 32), 2 below 256 (tiny test models)."""
    hidden, in_dim = sd["S.input_embedder.weight"].shape
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("S.individual_token_refiner.blocks."))
    return Step1XConnectorConfig(in_dim=in_dim, hidden=hidden, heads=hidden // 128 if hidden >= 256 else 2,
                                 depth=depth, pooled_dim=sd["global_proj_out.weight"].shape[0])


class _Projection(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


class _Mlp(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = _Mlp(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x (B, L, D), c (B, D), mask (B, 1, L, L) bool
        gate_attn, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        b, n, _ = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, -1)
        x = x + self.self_attn_proj(attn) * gate_attn
        return x + self.mlp(self.norm2(x)) * gate_mlp


class _Refiners(nn.Module):
    def __init__(self, hidden: int, heads: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(RefinerBlock(hidden, heads) for _ in range(depth))


class TokenRefiner(nn.Module):
    def __init__(self, c: Step1XConnectorConfig):
        super().__init__()
        self.input_embedder = nn.Linear(c.in_dim, c.hidden)
        self.t_embedder = _TimeEmbedder(c.hidden)
        self.c_embedder = _Projection(c.in_dim, c.hidden)
        self.individual_token_refiner = _Refiners(c.hidden, c.heads, c.depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.c_embedder(mean)
        m = mask.bool()
        pair = (m[:, None, None, :] & m[:, None, :, None]).clone()  # (B, 1, L, L): real tokens see real tokens
        pair[..., 0] = True  # padding rows attend to the first token instead of nothing (no NaN)
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, pair)
        return x


class Step1XConnector(nn.Module):
    def __init__(self, config: Step1XConnectorConfig | None = None):
        super().__init__()
        self.config = config = config or Step1XConnectorConfig()
        self.S = TokenRefiner(config)
        self.global_proj_out = nn.Linear(config.in_dim, config.pooled_dim)
        self.scale_factor = nn.Parameter(torch.full((1,), -(1 - 0.09)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen states x (B, L, in_dim), sigma t (B,), mask (B, L) -> (prompt_emb (B, L, hidden), pooled (B, 768))."""
        m = mask.to(x.dtype).unsqueeze(-1)
        mean = (x * m).sum(1) / m.sum(1)
        pooled = self.global_proj_out(mean * (1 + self.scale_factor.to(x.dtype)))
        return self.S(x, t, mask, mean), pooled


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    """Step1X-Edit's single file: a BFL-layout DiT and its Qwen connector (`connector.*`)."""
    keys = refs.keys()
    if has_prefix(keys, "connector.S.input_embedder.") and has_prefix(keys, "double_blocks.0.img_attn.qkv"):
        return "bfl"
    return None


def build(det: Detected, options: BuildOptions) -> dict:
    dit_refs = {k: r for k, r in det.refs.items() if not k.startswith("connector.")}
    conn = replace(det, refs={k[len("connector."):]: r for k, r in det.refs.items() if k.startswith("connector.")})
    sd = plain_tensors(conn, options)
    connector = assign(Step1XConnector, infer_connector_config(sd), sd, f"Step1X connector from {det.source}")
    return {**build_flux_dit(replace(det, family="flux-dit", refs=dit_refs), options), "step1x_connector": connector}


COMPONENTS = (Component("step1x_connector", "denoise", in_loop=True),)  # per-step: conditioned on the timestep
FAMILIES = (Family("step1x", "Step1X-Edit DiT + connector", detect, fills("dit", "step1x_connector"), build),)
