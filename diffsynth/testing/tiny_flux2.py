"""Tiny random FLUX.2 models in the real on-disk layouts, for fast CPU tests.

Tensors come from `nano.text.fill_spec` (one generator per key), so a seed gives byte-identical files and the
same weights in every layout.

DiT (this section):
    folder/transformer/    diffusers layout: 2 shards + index + config.json (`write_tiny_flux2_transformer`)
    file.safetensors       BFL single file, optionally under ComfyUI's prefix (`write_tiny_flux2_bfl`)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.flux2_dit import dit_to_bfl
from .tiny import Spec, _write_safetensors, _write_sharded, conv_spec, fill_spec, linear_spec, norm_spec, write_json

# diffusers' Flux2Transformer2DModel config names. The context width is 3 stacked text-encoder layers.
TINY_FLUX2_DIT: dict = dict(
    in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=96, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
)


def tiny_flux2_dit_config(guidance: bool = False, **overrides) -> dict:
    """The tiny DiT's config.json as diffusers writes it (`overrides` in diffusers' names)."""
    c = {**TINY_FLUX2_DIT, **overrides}
    return {"_class_name": "Flux2Transformer2DModel", "_diffusers_version": "0.42.0", "patch_size": 1,
            "out_channels": None, "eps": 1e-6, "guidance_embeds": guidance,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}}


def _flux2_dit_spec(c: dict, guidance: bool) -> Spec:
    h = c["num_attention_heads"] * c["attention_head_dim"]
    d, m, t = c["attention_head_dim"], round(h * c["mlp_ratio"]), c["timestep_guidance_channels"]
    lin = lambda name, n_out, n_in: linear_spec(name, n_out, n_in, bias=False)  # noqa: E731  FLUX.2 has no biases
    spec: Spec = lin("x_embedder", h, c["in_channels"]) + lin("context_embedder", h, c["joint_attention_dim"])
    for emb in ("timestep_embedder",) + (("guidance_embedder",) if guidance else ()):
        spec += lin(f"time_guidance_embed.{emb}.linear_1", h, t) + lin(f"time_guidance_embed.{emb}.linear_2", h, h)
    spec += lin("double_stream_modulation_img.linear", 6 * h, h) + lin("double_stream_modulation_txt.linear", 6 * h, h)
    spec += lin("single_stream_modulation.linear", 3 * h, h)
    for i in range(c["num_layers"]):
        p = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            spec += lin(f"{p}.attn.{name}", h, h)
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            spec += norm_spec(f"{p}.attn.{name}", d, bias=False)
        for ff in ("ff", "ff_context"):
            spec += lin(f"{p}.{ff}.linear_in", 2 * m, h) + lin(f"{p}.{ff}.linear_out", h, m)
    for i in range(c["num_single_layers"]):
        p = f"single_transformer_blocks.{i}.attn"
        spec += lin(f"{p}.to_qkv_mlp_proj", 3 * h + 2 * m, h) + lin(f"{p}.to_out", h, h + m)
        spec += norm_spec(f"{p}.norm_q", d, bias=False) + norm_spec(f"{p}.norm_k", d, bias=False)
    spec += lin("norm_out.linear", 2 * h, h) + lin("proj_out", c["in_channels"], h)
    return spec


def tiny_flux2_dit_state_dict(seed: int = 0, guidance: bool = False, dtype: torch.dtype = torch.float32,
                              **overrides) -> dict[str, torch.Tensor]:
    """Random tiny FLUX.2 DiT weights in diffusers' (= our internal) names."""
    return fill_spec(_flux2_dit_spec({**TINY_FLUX2_DIT, **overrides}, guidance), seed, "flux2-dit", dtype)


def write_tiny_flux2_transformer(folder: str | Path, seed: int = 0, guidance: bool = False,
                                 dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """`folder/transformer/` as diffusers saves it (2 shards + index + config.json); returns that folder."""
    out = Path(folder) / "transformer"
    _write_sharded(out, "diffusion_pytorch_model", tiny_flux2_dit_state_dict(seed, guidance, dtype, **overrides))
    write_json(out / "config.json", tiny_flux2_dit_config(guidance, **overrides))
    return out


def write_tiny_flux2_bfl(path: str | Path, seed: int = 0, guidance: bool = False, dtype: torch.dtype = torch.float32,
                         prefix: str = "", **overrides) -> Path:
    """The same weights as one BFL-named file (`prefix="model.diffusion_model."`: ComfyUI's layout)."""
    path = Path(path)
    sd = dit_to_bfl(tiny_flux2_dit_state_dict(seed, guidance, dtype, **overrides))
    _write_safetensors(path, {prefix + k: v.contiguous() for k, v in sd.items()})
    return path


# ----------------------------------------------------------------------------- VAE, Qwen3 text encoder, release folder
#
#   root/vae/                 AutoencoderKLFlux2: diffusion_pytorch_model.safetensors + config.json
#   root/text_encoder/        Qwen3ForCausalLM: 2 shards + index + config.json (28 layers: FLUX.2 reads 9/18/27)
#   root/tokenizer/           byte-level BPE with Qwen's special tokens and a Qwen3-style chat template
#   root/model_index.json, root/scheduler/scheduler_config.json   (`build_tiny_flux2` writes the whole folder)

# Widths the tiny DiT expects: 4 * z_channels = its in_channels, 3 * hidden_size = its joint_attention_dim.
TINY_FLUX2_VAE: dict = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=32)
TINY_QWEN3: dict = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16)

