"""Qwen2.5-VL (Step1X-Edit's and Nexus-Gen's prompt encoder) loaded from an HF folder, with its processor.

The model is this project's: `qwen25_vision.VisionTower` (`visual.*`) and `decoder_lm.DecoderLM` with Qwen2's q/k/v
biases, the final norm and multimodal RoPE (`language_model.*`, positions from `mrope.rope_index`), under
transformers' `Qwen2_5_VLModel` parameter names and numbers (tests compare them with transformers). transformers is
not imported: its model code costs ~2 s of every fresh process and its vision APIs moved between versions.

The weights are adopted without a copy: the model is built on the meta device and the file's tensors are assigned
in their storage dtype. Files in the release's key layout (`model.layers.*`, `visual.*`, transformers 4) and in
transformers 5's (`model.language_model.*`, `model.visual.*`) both load; `lm_head` is not needed for embeddings and
is dropped.

The processor is assembled from the folder's files: the chat tokenizer (tokenizer.json/tokenizer_config.json, read by
chat_tokenizers.py), the image processor (preprocessor_config.json, qwen25_vision.py) and the processor's chat
template (chat_template.json or .jinja, else the tokenizer's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from PIL import Image
from torch import nn

from ..ops.files import CheckpointError
from .chat_tokenizers import ChatTokenizer, load_chat_tokenizer
from .decoder_lm import DecoderConfig, DecoderLM
from .entry import BuildOptions, Component, Detected, Family, fills, has_prefix, plain_tensors
from .hf_adopt import adopt_weights
from .mrope import mrope_tables, rope_index
from .qwen25_vision import QwenImageProcessor, VisionConfig, VisionTower
from .text_tokenizers import read_json

IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
PROCESSOR_FILES = ("tokenizer.json or vocab.json + merges.txt", "preprocessor_config.json",
                   "chat_template.json, chat_template.jinja or a chat_template in tokenizer_config.json")
# The patch embedding, whose weight dtype the pixel values are cast to: kept in the compute dtype under fp8
# storage. It is tiny (1.5M values in the 7B model).
_DTYPE_PROBE = "visual.patch_embed.proj.weight"


def qwen_key(key: str) -> str | None:
    """A file key (either transformers layout) -> the key of transformers' Qwen2_5_VLModel; None: not used."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return "visual." + key[len(prefix):]
    for prefix in ("model.language_model.", "language_model.", "model."):
        if key.startswith(prefix):
            return "language_model." + key[len(prefix):]
    return None  # lm_head.*: hidden states are what the pipelines read


# Token ids transformers' Qwen2_5_VLConfig assumes when config.json names none.
_DEFAULT_TOKENS = {"image_token_id": 151655, "vision_start_token_id": 151652}


@dataclass(frozen=True)
class QwenVLConfig:
    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int
    vision_start_token_id: int

    @classmethod
    def from_dict(cls, config: Mapping | None, source: str) -> "QwenVLConfig":
        """From the folder's config.json (transformers 4's flat layout or 5's `text_config`)."""
        if config is None:
            raise CheckpointError(f"{source}: Qwen2.5-VL weights need the config.json of their HF folder beside them "
                                  "(load the folder, e.g. ModelConfig(model_id='Qwen/Qwen2.5-VL-7B-Instruct'))")
        try:
            text = DecoderConfig.from_dict(config, qk_norm=False, qkv_bias=True)
            vision = VisionConfig.from_dict(config)
        except ValueError as err:
            raise CheckpointError(f"{source}: config.json: {err}") from err
        if text.mrope_section is None:
            raise CheckpointError(f"{source}: config.json has no mrope_section (rope_scaling / rope_parameters): "
                                  "not a Qwen2.5-VL config")
        tokens = {k: int(config.get(k) if config.get(k) is not None else v) for k, v in _DEFAULT_TOKENS.items()}
        return cls(text, vision, **tokens)


