"""EliGen: the regional attention mask (vs a naive construction and a dense masked attention), entity prompts,
negative side, inpainting, bad inputs."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.models.flux_dit import Extensions, FluxDiT, FluxDiTConfig, image_ids
from diffsynth.ops.attention import get_attention_backend, set_attention_backend
from diffsynth.pipelines.variants.eligen import entity_attention_mask, entity_masks, token_regions

quiet = dict(progress_bar_cmd=lambda x: x)
KW = dict(prompt="a garden", height=64, width=64, num_inference_steps=2, t5_sequence_length=16, seed=2,
          output_type="latent", **quiet)


def _mask(box, size=(64, 64)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


MASKS = [_mask((0, 0, 32, 64)), _mask((32, 16, 64, 48))]
PROMPTS = ["a red flower", "a blue bird"]


def naive_mask(regions, entity_len, global_len, n_image):
    """Pairwise rules, one element at a time."""
    n = regions.shape[0]
    groups = [i for i in range(n) for _ in range(entity_len)] + [n] * global_len
    t = len(groups)
    m = torch.ones(t + n_image, t + n_image, dtype=torch.bool)
    for a, ga in enumerate(groups):
        for b, gb in enumerate(groups):
            m[a, b] = ga == gb
        for p in range(n_image):
            allowed = ga == n or (p < regions.shape[1] and bool(regions[ga, p]))
            m[a, t + p] = m[t + p, a] = allowed
    return m


def test_mask_matches_the_pairwise_rules():
    g = torch.Generator().manual_seed(0)
    regions = torch.rand(3, 10, generator=g) > 0.5
    got = entity_attention_mask(regions[None], entity_len=2, global_len=3, n_image=12).dense()
    assert got.shape == (1, 1, 21, 21) and got.dtype == torch.bool
    assert torch.equal(got[0, 0], naive_mask(regions, 2, 3, 12))


def test_masks_are_resized_binarised_and_patched():
    big = [_mask((0, 0, 256, 512), (512, 512)), _mask((256, 128, 512, 384), (512, 512))]
    grid = entity_masks(big, 2, 64, 64)  # 512 px masks -> 8x8 latent grid
    assert grid.shape == (2, 8, 8)
    assert grid[0, :, :4].all() and not grid[0, :, 4:].any()
    regions = token_regions(grid)
    assert regions.shape == (2, 16) and regions[1].sum() == 4


@pytest.mark.parametrize("block_elements", [None, 50])  # the whole mask at once; 2 query rows per block
def test_masked_blocks_match_dense_attention(monkeypatch, block_elements):
    """Every block with the EliGen mask through SDPA equals plain softmax attention with an additive mask."""
    if block_elements:
        monkeypatch.setattr("diffsynth.ops.attention_mask.BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    dit = FluxDiT(FluxDiTConfig(hidden_size=32, num_heads=2, num_double_blocks=2, num_single_blocks=2,
                                context_dim=16, pooled_dim=8, axes_dim=(4, 6, 6))).eval()
    n_txt, n = 6, 16
    regions = torch.rand(1, 2, n) > 0.5
    mask = entity_attention_mask(regions, entity_len=2, global_len=2, n_image=n)
    args = (torch.randn(1, n, 64), image_ids(8, 8), torch.randn(1, n_txt, 16), torch.zeros(1, n_txt, 3),
            torch.tensor([0.5]), torch.randn(1, 8), torch.tensor([3.5]))
    previous = get_attention_backend()
    try:
        set_attention_backend("sdpa")
        sdpa = dit(*args, ext=Extensions(mask=mask))
        set_attention_backend("math")
        dense_mask = mask.dense()
        additive = torch.zeros(dense_mask.shape).masked_fill(~dense_mask, float("-inf"))
        dense = dit(*args, ext=Extensions(mask=additive))
    finally:
        set_attention_backend(previous)
    unmasked = dit(*args)
    assert torch.allclose(sdpa, dense, atol=1e-5, rtol=1e-5)
    assert (sdpa - unmasked).abs().max() > 1e-3


def test_entities_change_the_image_and_cfg_paths_agree(tiny_pipe):
    base = tiny_pipe(**KW)
    eligen = tiny_pipe(**KW, eligen_entity_prompts=PROMPTS, eligen_entity_masks=MASKS)
    assert (eligen - base).abs().max() > 1e-4
    cfg = dict(KW, negative_prompt="blurry", cfg_scale=2.0, eligen_entity_prompts=PROMPTS, eligen_entity_masks=MASKS)
    on_negative = tiny_pipe(**cfg, eligen_enable_on_negative=True)
    assert torch.allclose(on_negative, tiny_pipe(**cfg, eligen_enable_on_negative=True, batch_cfg=False), atol=1e-5)
    assert (on_negative - tiny_pipe(**cfg)).abs().max() > 1e-5


def test_inpaint_keeps_the_input_outside_the_masks(tiny_pipe):
    image = Image.fromarray((np.indices((64, 64, 3)).sum(0) * 3 % 256).astype(np.uint8))
    masks = [_mask((16, 16, 48, 48))]
    out = tiny_pipe(**KW, input_image=image, denoising_strength=0.9, eligen_entity_prompts=["a stone"],
                    eligen_entity_masks=masks, eligen_enable_inpaint=True)
    x0 = tiny_pipe.vae_encoder(torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    outside = ~entity_masks(masks, 1, 64, 64)[0]
    assert torch.allclose(out[0][:, outside], x0[0][:, outside], atol=1e-4)
    assert (out[0][:, ~outside] - x0[0][:, ~outside]).abs().max() > 1e-3


@pytest.mark.parametrize("kw, error, match", [
    (dict(eligen_entity_prompts=PROMPTS, eligen_entity_masks=MASKS[:1]), ValueError, "1 masks for 2"),
    (dict(eligen_entity_prompts=["a flower", " "], eligen_entity_masks=MASKS), ValueError, "empty"),
    (dict(eligen_entity_prompts=PROMPTS), ValueError, "both"),
    (dict(eligen_entity_prompts="a flower", eligen_entity_masks=MASKS[:1]), TypeError, "list of strings"),
    (dict(eligen_entity_prompts=PROMPTS, eligen_entity_masks=MASKS, eligen_enable_inpaint=True), ValueError,
     "input_image"),
])
def test_bad_eligen_inputs(tiny_pipe, kw, error, match):
    with pytest.raises(error, match=match):
        tiny_pipe(**KW, **kw)