# Qwen3's template, reduced to what prompt encoding uses: messages, the opened assistant turn, and the empty
# thinking block that `enable_thinking=False` inserts.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _resnet_d(name: str, c_in: int, c_out: int) -> Spec:
    spec = norm_spec(f"{name}.norm1", c_in) + conv_spec(f"{name}.conv1", c_out, c_in, 3)
    spec += norm_spec(f"{name}.norm2", c_out) + conv_spec(f"{name}.conv2", c_out, c_out, 3)
    return spec + (conv_spec(f"{name}.conv_shortcut", c_out, c_in, 1) if c_in != c_out else [])


def _mid_d(name: str, c: int) -> Spec:
    spec = _resnet_d(f"{name}.resnets.0", c, c) + norm_spec(f"{name}.attentions.0.group_norm", c)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        spec += linear_spec(f"{name}.attentions.0.{proj}", c, c)
    return spec + _resnet_d(f"{name}.resnets.1", c, c)


def _flux2_vae_spec() -> Spec:
    """AutoencoderKLFlux2's tensors in diffusers' names (up blocks in execution order, deepest first)."""
    c = TINY_FLUX2_VAE
    widths, n, z = c["block_out_channels"], c["layers_per_block"], c["latent_channels"]
    spec: Spec = conv_spec("encoder.conv_in", widths[0], 3, 3)
    c_in = widths[0]
    for i, w in enumerate(widths):
        for j in range(n):
            spec += _resnet_d(f"encoder.down_blocks.{i}.resnets.{j}", c_in, w)
            c_in = w
        if i != len(widths) - 1:
            spec += conv_spec(f"encoder.down_blocks.{i}.downsamplers.0.conv", w, w, 3)
    spec += _mid_d("encoder.mid_block", c_in) + norm_spec("encoder.conv_norm_out", c_in)
    spec += conv_spec("encoder.conv_out", 2 * z, c_in, 3) + conv_spec("quant_conv", 2 * z, 2 * z, 1)
    spec += conv_spec("post_quant_conv", z, z, 1) + conv_spec("decoder.conv_in", widths[-1], z, 3)
    spec += _mid_d("decoder.mid_block", widths[-1])
    c_in = widths[-1]
    for i, w in enumerate(reversed(widths)):
        for j in range(n + 1):
            spec += _resnet_d(f"decoder.up_blocks.{i}.resnets.{j}", c_in, w)
            c_in = w
        if i != len(widths) - 1:
            spec += conv_spec(f"decoder.up_blocks.{i}.upsamplers.0.conv", w, w, 3)
    spec += norm_spec("decoder.conv_norm_out", c_in) + conv_spec("decoder.conv_out", 3, c_in, 3)
    return spec + [("bn.running_mean", (4 * z,), "emb"), ("bn.running_var", (4 * z,), "emb")]


def tiny_flux2_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = fill_spec(_flux2_vae_spec(), seed, "flux2-vae", dtype)
    # latent statistics far enough from (0, 1) that a missed normalisation shows: variances in 0.5 .. ~2
    sd["bn.running_var"] = 0.5 + 5 * sd["bn.running_var"].abs()
    sd["bn.num_batches_tracked"] = torch.tensor(1000)
    return sd


def tiny_flux2_vae_config() -> dict:
    c = TINY_FLUX2_VAE
    n = len(c["block_out_channels"])
    return {"_class_name": "AutoencoderKLFlux2", "_diffusers_version": "0.42.0", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(c["block_out_channels"]), "layers_per_block": c["layers_per_block"],
            "latent_channels": c["latent_channels"], "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
            "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": [2, 2]}