class QwenVL(nn.Module):
    """Qwen2.5-VL without its LM head: `visual` (the vision tower) and `language_model` (the decoder)."""

    def __init__(self, config: QwenVLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.language_model = DecoderLM(config.text, final_norm=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def rope_index(self, ids: torch.Tensor, grid_thw: torch.Tensor | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(3, B, L) time/height/width positions of text + image tokens (mrope.rope_index)."""
        positions, _ = rope_index(ids, grid_thw, attention_mask, image_token_id=self.config.image_token_id,
                                  vision_start_token_id=self.config.vision_start_token_id,
                                  spatial_merge_size=self.config.vision.spatial_merge_size)
        return positions

    def run_language_model(self, embeds: torch.Tensor, positions: torch.Tensor,
                           attention_mask: torch.Tensor | None) -> torch.Tensor:
        """embeds (B, L, D) at `positions` (3, B, L) -> the final-normed last hidden state (B, L, D)."""
        c = self.config.text
        cos, sin = mrope_tables(positions, c.head_dim, c.rope_theta, c.mrope_section, embeds)
        return self.language_model.forward_embeds(embeds, cos, sin, attention_mask)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, pixel_values: torch.Tensor,
                grid_thw: torch.Tensor) -> torch.Tensor:
        """ids (B, L) with each image's placeholders, pixel_values / grid_thw from the processor -> (B, L, D)."""
        embeds = self.get_input_embeddings()(ids)
        image = self.visual(pixel_values, grid_thw)                      # (placeholders, D)
        slots = (ids == self.config.image_token_id)[..., None]
        if int(slots.sum()) != image.shape[0]:
            raise ValueError(f"Qwen2.5-VL: {int(slots.sum())} image placeholder tokens for {image.shape[0]} image "
                             "embeddings")
        embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))
        return self.run_language_model(embeds, self.rope_index(ids, grid_thw, attention_mask), attention_mask)


def load_qwen_vl(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping | None, source: str = "Qwen2.5-VL",
                 probe_dtype: torch.dtype | None = None) -> QwenVL:
    """Our Qwen2.5-VL (vision tower + language model, no LM head) adopting `state_dict`.

    `probe_dtype`: the dtype of the patch-embedding weight (see `_DTYPE_PROBE`), None keeps the file's.
    """
    config = QwenVLConfig.from_dict(config_dict, source)
    with torch.device("meta"):
        model = QwenVL(config)
    sd = {}
    for key, t in state_dict.items():
        name = qwen_key(key)
        if name is not None:
            sd[name] = t
    if probe_dtype is not None and _DTYPE_PROBE in sd:
        sd[_DTYPE_PROBE] = sd[_DTYPE_PROBE].to(probe_dtype)
    return adopt_weights(model, sd, source, "config.json")


# ----------------------------------------------------------------------------- processor

def _processor_template(folder: Path) -> str | None:
    """The processor's own chat template (chat_template.jinja, else chat_template.json), which transformers'
    processors prefer to the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    path = folder / "chat_template.json"
    if not path.is_file():
        return None
    template = read_json(path, "Qwen2.5-VL processor").get("chat_template")
    if not isinstance(template, str):
        raise CheckpointError(f"{path}: no chat_template string in it")
    return template


@dataclass
class QwenVLProcessor:
    """The chat tokenizer, the chat template and the image processor of a Qwen2.5-VL folder."""
    tokenizer: ChatTokenizer
    image_processor: QwenImageProcessor
    chat_template: str

    @classmethod
    def from_folder(cls, folder: str | Path) -> "QwenVLProcessor":
        folder = Path(folder)
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
        if not folder.is_dir() or not has_tokenizer or not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"Qwen2.5-VL folder {str(folder)!r} lacks its processor files: expected "
                                    f"{', '.join(PROCESSOR_FILES)} (the whole Qwen/Qwen2.5-VL-7B-Instruct folder)")
        try:
            tokenizer = load_chat_tokenizer(folder)
            template = _processor_template(folder) or tokenizer.chat_template
        except FileNotFoundError as err:
            if "chat template" not in str(err):
                raise
            raise FileNotFoundError(f"Qwen2.5-VL folder {str(folder)!r} has no chat template "
                                    f"({PROCESSOR_FILES[2]})") from err
        return cls(tokenizer, QwenImageProcessor.from_folder(folder), template)

    def render(self, messages: list[dict], add_generation_prompt: bool, **template_args) -> str:
        """A conversation in the chat format (image parts as the template's vision placeholders)."""
        return self.tokenizer.chat_text(messages, chat_template=self.chat_template,
                                        add_generation_prompt=add_generation_prompt, **template_args)

    def chat(self, content: list[dict]) -> str:
        """One user message (text and image parts) in the chat format, ready for the assistant's answer."""
        return self.render([{"role": "user", "content": content}], add_generation_prompt=True, add_vision_id=True)

    def images(self, images: list[Image.Image], min_pixels: int | None = None,
               max_pixels: int | None = None) -> dict[str, torch.Tensor]:
        """pixel_values (patches, C*T*P*P) and image_grid_thw (n, 3), each image resized to [min, max] pixels
        (None: the folder's preprocessor_config.json limits)."""
        return self.image_processor(images, min_pixels=min_pixels, max_pixels=max_pixels)

    def expand_image_tokens(self, text: str, grid_thw: torch.Tensor) -> str:
        """One `<|image_pad|>` per merged vision token of each image, in order."""
        merge = self.image_processor.merge_size ** 2
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(grid_thw):
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(grid_thw)} images")
        out = parts[0]
        for grid, rest in zip(grid_thw, parts[1:]):
            out += IMAGE_PAD * int(grid.prod() // merge) + rest
        return out

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.ids(text)

    def token_id(self, token: str) -> int:
        index = self.tokenizer.backend.token_to_id(token)
        if index is None:
            raise ValueError(f"the Qwen2.5-VL tokenizer has no token {token!r}")
        return index


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), real-token mask (B, L)) with every sequence padded on the right to the longest."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def hidden_states(model: QwenVL, ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                  grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Last hidden state (after the final norm) of the language model over text + image tokens (B, L, D)."""
    return model(ids.to(device), attention_mask.to(device), pixel_values.to(device), grid_thw.to(device))


# ----------------------------------------------------------------------------- table entry

def detect(refs) -> str | None:
    keys = refs.keys()
    vision = has_prefix(keys, "visual.patch_embed.", "model.visual.patch_embed.")
    text = has_prefix(keys, "model.layers.0.self_attn.", "model.language_model.layers.0.self_attn.")
    return "hf" if vision and text else None


def build_with_processor(det: Detected, options: BuildOptions, load, name: str) -> dict:
    """A Qwen2.5-VL-based model from its HF folder; the processor (tokenizer, image processor, chat template)
    rides along as `<model>.processor`: from `options.processor_dir`, else from the weights' folder, else from
    its `processor/` subfolder (Nexus-GenV2's layout)."""
    from ..ops.quant import FP8_DTYPES
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


def build(det: Detected, options: BuildOptions) -> dict:
    return build_with_processor(det, options, load_qwen_vl, "qwenvl")


COMPONENTS = (Component("qwenvl", "text", activation="text"),)  # Qwen2.5-VL prompt encoder (Step1X, Nexus-Gen)
FAMILIES = (Family("qwen2.5-vl", "Qwen2.5-VL", detect, fills("qwenvl"), build),)
