"""CLIP / T5 loading (files, inferred configs, ComfyUI prefixes), tokenizers and prompt encoding."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5Config, T5EncoderModel

from diffsynth.models.flux_text_encoders import (
    CLIP_PREFIX,
    T5_PREFIX,
    encode_prompt_clip,
    encode_prompt_t5,
    infer_clip_config,
    infer_t5_config,
    load_clip_text_encoder,
    load_clip_tokenizer,
    load_t5_encoder,
    load_t5_tokenizer,
    load_tokenizers,
    strip_prefix,
)
from diffsynth.testing import TINY, build_tiny_comfy_checkpoint, build_tiny_flux

PROMPTS = ["a photo of a cat sitting on the table", "A red Dragon over the city at night, cinematic lighting!"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny"))


def clip_sd(root: Path) -> dict:
    return load_file(root / "text_encoder" / "model.safetensors")


def t5_sd(root: Path) -> dict:
    sd = {}
    for shard in sorted((root / "text_encoder_2").glob("model-*.safetensors")):
        sd.update(load_file(shard))
    return sd


def config(root: Path, folder: str) -> dict:
    return json.loads((root / folder / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tiny):
    clip = load_clip_text_encoder(clip_sd(tiny), config(tiny, "text_encoder"))
    t5 = load_t5_encoder(t5_sd(tiny), config(tiny, "text_encoder_2"))
    return clip, t5


# -- tokenizers (tests/test_text_tokenizers.py checks them in depth) --------------------------------


def hf_tokenizers(tiny):
    from transformers import CLIPTokenizerFast, T5TokenizerFast
    return (CLIPTokenizerFast.from_pretrained(str(tiny / "tokenizer"), local_files_only=True),
            T5TokenizerFast.from_pretrained(str(tiny / "tokenizer_2"), local_files_only=True))


def hf_ids(tok, prompts, length):
    return tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def test_tokenizers_load_and_match_transformers(tiny):
    clip_tok, t5_tok = load_tokenizers(tiny / "tokenizer", tiny / "tokenizer_2")
    ref_clip, ref_t5 = hf_tokenizers(tiny)
    vocab = TINY["clip"]["vocab_size"]
    assert (clip_tok.eos_token_id, clip_tok.model_max_length) == (vocab - 1, 77)
    ids = clip_tok(PROMPTS, 77)
    assert ids[0, 0] == vocab - 2 and (ids[:, 1:20] == vocab - 1).any()  # whole-word merges: short
    assert torch.equal(ids, hf_ids(ref_clip, PROMPTS, 77))
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id) == (0, 1)
    assert torch.equal(t5_tok(PROMPTS, 40), hf_ids(ref_t5, PROMPTS, 40))


def test_tokenizers_from_tokenizer_json(tmp_path, tiny):
    for name, ref, drop in zip("ct", hf_tokenizers(tiny), (["vocab.json", "merges.txt"], ["spiece.model"])):
        ref.save_pretrained(tmp_path / name)
        for f in drop:
            (tmp_path / name / f).unlink(missing_ok=True)
        assert (tmp_path / name / "tokenizer.json").is_file()
    assert torch.equal(load_clip_tokenizer(tmp_path / "c")(PROMPTS, 77), hf_ids(hf_tokenizers(tiny)[0], PROMPTS, 77))
    assert torch.equal(load_t5_tokenizer(tmp_path / "t")(PROMPTS, 30), hf_ids(hf_tokenizers(tiny)[1], PROMPTS, 30))


def test_missing_tokenizer_folder(tmp_path, tiny):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*vocab.json"):
        load_clip_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.*spiece.model"):
        load_t5_tokenizer(missing)
    empty = tmp_path / "empty_tok"
    shutil.copytree(tiny / "tokenizer", empty)
    (empty / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="empty_tok.*merges.txt"):
        load_clip_tokenizer(empty)


# -- loading ----------------------------------------------------------------------------------------


def test_inferred_config_matches_config_json(tiny, models):
    clip, t5 = models
    inferred = load_clip_text_encoder(clip_sd(tiny))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "hidden_act", "eos_token_id"):
        assert getattr(inferred.config, key) == getattr(clip.config, key), key
    inferred_t5 = load_t5_encoder(t5_sd(tiny))
    for key in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "vocab_size", "relative_attention_num_buckets",
                "feed_forward_proj", "dense_act_fn", "is_gated_act"):
        assert getattr(inferred_t5.config, key) == getattr(t5.config, key), key

    ids = torch.randint(0, TINY["clip"]["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(inferred(ids), clip(ids))
        ids = ids[:, :40] % TINY["t5"]["vocab_size"]
        assert torch.equal(inferred_t5(ids), t5(ids))


def test_loading_assigns_without_copy_and_casts(tiny):
    sd = clip_sd(tiny)
    model = load_clip_text_encoder(sd)
    key = "text_model.embeddings.token_embedding.weight"
    assert model.embeddings.token_embedding.weight.data_ptr() == sd[key].data_ptr()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    t5 = load_t5_encoder(t5_sd(tiny), dtype=torch.bfloat16)
    assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}
    assert t5.encoder.embed_tokens.weight is t5.shared.weight


def test_optional_and_bad_keys(tiny, models):
    clip, t5 = models
    ids = torch.arange(40).unsqueeze(0)
    extra = {**clip_sd(tiny), "text_model.embeddings.position_ids": torch.arange(77)[None],
             "text_projection.weight": torch.zeros(24, 32), "logit_scale": torch.tensor(4.6)}
    model = load_clip_text_encoder(extra)  # the projection, logit scale and position ids are not used
    with torch.no_grad():
        assert torch.equal(model(ids), clip(ids))

    sd = t5_sd(tiny)
    with_embed = load_t5_encoder({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]})
    only_embed = {k if k != "shared.weight" else "encoder.embed_tokens.weight": v for k, v in sd.items()}
    with torch.no_grad():
        ref = t5(ids)
        assert torch.equal(with_embed(ids), ref)
        assert torch.equal(load_t5_encoder(only_embed)(ids), ref)

    with pytest.raises(ValueError, match="unexpected keys: text_model.bogus"):
        load_clip_text_encoder({**clip_sd(tiny), "text_model.bogus": torch.zeros(1)})
    broken = clip_sd(tiny)
    del broken["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing keys: .*layers.1.mlp.fc2.bias"):
        load_clip_text_encoder(broken, config(tiny, "text_encoder"))
    with pytest.raises(ValueError, match="decoder.block.0.layer.0.SelfAttention.q.weight"):
        load_t5_encoder({**sd, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)})
    wrong = {**config(tiny, "text_encoder"), "intermediate_size": 40}
    with pytest.raises(ValueError, match="shape mismatch"):
        load_clip_text_encoder(clip_sd(tiny), wrong)


def test_infer_configs_real_sizes():
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    clip = {"text_model.embeddings.token_embedding.weight": meta(49408, 768),
            "text_model.embeddings.position_embedding.weight": meta(77, 768),
            "text_model.encoder.layers.0.mlp.fc1.weight": meta(3072, 768),
            "text_model.encoder.layers.11.mlp.fc1.weight": meta(3072, 768)}
    cfg = infer_clip_config(clip)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.eos_token_id, cfg.hidden_act) == (12, 12, 49407, "quick_gelu")
    t5 = {"shared.weight": meta(32128, 4096),
          "encoder.block.0.layer.0.SelfAttention.q.weight": meta(4096, 4096),
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": meta(32, 64),
          "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": meta(10240, 4096),
          "encoder.block.23.layer.1.DenseReluDense.wi_0.weight": meta(10240, 4096)}
    cfg = infer_t5_config(t5)
    assert (cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.feed_forward_proj) == (64, 64, 10240, 24, "gated-gelu")


def test_t5_relu_variant_inferred():
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, num_layers=2, d_ff=24,
                      feed_forward_proj="relu", relative_attention_num_buckets=8)
    torch.manual_seed(0)
    ref = T5EncoderModel(config).eval()
    sd = {k: v for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    model = load_t5_encoder(sd)
    assert model.config.feed_forward_proj == "relu" and model.config.relative_attention_num_buckets == 8
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).last_hidden_state)


def test_full_clip_config_dict_accepted(tiny, models):
    clip, _ = models
    model = load_clip_text_encoder(clip_sd(tiny), {"model_type": "clip", "text_config": config(tiny, "text_encoder")})
    assert model.config.num_attention_heads == clip.config.num_attention_heads


# -- prompt encoding --------------------------------------------------------------------------------


def test_encode_prompt_clip_equals_pooler_output(tiny, models):
    """The pooled vector is transformers' CLIPTextModel pooler_output for transformers' own token ids."""
    from transformers import CLIPTextModel
    clip, _ = models
    ref_model = CLIPTextModel.from_pretrained(tiny / "text_encoder").eval()
    tok, ref_tok = load_clip_tokenizer(tiny / "tokenizer"), hf_tokenizers(tiny)[0]
    long_prompt = " ".join(["cat"] * 200)  # truncated to 77, EOS kept
    with torch.no_grad():
        for prompts in (PROMPTS, [long_prompt]):
            ids = hf_ids(ref_tok, prompts, 77)
            pooled = encode_prompt_clip(tok, clip, prompts, "cpu")
            torch.testing.assert_close(pooled, ref_model(ids).pooler_output, rtol=1e-5, atol=1e-5)
    assert pooled.shape == (1, TINY["clip"]["hidden_size"]) and ids[0, -1] == tok.eos_token_id  # EOS kept


def test_encode_prompt_t5_equals_model_output(tiny, models):
    _, t5 = models
    tok = load_t5_tokenizer(tiny / "tokenizer_2")
    ids = hf_ids(hf_tokenizers(tiny)[1], PROMPTS, 24)
    with torch.no_grad():
        emb = encode_prompt_t5(tok, t5, PROMPTS, 24, "cpu")
        ref = t5(ids)
    assert emb.shape == (2, 24, TINY["t5"]["d_model"])
    torch.testing.assert_close(emb, ref, rtol=0, atol=0)
    assert (ids[0] == 0).any()  # padded, and the padding is attended (no mask), like BFL/diffusers


# -- ComfyUI all-in-one file ------------------------------------------------------------------------


def test_comfy_checkpoint_parts_equal_folder_versions(tmp_path, tiny, models):
    clip, t5 = models
    sd = load_file(build_tiny_comfy_checkpoint(tmp_path / "aio.safetensors"))
    clip_c = load_clip_text_encoder(strip_prefix(sd, CLIP_PREFIX))
    t5_c = load_t5_encoder(strip_prefix(sd, T5_PREFIX))
    clip_auto = load_clip_text_encoder({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
    for a, b in [(clip_c, clip), (t5_c, t5), (clip_auto, clip)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert strip_prefix({"x.a": 1, "y.b": 2}, "x.") == {"a": 1}


def test_parity_with_transformers_from_pretrained(tiny, models):
    """Our models (whose linear layers run oneDNN GEMMs on CPU) against transformers' own loading."""
    from transformers import CLIPTextModel, T5EncoderModel
    from diffsynth.ops.linear import Linear
    clip, t5 = models
    assert type(t5.encoder.block[0].layer[0].SelfAttention.q) is Linear
    assert all(type(m) is not torch.nn.Linear for m in [*clip.modules(), *t5.modules()])
    ref_clip = CLIPTextModel.from_pretrained(tiny / "text_encoder").eval()
    ref_t5 = T5EncoderModel.from_pretrained(tiny / "text_encoder_2").eval()
    ids = torch.randint(0, TINY["clip"]["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(clip(ids), ref_clip(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
        ids = ids[:, :40] % TINY["t5"]["vocab_size"]
        torch.testing.assert_close(t5(ids), ref_t5(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
