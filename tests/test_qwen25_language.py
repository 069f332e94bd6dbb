"""The language side of Qwen2.5-VL (decoder_lm.DecoderLM with Qwen2's q/k/v biases and the final norm, mrope.py's
3-D positions and rotary tables) against transformers' Qwen2_5_VLModel (the oracle): `get_rope_index` on text and
image sequences (padded left and right, holes in the mask), the language model's last hidden state from
`inputs_embeds` in fp32 and bf16 (padded rows included: SDPA gives a query that sees no key zeros, in both), configs
of both transformers generations, and what the modules must not import."""
import copy
import dataclasses
import subprocess
import sys

import pytest
import torch

from diffsynth.models.decoder_lm import DecoderConfig, DecoderLM, rope_tables
from diffsynth.models.mrope import mrope_tables, rope_index
from diffsynth.testing.tiny_qwen import TINY_QWEN, tiny_qwen_config, tiny_token_ids

TOKENS = tiny_token_ids()
IMAGE, START, END = TOKENS["<|image_pad|>"], TOKENS["<|vision_start|>"], TOKENS["<|vision_end|>"]
MERGE = TINY_QWEN["vision"]["spatial_merge_size"]
HIDDEN = TINY_QWEN["hidden_size"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sequence(*parts) -> list[int]:
    """Token ids: an int n is n text tokens, a (t, h, w) patch grid an image as the chat template writes it
    (vision start, its merged placeholders, vision end)."""
    ids = []
    for part in parts:
        if isinstance(part, tuple):
            t, h, w = part
            ids += [START] + [IMAGE] * (t * h * w // MERGE ** 2) + [END]
        else:
            ids += [100 + (7 * len(ids) + 3 * k) % 900 for k in range(part)]  # ordinary vocabulary tokens
    return ids


def grids(*rows) -> torch.Tensor | None:
    thw = [p for parts in rows for p in parts if isinstance(p, tuple)]
    return torch.tensor(thw) if thw else None


def padded(rows, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, L) of `rows` (each a list of parts for `sequence`), padded to the longest with token 0."""
    seqs = [sequence(*parts) for parts in rows]
    length = max(len(s) for s in seqs)
    ids, mask = torch.zeros(len(seqs), length, dtype=torch.long), torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = torch.tensor(s), 1
    return ids, mask


@pytest.fixture(scope="module")
def reference():
    """transformers' Qwen2_5_VLModel of the tiny config (SDPA), its language model's weights random at a scale
    that keeps the states finite and every tensor (biases, norms) away from its init value."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    config = Qwen2_5_VLConfig.from_dict(tiny_qwen_config())
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLModel(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return model


def expected_index(reference, ids, thw, mask):
    """transformers 5's get_rope_index, given the modality of each token as its processor marks it."""
    return reference.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE).int(), image_grid_thw=thw,
                                    attention_mask=mask)


def our_index(ids, thw, mask):
    return rope_index(ids, thw, mask, image_token_id=IMAGE, vision_start_token_id=START, spatial_merge_size=MERGE)


CASES = {  # name -> (rows of parts, left padding)
    "text": ([(9,)], False),
    "text-padded": ([(9,), (4,)], False),
    "one-image": ([(3, (1, 4, 6), 5)], False),
    "two-grids": ([(2, (1, 4, 6), 3, (1, 8, 2), 4)], False),
    "right-padded": ([(3, (1, 4, 6), 5), (1, (1, 2, 4), 2)], False),
    "left-padded": ([(3, (1, 4, 6), 5), (1, (1, 2, 4), 2)], True),
    "placements": ([((1, 4, 4), 6), (5, (1, 6, 2)), (2, (1, 2, 2), (1, 4, 2), 1), (0, (1, 2, 6))], False),
    "left-placements": ([((1, 4, 4), 6), (5, (1, 6, 2)), (2, (1, 2, 2), (1, 4, 2), 1)], True),
    "video-like-grid": ([(2, (2, 4, 4), 3)], False),  # t > 1 (an image processor gives t = 1; transformers allows it)
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_matches_transformers(reference, case):
    rows, left = CASES[case]
    ids, mask = padded(rows, left)
    thw = grids(*rows)
    for m in (mask, None) if bool(mask.all()) else (mask,):
        expected_positions, expected_deltas = expected_index(reference, ids, thw, m)
        positions, deltas = our_index(ids, thw, m)
        assert positions.shape == (3, *ids.shape) and deltas.shape == (len(rows), 1)
        assert positions.dtype == expected_positions.dtype and deltas.dtype == expected_deltas.dtype
        assert torch.equal(positions, expected_positions), case
        assert torch.equal(deltas, expected_deltas), case
    if thw is not None:  # the images do move the positions (the comparison is not between two aranges)
        assert not torch.equal(positions[1], positions[2])


def test_rope_index_skips_holes_in_the_mask(reference):
    """Step1X masks token id 0 wherever it sits: masked tokens inside a row are left out of the count."""
    rows = [(4, (1, 4, 6), 6), (2, (1, 2, 2), 3)]
    ids, mask = padded(rows)
    mask[0, [1, 13]] = 0
    mask[1, 6] = 0
    expected = expected_index(reference, ids, grids(*rows), mask)
    got = our_index(ids, grids(*rows), mask)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_rope_index_worked_example():
    """The module docstring's example (a 4 x 6 patch grid, 2 x 3 merged tokens): text resumes at the image's start
    + max(h, w) = 3 + 3."""
    ids = torch.tensor([[11, 12, START] + [IMAGE] * 6 + [END, 13]])
    positions, deltas = rope_index(ids, torch.tensor([[1, 4, 6]]), None, image_token_id=IMAGE,
                                   vision_start_token_id=START, spatial_merge_size=2)
    assert positions[:, 0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                                        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]
    assert deltas.tolist() == [[8 - 11]]


@pytest.mark.parametrize("rows, thw, message", [
    ([(3, (1, 4, 6), 2)], torch.tensor([[1, 4, 6], [1, 2, 2]]), "image_grid_thw has 2 images, input_ids 1"),
    ([(3, (1, 4, 6), 2, (1, 2, 2))], torch.tensor([[1, 4, 6]]), "more images than the 1 of image_grid_thw"),
    ([(3, (1, 4, 6), 2)], None, "more images than the 0 of image_grid_thw"),
    ([(3, (1, 4, 6), 2)], torch.tensor([[1, 4, 4]]), r"6 placeholder tokens, its grid \(1, 4, 4\).* gives 4"),
])
def test_rope_index_refuses_mismatched_images(rows, thw, message):
    ids, mask = padded(rows)
    with pytest.raises(ValueError, match=message):
        our_index(ids, thw, mask)


def test_rope_index_refuses_malformed_inputs():
    ids, mask = padded([(3, (1, 2, 2), 2)])
    no_start = ids.clone()
    no_start[0, 3] = 5  # the vision start before the image
    with pytest.raises(ValueError, match="image 0 .row 0. does not follow the vision start token"):
        our_index(no_start, torch.tensor([[1, 2, 2]]), mask)
    with pytest.raises(ValueError, match="does not fit input_ids"):
        our_index(ids, torch.tensor([[1, 2, 2]]), mask[:, 1:])
    with pytest.raises(ValueError, match="row 0 has no tokens"):
        our_index(ids, torch.tensor([[1, 2, 2]]), torch.zeros_like(mask))


def test_mrope_tables_match_transformers_rotary_embedding(reference):
    rows = [(2, (1, 4, 6), 3, (1, 8, 2), 4), (1, (1, 2, 4), 2)]
    ids, mask = padded(rows, left=True)
    positions, _ = our_index(ids, grids(*rows), mask)
    like = torch.zeros(1, dtype=torch.bfloat16)
    lm = reference.language_model
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(2, ids.shape[1], HIDDEN, dtype=dtype)
        expected = lm.rotary_emb(x, positions)  # (B, L, head_dim) each
        got = mrope_tables(positions, 12, 1e6, [2, 2, 2], like.to(dtype))
        for g, e in zip(got, expected):
            assert g.shape == (2, 1, ids.shape[1], 12) and g.dtype == dtype
            assert torch.equal(g[:, 0], e)  # the same fp32 products, each frequency's own position row
    # text alone (t = h = w): M-RoPE is plain RoPE
    text = torch.arange(7).expand(3, 1, 7)
    for g, e in zip(mrope_tables(text, 12, 1e6, (2, 2, 2), like), rope_tables(7, 12, 1e6, like)):
        assert torch.equal(g, e)
    with pytest.raises(ValueError, match=r"mrope_section \[2, 2, 3\] does not split head_dim / 2 = 6"):
        mrope_tables(text, 12, 1e6, [2, 2, 3], like)
    with pytest.raises(ValueError, match=r"position_ids \(1, 7\) are not \(3, B, L\)"):
        mrope_tables(text[0], 12, 1e6, [2, 2, 2], like)


def ours_from(reference, dtype=torch.float32) -> DecoderLM:
    """Ours built on the meta device from the reference's config, adopting its language model's tensors strictly
    (every name, final norm included, and no o_proj bias: Qwen2 has none)."""
    config = DecoderConfig.from_dict(reference.config.to_dict(), qk_norm=False, qkv_bias=True)
    with torch.device("meta"):
        model = DecoderLM(config, final_norm=True)
    sd = {k: t.to(dtype) for k, t in reference.language_model.state_dict().items()}
    assert "layers.0.self_attn.q_proj.bias" in sd and "layers.0.self_attn.o_proj.bias" not in sd
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


DECODER_CASES = {  # name -> (rows, left padding, holes in the mask)
    "text": ([(12,)], False, ()),
    "right-padded": ([(3, (1, 4, 6), 5), (1, (1, 2, 4), 2)], False, ()),
    "left-padded": ([(3, (1, 4, 6), 5), (1, (1, 2, 4), 2)], True, ()),
    "holes": ([(2, (1, 4, 6), 3, (1, 8, 2), 4), ((1, 2, 2), 9)], False, ((0, 1), (0, 20), (1, 6))),
}


def decoder_inputs(reference, case: str, dtype=torch.float32):
    rows, left, holes = DECODER_CASES[case]
    ids, mask = padded(rows, left)
    for row, col in holes:
        mask[row, col] = 0
    positions, _ = our_index(ids, grids(*rows), mask)
    assert torch.equal(positions, expected_index(reference, ids, grids(*rows), mask)[0])
    embeds = torch.randn(*ids.shape, HIDDEN, generator=torch.Generator().manual_seed(len(case))).to(dtype)
    return embeds, positions, mask


def expected_last_state(lm, embeds, positions, mask):
    with torch.no_grad():
        return lm(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False).last_hidden_state


def run_ours(model, embeds, positions, mask):
    c = model.config
    cos, sin = mrope_tables(positions, c.head_dim, c.rope_theta, c.mrope_section, embeds)
    with torch.no_grad():
        return model.forward_embeds(embeds, cos, sin, mask)


@pytest.mark.parametrize("case", sorted(DECODER_CASES))
def test_last_hidden_state_matches_transformers(reference, case):
    ours = ours_from(reference)
    assert ours.config.mrope_section == (2, 2, 2) and ours.norm is not None
    embeds, positions, mask = decoder_inputs(reference, case)
    expected = expected_last_state(reference.language_model, embeds, positions, mask)
    got = run_ours(ours, embeds, positions, mask)
    assert got.shape == embeds.shape and got.dtype == torch.float32 and torch.isfinite(got).all()
    err = rel(got, expected)
    print(f"{case}: fp32 rel err {err:.2e}")
    assert err <= 1e-5
    if not bool(mask.all()):  # the padded rows too: deterministic in both (SDPA's zeros where no key is seen)
        assert rel(got[mask == 0], expected[mask == 0]) <= 1e-5


def test_bf16_follows_transformers(reference):
    embeds, positions, mask = decoder_inputs(reference, "left-padded")
    expected = expected_last_state(reference.language_model, embeds, positions, mask)
    # transformers' language model with its weights in bf16, its rotary frequencies kept in fp32 (as a bf16 load
    # keeps that buffer)
    lm_bf16 = copy.deepcopy(reference.language_model)
    for p in lm_bf16.parameters():
        p.data = p.data.to(torch.bfloat16)
    expected_bf16 = expected_last_state(lm_bf16, embeds.bfloat16(), positions, mask)
    got = run_ours(ours_from(reference, torch.bfloat16), embeds.bfloat16(), positions, mask)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    same, fp32 = rel(got, expected_bf16), rel(got, expected)
    print(f"bf16 rel err: {same:.2e} vs transformers bf16, {fp32:.2e} vs fp32")
    assert same < 5e-3 and fp32 < 5e-2


def test_forward_embeds_shares_the_stack_with_forward(reference):
    """Without the final norm, forward_embeds with plain RoPE tables is forward's state after the last layer."""
    config = DecoderConfig.from_dict(tiny_qwen_config(), qk_norm=False, qkv_bias=True)
    with torch.device("meta"):
        model = DecoderLM(config)
    assert model.norm is None
    sd = {k: t for k, t in reference.language_model.state_dict().items() if k != "norm.weight"}
    model.load_state_dict(sd, assign=True, strict=True)
    ids, mask = padded([(9,), (5,)])
    embeds = model.embed_tokens(ids)
    with torch.no_grad():
        expected = model(ids, mask, [2])[0]
        got = model.forward_embeds(embeds, *rope_tables(ids.shape[1], 12, 1e6, embeds), mask)
    assert torch.equal(got, expected)
    cos, sin = rope_tables(5, 12, 1e6, embeds)
    with pytest.raises(ValueError, match=r"rotary table cos \(1, 1, 5, 12\) does not fit 9 tokens"):
        model.forward_embeds(embeds, cos, sin, mask)
    with pytest.raises(ValueError, match="does not fit the inputs"):
        model.forward_embeds(embeds, *rope_tables(9, 12, 1e6, embeds), mask[:, 1:])


def test_biases_follow_each_architecture():
    """Qwen2: q/k/v biases, none on o_proj; transformers' attention_bias (Qwen3): all four; Mistral: none."""
    base = DecoderConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    for config, biased in ((dataclasses.replace(base, qkv_bias=True), "qkv"),
                           (dataclasses.replace(base, attention_bias=True), "qkvo"), (base, "")):
        with torch.device("meta"):
            attn = DecoderLM(config).layers[0].self_attn
        assert [n for n in "qkvo" if getattr(attn, f"{n}_proj").bias is not None] == list(biased)


QWEN25_7B = dict(  # the release's config.json (transformers 4 layout), vision and token ids left out
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=128000, max_window_layers=28, rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, sliding_window=32768, use_sliding_window=False,
    vocab_size=152064, torch_dtype="bfloat16", vision_config={"hidden_size": 1280, "spatial_merge_size": 2})


def test_from_dict_reads_both_transformers_generations():
    from transformers import Qwen2_5_VLConfig
    flat = tiny_qwen_config()  # transformers 4's file: flat, rope_scaling of type "mrope", rope_theta beside it
    nested = Qwen2_5_VLConfig.from_dict(flat).to_dict()  # transformers 5's: text_config with rope_parameters
    assert "hidden_size" not in nested and nested["text_config"]["rope_parameters"]["rope_type"] == "default"
    hand5 = {"model_type": "qwen2_5_vl", "text_config": {
        **{k: v for k, v in flat.items() if k not in ("rope_scaling", "rope_theta", "vision_config")},
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]}}}
    saved4 = {**flat, "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [2, 2, 2]}}
    configs = [DecoderConfig.from_dict(d, qk_norm=False, qkv_bias=True) for d in (flat, nested, hand5, saved4)]
    assert all(c == configs[0] for c in configs)
    c = configs[0]
    assert (c.head_dim, c.rope_theta, c.mrope_section, c.num_key_value_heads, c.sliding_window) == \
        (12, 1e6, (2, 2, 2), 2, None)
    assert (c.qkv_bias, c.attention_bias, c.qk_norm) == (True, False, False)
    big = DecoderConfig.from_dict(QWEN25_7B, qk_norm=False, qkv_bias=True)
    assert (big.head_dim, big.mrope_section, big.sliding_window, big.rope_theta) == (128, (16, 24, 24), None, 1e6)
    # a plain RoPE config has no sections
    assert DecoderConfig.from_dict({**flat, "rope_scaling": None}, qk_norm=False).mrope_section is None


@pytest.mark.parametrize("rope, message", [
    ({"type": "yarn", "factor": 4.0, "mrope_section": [2, 2, 2]}, "RoPE type 'yarn'"),
    ({"rope_type": "linear", "factor": 2.0}, "RoPE type 'linear'"),
    ({"type": "mrope", "mrope_section": [2, 2, 2], "mrope_interleaved": True}, "interleaved multimodal RoPE"),
    ({"type": "mrope", "mrope_section": [4, 2, 2]}, r"mrope_section \[4, 2, 2\] does not split head_dim / 2 = 6"),
    ({"type": "mrope", "mrope_section": [3, 3]}, r"mrope_section \[3, 3\] does not split"),
])
def test_from_dict_refuses_scaled_rope(rope, message):
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_dict({**tiny_qwen_config(), "rope_scaling": rope}, qk_norm=False, qkv_bias=True)
    nested = {"text_config": {**tiny_qwen_config(), "rope_scaling": None, "rope_parameters": rope}}
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_dict(nested, qk_norm=False, qkv_bias=True)


def test_modules_run_without_transformers():
    code = """
import sys, torch
from diffsynth.models.decoder_lm import DecoderConfig, DecoderLM
from diffsynth.models.mrope import mrope_tables, rope_index
config = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, qkv_bias=True, mrope_section=(2, 1, 1))
with torch.device("meta"):
    model = DecoderLM(config, final_norm=True)
g = torch.Generator().manual_seed(0)
model.load_state_dict({k: torch.randn(t.shape, generator=g) * 0.2 for k, t in model.state_dict().items()},
                      assign=True, strict=True)
ids = torch.tensor([[3, 4, 5, 1] + [2] * 6 + [6], [0, 0, 0, 3, 1, 2, 2, 6, 7, 8, 9]])
mask = (ids != 0).long()
positions, deltas = rope_index(ids, torch.tensor([[1, 4, 6], [1, 2, 4]]), mask, image_token_id=2,
                               vision_start_token_id=1, spatial_merge_size=2)
embeds = model.embed_tokens(ids)
cos, sin = mrope_tables(positions, 8, 1e6, config.mrope_section, embeds)
out = model.forward_embeds(embeds, cos, sin, mask)
assert out.shape == (2, 11, 32) and torch.isfinite(out).all()
assert "transformers" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
