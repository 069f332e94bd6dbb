"""flux-nano's architecture and its FLUX.1-dev folder: sizes, frozen text encoders, tokenizers, a fresh DiT.

Every part has the exact FLUX.1 layout (BFL DiT with guidance embedding, BFL ``ae.safetensors`` with 16
latent channels, HF CLIP-L / T5 encoder folders with their tokenizers), just small.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.flux_dit import FluxDiT, FluxDiTConfig, dit_to_bfl
from ..ops.files import save_safetensors
from . import text
from .shapes import SIZE, all_triples, grammar, prompt, vocabulary

from . import SHIPPED
T5_LENGTH = 8  # longest prompt: "a yellow triangle in the center" + </s> = 7 tokens
CLIP = {**text.TEXT_SIZES["clip"], "vocab_size": len(text.clip_bpe(vocabulary())[0])}
T5 = dict(text.TEXT_SIZES["t5"])
DIT = FluxDiTConfig(hidden_size=128, num_heads=2, num_double_blocks=2, num_single_blocks=2,
                    context_dim=T5["d_model"], pooled_dim=CLIP["hidden_size"], mlp_ratio=4.0,
                    guidance_embed=True, axes_dim=(8, 28, 28))
# generation_defaults.json: what `diffsynth generate` assumes, and the prompts it warns outside of
DEFAULTS = {"height": SIZE, "width": SIZE, "prompt_grammar": list(grammar())}


def t5_corpus() -> tuple[str, ...]:
    """Sentences for the T5 sentencepiece model: every grammar prompt (so each word becomes one piece) plus
    the tiny builder's sentences (so the 256-piece vocabulary fills up)."""
    words = vocabulary()
    lines = tuple(" ".join(words[i:i + 6]) for i in range(len(words))) * 40
    return tuple(text.random_sentences(3000)) + lines + tuple(prompt(*t) for t in all_triples()) * 20


def write_text_encoders(root: Path, seed: int) -> None:
    """Random frozen CLIP-L / T5 layout encoders and tokenizers covering the grammar."""
    save_safetensors(text.tiny_clip_state_dict(seed, config=CLIP), root / "text_encoder" / "model.safetensors")
    text.write_json(root / "text_encoder" / "config.json", text.tiny_clip_config(CLIP))
    save_safetensors(text.tiny_t5_state_dict(seed, config=T5), root / "text_encoder_2" / "model.safetensors")
    text.write_json(root / "text_encoder_2" / "config.json", text.tiny_t5_config(T5))
    text.write_clip_tokenizer(root / "tokenizer", vocabulary())
    text.write_t5_tokenizer(root / "tokenizer_2", t5_corpus(), max_length=T5_LENGTH)
    text.write_json(root / "generation_defaults.json", DEFAULTS)


def write_initial_dit(path: Path, seed: int) -> None:
    """A freshly initialised DiT (PyTorch default init) in BFL names; the output projection starts at zero
    so the first predictions are 0 rather than noise of random scale."""
    torch.manual_seed(seed)
    dit = FluxDiT(DIT)
    torch.nn.init.zeros_(dit.final_proj_out.weight)
    torch.nn.init.zeros_(dit.final_proj_out.bias)
    save_safetensors(dit_to_bfl(dit.state_dict()), path, metadata={"format": "pt"})


def model_files(root: str | Path) -> list[str]:
    """The four model paths of a FLUX.1-dev folder, in the order ModelConfig / --model_paths take them."""
    root = Path(root)
    return [str(root / p) for p in ("flux1-dev.safetensors", "text_encoder/model.safetensors",
                                    "text_encoder_2/", "ae.safetensors")]


def load_pipeline(root: str | Path = SHIPPED, device: str = "cpu"):
    from .. import FluxImagePipeline, ModelConfig
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device=device,
                                             model_configs=[ModelConfig(path=p) for p in model_files(root)])
