"""Our decoder-only language model (FLUX.2's Qwen3 / Mistral prompt encoders) against transformers' Qwen3Model and
MistralModel (the oracle): random weights in transformers' key layout, right-padded batches read at every position
(the padded ones too, FLUX.2 feeds them all to the DiT), configs read from both transformers generations' files,
and what it must not import."""
import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3Model

from diffsynth.models.decoder_lm import DecoderConfig, DecoderLM

LAYERS = (3, 6, 9)
COMMON = dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=12, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)
CASES = {  # name -> (transformers' classes, their config, qk_norm)
    "qwen3": (Qwen3Config, Qwen3Model, dict(COMMON, head_dim=16), True),  # head_dim != hidden / heads
    "qwen3-bias": (Qwen3Config, Qwen3Model, dict(COMMON, head_dim=8, attention_bias=True, num_key_value_heads=1),
                   True),
    "mistral": (MistralConfig, MistralModel, dict(COMMON, num_attention_heads=6, head_dim=None), False),  # window 4096
}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random at a scale that keeps 12 layers finite: norms around one (not at it), projections of
    unit gain, biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif name.startswith("embed_tokens"):
                p.copy_(noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


_REFS: dict = {}


def reference(case: str, attn: str = "sdpa"):
    if (case, attn) not in _REFS:
        config_cls, model_cls, kwargs, _ = CASES[case]
        config = config_cls(**kwargs)
        config._attn_implementation = attn
        _REFS[case, attn] = randomized(model_cls(config), seed=len(case))
    return _REFS[case, attn]


def ours_from(ref, qk_norm: bool, num_layers: int = max(LAYERS), dtype=torch.float32) -> DecoderLM:
    """Ours built on the meta device, adopting the reference's tensors (final norm and unread layers left out)."""
    config = dataclasses.replace(DecoderConfig.from_dict(ref.config.to_dict(), qk_norm), num_hidden_layers=num_layers)
    with torch.device("meta"):
        model = DecoderLM(config)
    sd = {k: t.to(dtype) for k, t in ref.state_dict().items()
          if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= num_layers)}
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def batch(length: int = 20, real: tuple[int, ...] = (13, 7), seed: int = 0):
    ids = torch.randint(0, 100, (len(real), length), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(length)[None] < torch.tensor(real)[:, None]).long()  # right padding
    return ids, mask


def expected_states(ref, ids, mask, layers=LAYERS):
    with torch.no_grad():
        states = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    return [states[k] for k in layers]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers_on_padded_batches(case):
    ref = reference(case)
    ours = ours_from(ref, CASES[case][3])
    assert ours.config.qk_norm == CASES[case][3] and len(ours.layers) == max(LAYERS)
    ids, mask = batch()
    with torch.no_grad():
        got = ours(ids, mask, LAYERS)
    for k, g, e in zip(LAYERS, got, expected_states(ref, ids, mask)):
        assert g.shape == (2, 20, 48) and g.dtype == torch.float32
        assert rel(g, e) <= 1e-5, k
        assert rel(g[mask == 0], e[mask == 0]) <= 1e-5, k  # the padded positions, which FLUX.2 reads too
    # unpadded (no mask, or a mask of ones: SDPA's own causal mask), and the embeddings as "layer 0"
    ids, mask = batch(real=(20, 20), seed=1)
    with torch.no_grad():
        for m in (mask, None):
            for k, g, e in zip((0, 9, 2), ours(ids, m, (0, 9, 2)), expected_states(ref, ids, mask, (0, 9, 2))):
                assert rel(g, e) <= 1e-5, (k, m is None)


