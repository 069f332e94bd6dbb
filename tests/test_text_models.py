"""Our CLIP text and T5 encoder modules against transformers' CLIPTextModel / T5EncoderModel (the oracle), on
random weights in transformers' key layout, and what they must not do (import transformers)."""
import subprocess
import sys

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config
from transformers import T5EncoderModel as HFT5EncoderModel

from diffsynth.models.clip_text import ClipTextConfig, ClipTextModel
from diffsynth.models.flux_text_encoders import load_clip_text_encoder, load_t5_encoder
from diffsynth.models.t5_encoder import T5EncoderConfig, T5EncoderModel, relative_position_buckets


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (transformers initialises norms to one and biases to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CLIP = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=20, bos_token_id=118, eos_token_id=119, pad_token_id=119)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_matches_transformers(act):
    ref = randomized(CLIPTextModel(CLIPTextConfig(**CLIP, hidden_act=act)), seed=1)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    ours = load_clip_text_encoder(sd, {**CLIP, "hidden_act": act})
    assert isinstance(ours, ClipTextModel) and ours.config.hidden_act == act
    ids = torch.randint(0, 120, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        assert rel(ours(ids), expected) < 1e-6
        assert rel(ours(ids[:, :7]), ref(ids[:, :7]).last_hidden_state) < 1e-6  # shorter than the table
        ours_bf16, ref_bf16 = load_clip_text_encoder(sd, {**CLIP, "hidden_act": act}, torch.bfloat16), \
            ref.to(torch.bfloat16)
        assert rel(ours_bf16(ids), expected) < 3e-2 and rel(ref_bf16(ids).last_hidden_state, expected) < 3e-2
    with pytest.raises(ValueError, match="21 tokens, at most 20"):
        ours(torch.zeros(1, 21, dtype=torch.long))


def t5_reference(proj: str, seed: int) -> HFT5EncoderModel:
    config = T5Config(vocab_size=90, d_model=48, d_kv=12, d_ff=80, num_layers=3, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=20, feed_forward_proj=proj)
    return randomized(HFT5EncoderModel(config), seed)


@pytest.mark.parametrize("proj", ["gated-gelu", "relu", "gated-silu"])
def test_t5_matches_transformers(proj):
    ref = t5_reference(proj, seed=3)
    ours = load_t5_encoder(ref.state_dict(), ref.config.to_dict())
    assert isinstance(ours, T5EncoderModel) and ours.config.feed_forward_proj == proj
    assert ours.config.relative_attention_max_distance == 20
    g = torch.Generator().manual_seed(4)
    for length in (7, 64):  # 64 tokens reach the logarithmic buckets and the max-distance cap
        ids = torch.randint(0, 90, (2, length), generator=g)
        with torch.no_grad():
            assert rel(ours(ids), ref(ids).last_hidden_state) < 1e-6
    assert ours.shared.weight is ours.encoder.embed_tokens.weight


def test_t5_bf16_and_fp16_follow_transformers():
    ref = t5_reference("gated-gelu", seed=5)
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        for dtype in (torch.bfloat16, torch.float16):
            ours = load_t5_encoder(ref.state_dict(), ref.config.to_dict(), dtype)
            out = ours(ids)
            assert out.dtype == dtype and rel(out, expected) < 3e-2


def test_t5_fp16_overflow_is_clamped():
    ref = t5_reference("gated-gelu", seed=7)
    with torch.no_grad():  # activations past fp16's range in block 0's feed-forward
        for name in ("wi_1", "wo"):
            getattr(ref.encoder.block[0].layer[1].DenseReluDense, name).weight.mul_(1000)
    ours = load_t5_encoder(ref.state_dict(), ref.config.to_dict(), torch.float16)
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        block = ours.encoder.block[0]
        x = ours.shared(ids)
        bias = block.layer[0].SelfAttention.position_bias(12, x.device)
        assert not torch.isfinite(block.layer[1](block.layer[0](x, bias))).all()  # unclamped, it overflows
        assert torch.isfinite(block(x, bias)).all()
        out, expected = ours(ids), ref.half()(ids).last_hidden_state
    assert torch.isfinite(out).all() and rel(out, expected) < 1e-2


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention
    pos = torch.arange(300)
    expected = HFT5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                                      num_buckets=32, max_distance=128)
    assert torch.equal(relative_position_buckets(300, 32, 128), expected)


def test_configs_reject_what_they_cannot_run():
    with pytest.raises(ValueError, match="hidden_act 'swishy'"):
        ClipTextConfig(hidden_act="swishy")
    with pytest.raises(ValueError, match="not a multiple"):
        ClipTextConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-gelu-x'"):
        T5EncoderConfig(feed_forward_proj="gated-gelu-x")
    with pytest.raises(ValueError, match="feed_forward_proj 'tanh'"):
        T5EncoderConfig(feed_forward_proj="tanh")
    assert T5EncoderConfig(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert ClipTextConfig.from_dict({"text_config": {"hidden_size": 64, "num_attention_heads": 4,
                                                     "projection_dim": None}}).hidden_size == 64


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_generation_imports_neither_transformers_nor_dynamo(family, tmp_path):
    """A fresh process loads a FLUX.1 or FLUX.2 [klein] folder and draws an image without importing transformers
    or torch._dynamo (together about 2.5 s of its time to first image)."""
    if family == "flux1":
        from diffsynth.testing import build_tiny_flux
        root, pipeline = build_tiny_flux(tmp_path / "FLUX.1-dev"), "FluxImagePipeline"
        files = ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")
    else:
        from diffsynth.testing.tiny_flux2 import build_tiny_flux2
        root, pipeline = build_tiny_flux2(tmp_path / "FLUX.2-klein"), "Flux2ImagePipeline"
        files = ("text_encoder/", "transformer/", "vae/diffusion_pytorch_model.safetensors")
    code = f"""
import sys, torch
from diffsynth import {pipeline} as Pipeline, ModelConfig
pipe = Pipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
    ModelConfig(path={str(root)!r} + "/" + p) for p in {files!r}])
pipe("a cat", height=64, width=64, num_inference_steps=1, seed=0, progress_bar_cmd=lambda x: x)
bad = [m for m in ("transformers", "torch._dynamo") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
