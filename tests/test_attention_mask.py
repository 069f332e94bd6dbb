"""GroupMask (EliGen's regional mask in factored form): block-wise attention equals the dense masked
attention, and no mask or score tensor larger than a block of query rows is ever created."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffsynth.models.flux_dit import Extensions, FluxDiT, FluxDiTConfig, image_ids
from diffsynth.ops import attention as attn
from diffsynth.ops.attention_mask import GroupMask, chunked_attention, select_batch
from diffsynth.pipelines.variants.eligen import entity_attention_mask


@pytest.fixture
def restore_backend():
    previous = attn.get_attention_backend()
    yield
    attn.set_attention_backend(previous)


def _mask(batch=2, entities=3, entity_len=3, global_len=4, n_image=20, seed=0) -> GroupMask:
    g = torch.Generator().manual_seed(seed)
    regions = torch.rand(batch, entities, n_image, generator=g) > 0.5
    return entity_attention_mask(regions, entity_len, global_len, n_image)


def _dense_reference(q, k, v, mask: GroupMask):
    """Softmax attention in fp64 with the whole (B, 1, L, L) mask; q holds the last queries."""
    dense = mask.dense()[..., -q.shape[2]:, :]
    scores = (q.double() @ k.double().transpose(-2, -1)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~dense, float("-inf")).softmax(-1).to(v.dtype) @ v


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("block_elements", [1, 2 * 33 * 5, None])  # one row / 5 rows (across text|image) / all
@pytest.mark.parametrize("queries", [33, 20])  # every token (double blocks) / image tokens only (last single)
def test_blocks_equal_dense_masked_attention(restore_backend, backend, block_elements, queries):
    attn.set_attention_backend(backend)
    mask = _mask()  # 3 x 3 entity + 4 global text tokens + 20 image tokens = 33
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, queries, 8, generator=g)
    k, v = torch.randn(2, 2, 33, 8, generator=g), torch.randn(2, 2, 33, 8, generator=g)
    got = chunked_attention(attn._dense_attention, q, k, v, mask, block_elements=block_elements)
    torch.testing.assert_close(got, _dense_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.attention(q, k, v, mask), got, atol=1e-6, rtol=1e-6)


def test_rows_and_batch_selection():
    mask = _mask()
    dense = mask.dense()
    assert dense.shape == (2, 1, 33, 33)
    for start, stop in ((0, 5), (7, 15), (13, 33), (30, 33)):
        assert torch.equal(mask.rows(start, stop), dense[:, :, start:stop])
    rows = torch.tensor([1])
    assert torch.equal(select_batch(mask, rows).dense(), dense[rows])
    assert torch.equal(select_batch(dense, rows), dense[rows])
    with pytest.raises(ValueError, match="covers 33 tokens but there are 30 keys"):
        chunked_attention(attn._dense_attention, *(torch.zeros(2, 2, 30, 8),) * 3, mask)


class _LargestKeyAxis(TorchDispatchMode):
    """Records the largest matrix (last two axes) created whose last axis runs over all L tokens: mask rows,
    scores (and K^T, L x head_dim)."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.largest = length, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.length:
                self.largest = max(self.largest, t.shape[-2] * t.shape[-1])
        return out


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_no_dense_mask_during_the_eligen_step(restore_backend, monkeypatch, backend):
    """The memory bound: through every block of the DiT, no mask (or per-head score) tensor over the keys
    has a matrix of more than BLOCK_ELEMENTS elements (24 rows), although L x L is 3.6x that; the dense mask
    the old path passed would have SDPA / math create a float (L x L) copy, which the tracker catches."""
    attn.set_attention_backend(backend)
    budget = 24 * 86
    monkeypatch.setattr("diffsynth.ops.attention_mask.BLOCK_ELEMENTS", budget)
    torch.manual_seed(0)
    dit = FluxDiT(FluxDiTConfig(hidden_size=32, num_heads=2, num_double_blocks=1, num_single_blocks=2,
                                context_dim=16, pooled_dim=8, axes_dim=(4, 6, 6))).eval()
    n_img, entities, entity_len, global_len = 64, 3, 5, 7
    n_txt = entities * entity_len + global_len
    length = n_txt + n_img  # 86: no activation width of this DiT
    mask = entity_attention_mask(torch.rand(1, entities, n_img) > 0.5, entity_len, global_len, n_img)
    args = (torch.randn(1, n_img, 64), image_ids(16, 16), torch.randn(1, n_txt, 16), torch.zeros(1, n_txt, 3),
            torch.tensor([0.5]), torch.randn(1, 8), torch.tensor([3.5]))
    with torch.no_grad():
        with _LargestKeyAxis(length) as factored:
            out = dit(*args, ext=Extensions(mask=mask))
        dense_mask = mask.dense()
        with _LargestKeyAxis(length) as dense:
            reference = dit(*args, ext=Extensions(mask=dense_mask))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert 0 < factored.largest <= budget
    assert dense.largest >= length * length


def test_blocks_backpropagate_like_dense(restore_backend):
    """EliGen training: gradients through the blocks written into one output equal the dense path's."""
    attn.set_attention_backend("sdpa")
    mask = _mask()
    g = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, 2, 33, 8, generator=g, requires_grad=True) for _ in range(3)]
    weight = torch.randn(2, 2, 33, 8, generator=g)
    (chunked_attention(attn._dense_attention, *leaves, mask, block_elements=2 * 33 * 4) * weight).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (attn._dense_attention(*leaves, mask.dense()) * weight).sum().backward()
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad, atol=1e-5, rtol=1e-5)