def test_matches_transformers_eager_attention():
    """Eager attention (a float mask of dtype-min added to the scores) gives the same states as SDPA's boolean one."""
    ref = reference("qwen3", "eager")
    ours = ours_from(ref, qk_norm=True)
    ids, mask = batch(real=(20, 4), seed=2)
    with torch.no_grad():
        got = ours(ids, mask, LAYERS)
    for k, g, e in zip(LAYERS, got, expected_states(ref, ids, mask)):
        assert rel(g, e) <= 1e-5 and rel(g[mask == 0], e[mask == 0]) <= 1e-5, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_transformers(dtype):
    for case in ("qwen3", "mistral"):
        ref = reference(case)
        ids, mask = batch(seed=3)
        expected = expected_states(ref, ids, mask)
        ours = ours_from(ref, CASES[case][3], dtype=dtype)
        # transformers' model with its weights in `dtype`, its rotary frequencies kept in fp32 as diffsynth's loader
        # adopts it (`model.to(dtype)` would round them too: ~1e-2 off in bf16)
        ref_half = copy.deepcopy(ref)
        for p in ref_half.parameters():
            p.data = p.data.to(dtype)
        with torch.no_grad():
            got = ours(ids, mask, LAYERS)
            expected_half = expected_states(ref_half, ids, mask)
        for k, g, e, h in zip(LAYERS, got, expected, expected_half):
            assert g.dtype == dtype and torch.isfinite(g).all()
            assert rel(g, h) < 5e-3, (case, k)  # the same computation in the same dtype (bit for bit on MKL)
            assert rel(g, e) < 5e-2, (case, k)  # against fp32


def test_gradients_match_transformers():
    """Under autograd the states carry the same gradients into the weights (LoRA training reads them)."""
    ref = reference("qwen3-bias")
    ours = ours_from(ref, qk_norm=True)
    ids, mask = batch(seed=4)
    weight = torch.randn(48, generator=torch.Generator().manual_seed(5))
    loss = sum((s * weight).square().mean() for s in ours(ids, mask, LAYERS))
    loss.backward()
    states = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ref.zero_grad()
    sum((states[k] * weight).square().mean() for k in LAYERS).backward()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.2.self_attn.k_norm.weight", "layers.8.mlp.up_proj.weight",
                 "layers.4.self_attn.v_proj.bias", "embed_tokens.weight"):
        got, expected = ours.get_parameter(name).grad, ref.get_parameter(name).grad
        assert rel(got, expected) <= 1e-5, name
    ref.zero_grad()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_state_dict_loads_strictly(case):
    """Every tensor of transformers' model but its final norm has our name and shape (whole model here); loading
    refuses the final norm."""
    ref = reference(case)
    config = DecoderConfig.from_dict(ref.config.to_dict(), CASES[case][3])
    with torch.device("meta"):
        ours = DecoderLM(config)
    sd = {k: t for k, t in ref.state_dict().items() if k != "norm.weight"}
    assert {k: tuple(t.shape) for k, t in ours.state_dict().items()} == {k: tuple(t.shape) for k, t in sd.items()}
    ours.load_state_dict(sd, assign=True, strict=True)
    assert not any(p.is_meta for p in ours.parameters())
    with pytest.raises(RuntimeError, match="norm.weight"):
        ours.load_state_dict(ref.state_dict(), assign=True, strict=True)


def test_forward_refuses_what_it_cannot_give():
    ours = ours_from(reference("mistral"), qk_norm=False, num_layers=4)
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"layers \[2, 5\].*has 4 layers"):
        ours(ids, mask, (2, 5))
    with pytest.raises(ValueError, match="does not fit"):
        ours(ids, mask[:, :5], (2,))
    narrow = dataclasses.replace(ours.config, sliding_window=16)
    with torch.device("meta"):
        windowed = DecoderLM(narrow)
    windowed.load_state_dict(ours.state_dict(), assign=True)
    with pytest.raises(ValueError, match="20 tokens exceed the model's sliding window of 16"):
        windowed(ids, mask, (2,))
    assert windowed(ids[:, :16], mask[:, :16], (2,))[0].shape == (2, 16, 48)


QWEN3_4 = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
               rope_scaling=None, use_sliding_window=False, sliding_window=None, max_window_layers=3,
               model_type="qwen3", torch_dtype="bfloat16", architectures=["Qwen3ForCausalLM"])