def write_tiny_flux2_vae(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """`folder/vae/` as diffusers saves AutoencoderKLFlux2; returns that folder."""
    out = Path(folder) / "vae"
    _write_safetensors(out / "diffusion_pytorch_model.safetensors", tiny_flux2_vae_state_dict(seed, dtype))
    write_json(out / "config.json", tiny_flux2_vae_config())
    return out


def tiny_qwen3_config() -> dict:
    from .tiny_qwen import tiny_token_ids
    ids = tiny_token_ids()
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **TINY_QWEN3, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "max_position_embeddings": 40960, "attention_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": TINY_QWEN3["num_hidden_layers"],
            "vocab_size": max(ids.values()) + 3, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"]}


def write_tiny_qwen3(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """`folder/text_encoder/`: transformers' own Qwen3ForCausalLM (seeded init), tied LM head left out as in the
    release; returns that folder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    out = Path(folder) / "text_encoder"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(tiny_qwen3_config()))
    with torch.no_grad():  # transformers initialises norms to 1: perturb them so that every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    tensors = {k: t.to(dtype).contiguous() for k, t in model.state_dict().items() if k != "lm_head.weight"}
    _write_sharded(out, "model", tensors)
    write_json(out / "config.json", tiny_qwen3_config())
    return out


def write_tiny_qwen3_tokenizer(folder: str | Path) -> Path:
    """`folder/tokenizer/`: the tiny Qwen BPE (see tiny_qwen) plus `<think>`/`</think>` and Qwen3's chat template."""
    from .tiny_qwen import _tokenizer_json, tiny_token_ids
    out = Path(folder) / "tokenizer"
    tok = _tokenizer_json()
    first = max(tiny_token_ids().values()) + 1
    for i, t in enumerate(("<think>", "</think>")):
        tok["added_tokens"].append({"id": first + i, "content": t, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    write_json(out / "tokenizer.json", tok)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "errors": "replace", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "split_special_tokens": False,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False, "chat_template": _QWEN3_CHAT_TEMPLATE})
    return out


def write_flux2_index(root: str | Path, distilled: bool = True, dev: bool = False) -> None:
    """model_index.json and scheduler/scheduler_config.json of a FLUX.2 [klein] release (`dev`: of FLUX.2 [dev])."""
    root = Path(root)
    encoder = ["transformers", "Mistral3ForConditionalGeneration"] if dev else ["transformers", "Qwen3ForCausalLM"]
    tokenizer = ["transformers", "PixtralProcessor"] if dev else ["transformers", "Qwen2TokenizerFast"]
    pipeline = {"_class_name": "Flux2Pipeline"} if dev else {"_class_name": "Flux2KleinPipeline",
                                                              "is_distilled": distilled}
    write_json(root / "model_index.json", {
        **pipeline, "_diffusers_version": "0.42.0", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": encoder, "tokenizer": tokenizer, "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"]})
    write_json(root / "scheduler" / "scheduler_config.json", {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.0", "base_image_seq_len": 256,
        "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": None, "stochastic_sampling": False,
        "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
        "use_exponential_sigmas": False, "use_karras_sigmas": False})


def build_tiny_flux2(root: str | Path, seed: int = 0, distilled: bool = True, dtype: torch.dtype = torch.float32,
                     **dit_overrides) -> Path:
    """A whole tiny FLUX.2 [klein] release folder (`distilled=False`: a klein-base one); `dit_overrides` in
    diffusers' config names (e.g. num_single_layers=20, as many single blocks as klein 4B)."""
    root = Path(root)
    write_tiny_flux2_transformer(root, seed, dtype=dtype, **dit_overrides)
    write_tiny_flux2_vae(root, seed, dtype)
    write_tiny_qwen3(root, seed, dtype)
    write_tiny_qwen3_tokenizer(root)
    write_flux2_index(root, distilled)
    return root


# ----------------------------------------------------------------------------- FLUX.2 [dev]: Mistral3 encoder, tokenizer
#
#   root/text_encoder/   Mistral3ForConditionalGeneration: 2 shards + index + config.json (text_config + vision_config);
#                        a 32-layer Mistral (FLUX.2 reads 10/20/30), a one-layer Pixtral vision tower and projector.
#                        `layout=4`: keys `language_model.model.*`, `vision_tower.*` (the release's, transformers 4.x);
#                        `layout=5`: `model.language_model.*`, `model.vision_tower.*`, `lm_head.*` (transformers 5)
#   root/tokenizer/      what a PixtralProcessor saves: tokenizer.json (byte-level BPE with Mistral's control tokens and
#                        a BOS post-processor), tokenizer_config.json, chat_template.jinja, processor_config.json,
#                        preprocessor_config.json
#   root/transformer/    the tiny DiT with a guidance embedder (`build_tiny_flux2_dev` writes the whole folder)

TINY_MISTRAL: dict = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=32, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16)
TINY_PIXTRAL: dict = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                          patch_size=14, image_size=56)
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                          "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>")

# Mistral-Small-3's template, reduced to what prompt encoding uses: the BOS, the system prompt (string or text
# block), user turns of text and image blocks, assistant turns.
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}{%- else %}"
    "{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '[/INST]' }}{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}")


