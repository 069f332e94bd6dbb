"""`ops.norms`: the fused norms and SwiGLU give the plain computation's numbers, in inference and with autograd."""
import pytest
import torch
import torch.nn.functional as F

from diffsynth.ops.norms import norm_modulate, rms_norm, swiglu


def plain_rms(x, w, eps=1e-6):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def plain_modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_plain_on_head_views(dtype):
    torch.manual_seed(0)
    proj = torch.randn(2, 37, 3 * 4 * 16, dtype=dtype) * 3
    w = torch.randn(16, dtype=dtype)
    q = proj[..., :64].unflatten(-1, (4, 16))  # (B, L, H, D) view of a fused projection
    for x in (q, q.transpose(1, 2), q.contiguous()):
        with torch.inference_mode():
            got = rms_norm(x, w)
        assert got.dtype == dtype
        torch.testing.assert_close(got, plain_rms(x, w), **tol(dtype))
    assert torch.equal(proj, proj.clone())  # the input is left alone (nothing in place on it)


def test_rms_norm_gradients_match_plain():
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rms_norm(x, w).square().sum().backward()
    plain_rms(x2, w2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("batch_mod", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_matches_plain(batch_mod, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 29, 64, dtype=dtype) * 2 + 0.5
    shift, scale = torch.randn(batch_mod, 64, dtype=dtype), torch.randn(batch_mod, 64, dtype=dtype)
    torch.testing.assert_close(norm_modulate(x, shift, scale), plain_modulate(x, shift, scale), **tol(dtype))


def test_swiglu_in_place_and_into_a_buffer_match_plain():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 2 * 24)
    gate, value = x.chunk(2, -1)
    expected = F.silu(gate) * value
    with torch.inference_mode():
        torch.testing.assert_close(swiglu(x.clone()), expected, rtol=1e-6, atol=1e-6)
        buf = torch.zeros(2, 11, 40)
        swiglu(x.clone()[:, :, :], out=buf[..., 16:])
        torch.testing.assert_close(buf[..., 16:], expected, rtol=1e-6, atol=1e-6)
        assert not buf[..., :16].any()


def test_swiglu_with_autograd_leaves_its_input_alone():
    x = torch.randn(3, 8, requires_grad=True)
    y = swiglu(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    g, v = x2.chunk(2, -1)
    (F.silu(g) * v).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