def test_from_dict_reads_both_transformers_generations():
    # transformers 4's file: rope_theta beside the rest; transformers 5 reads it the same way
    c4 = DecoderConfig.from_dict(QWEN3_4, qk_norm=True)
    assert (c4.head_dim, c4.num_key_value_heads, c4.rope_theta, c4.sliding_window) == (32, 2, 1e6, None)
    assert Qwen3Config(**QWEN3_4).rope_parameters["rope_theta"] == c4.rope_theta
    # transformers 5's: rope_parameters
    d5 = Qwen3Config(**{**QWEN3_4, "rope_theta": 5e5}).to_dict()
    assert "rope_parameters" in d5 and DecoderConfig.from_dict(d5, qk_norm=True).rope_theta == 5e5
    assert DecoderConfig.from_dict({**QWEN3_4, "rope_theta": None, "rope_parameters": {
        "rope_type": "default", "rope_theta": 2e6}}, qk_norm=True).rope_theta == 2e6
    # a "default" rope_scaling (transformers 4.4x writes it so) is plain RoPE
    assert DecoderConfig.from_dict({**QWEN3_4, "rope_scaling": {"rope_type": "default"}}, True).rope_theta == 1e6
    # no RoPE keys at all: transformers' 10000
    bare = {k: v for k, v in QWEN3_4.items() if k not in ("rope_theta", "rope_scaling")}
    assert DecoderConfig.from_dict(bare, True).rope_theta == Qwen3Config(**bare).rope_parameters["rope_theta"]
    # head_dim absent or None (Mistral's): hidden / heads; missing kv heads: as many as the query heads
    for d in ({**QWEN3_4, "head_dim": None}, {k: v for k, v in QWEN3_4.items() if k != "head_dim"}):
        assert DecoderConfig.from_dict(d, qk_norm=False).head_dim == 16
    assert DecoderConfig.from_dict({**QWEN3_4, "num_key_value_heads": None}, True).num_key_value_heads == 4
    # a Mistral3 config's text_config; Mistral-Small-3's window is off, Mistral 7B's (4096) covers FLUX.2's prompts
    mistral = MistralConfig(**{**COMMON, "sliding_window": None, "rope_theta": 1e9, "head_dim": 128}).to_dict()
    c = DecoderConfig.from_dict({"model_type": "mistral3", "text_config": mistral}, qk_norm=False)
    assert (c.head_dim, c.rope_theta, c.sliding_window, c.qk_norm) == (128, 1e9, None, False)
    assert DecoderConfig.from_dict({**mistral, "sliding_window": 4096}, False).sliding_window == 4096
    # Qwen's window only counts when switched on
    assert DecoderConfig.from_dict({**QWEN3_4, "sliding_window": 64}, True).sliding_window is None


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "RoPE type 'llama3'"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     "RoPE type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(use_sliding_window=True, sliding_window=256), "sliding_window 256"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(hidden_size=None), r"missing \['hidden_size'\]"),
])
def test_from_dict_refuses_what_it_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_dict({**QWEN3_4, **change}, qk_norm=True)
    if "rope_scaling" in change or "rope_parameters" in change:  # Mistral's files the same way
        with pytest.raises(ValueError, match=message):
            DecoderConfig.from_dict({**QWEN3_4, "model_type": "mistral", **change}, qk_norm=False)


def test_meta_build_and_cpu_run_import_neither_transformers_nor_dynamo():
    code = """
import sys, torch
from diffsynth.models.decoder_lm import DecoderConfig, DecoderLM
config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, qk_norm=True)
with torch.device("meta"):
    model = DecoderLM(config)
g = torch.Generator().manual_seed(0)
model.load_state_dict({k: torch.randn(t.shape, generator=g) * 0.2 for k, t in model.state_dict().items()},
                      assign=True, strict=True)
mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
states = model(torch.randint(0, 50, (2, 10), generator=g), mask, (1, 3))
assert [tuple(s.shape) for s in states] == [(2, 10, 32)] * 2 and all(torch.isfinite(s).all() for s in states)
bad = [m for m in ("transformers", "torch._dynamo") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