def mistral_token_ids() -> dict[str, int]:
    from .tiny_qwen import _qwen_bpe
    vocab, _ = _qwen_bpe()
    return {t: len(vocab) + i for i, t in enumerate(MISTRAL_SPECIAL_TOKENS)}


def tiny_mistral3_config() -> dict:
    """config.json of a Mistral3ForConditionalGeneration (FLUX.2-dev's text_encoder/), at toy size."""
    ids = mistral_token_ids()
    text = {"model_type": "mistral", **TINY_MISTRAL, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000_000.0, "max_position_embeddings": 131072, "sliding_window": None,
            "attention_dropout": 0.0, "vocab_size": max(ids.values()) + 1, "use_cache": True}
    vision = {"model_type": "pixtral", **TINY_PIXTRAL, "num_channels": 3, "hidden_act": "silu", "rope_theta": 10000.0,
              "attention_dropout": 0.0}
    return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "text_config": text,
            "vision_config": vision, "image_token_index": ids["[IMG]"], "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu", "spatial_merge_size": 2, "vision_feature_layer": -1,
            "torch_dtype": "float32"}


def write_tiny_mistral3(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, layout: int = 4) -> Path:
    """`folder/text_encoder/`: transformers' own Mistral3ForConditionalGeneration (seeded init, norms perturbed) in
    the key layout of transformers `layout` (4: the release's); returns that folder."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    out = Path(folder) / "text_encoder"
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(Mistral3Config.from_dict(tiny_mistral3_config()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    tensors = {}
    for key, t in model.state_dict().items():
        if layout == 4:
            key = key.replace("model.language_model.", "language_model.model.", 1).replace(
                "model.vision_tower.", "vision_tower.", 1).replace(
                "model.multi_modal_projector.", "multi_modal_projector.", 1).replace(
                "lm_head.", "language_model.lm_head.", 1)
        tensors[key] = t.to(dtype).contiguous()
    _write_sharded(out, "model", tensors)
    write_json(out / "config.json", tiny_mistral3_config())
    return out


def write_tiny_mistral_tokenizer(folder: str | Path) -> Path:
    """`folder/tokenizer/` as a PixtralProcessor saves it: the tiny byte-level BPE (see tiny_qwen) with Mistral's
    control tokens, a post-processor that prepends the BOS, and Mistral-Small-3's chat template."""
    from .tiny_qwen import _tokenizer_json
    out = Path(folder) / "tokenizer"
    tok, ids = _tokenizer_json(), mistral_token_ids()
    tok["added_tokens"] = [{"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for t in MISTRAL_SPECIAL_TOKENS]
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<s>": {"id": "<s>", "ids": [ids["<s>"]], "tokens": ["<s>"]}}}
    write_json(out / "tokenizer.json", tok)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "PixtralProcessor", "model_max_length": 131072,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "right",
        "clean_up_tokenization_spaces": False, "add_bos_token": True, "add_eos_token": False})
    (out / "chat_template.jinja").write_text(_MISTRAL_CHAT_TEMPLATE)
    write_json(out / "processor_config.json", {
        "processor_class": "PixtralProcessor", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
        "image_token": "[IMG]", "patch_size": TINY_PIXTRAL["patch_size"], "spatial_merge_size": 2})
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor", "do_resize": True,
        "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": {"height": TINY_PIXTRAL["patch_size"], "width": TINY_PIXTRAL["patch_size"]},
        "size": {"longest_edge": TINY_PIXTRAL["image_size"]}})
    return out


def build_tiny_flux2_dev(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, layout: int = 4,
                         **dit_overrides) -> Path:
    """A whole tiny FLUX.2 [dev] release folder: the DiT with a guidance embedder, the FLUX.2 VAE, the Mistral3
    text encoder (`layout`: its key layout, see write_tiny_mistral3) and the Pixtral tokenizer folder."""
    root = Path(root)
    write_tiny_flux2_transformer(root, seed, guidance=True, dtype=dtype, **dit_overrides)
    write_tiny_flux2_vae(root, seed, dtype)
    write_tiny_mistral3(root, seed, dtype, layout)
    write_tiny_mistral_tokenizer(root)
    write_flux2_index(root, dev=True)
    return root
