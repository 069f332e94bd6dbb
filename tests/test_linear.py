"""`ops.linear`: fp32/bf16 CPU inference on oneDNN, everything else on F.linear, same numbers either way."""
import pytest
import torch
import torch.nn.functional as F

from diffsynth.ops import linear as lin
from diffsynth.ops.linear import Linear, default_onednn, linear, onednn_linear_enabled, set_onednn_linear

needs_onednn = pytest.mark.skipif(not lin._kernel_available(), reason="no oneDNN linear in this torch build")


@pytest.fixture
def onednn():
    """The redirection switched on (the default only on AVX-512 CPUs), and back to what it was after."""
    before = onednn_linear_enabled()
    set_onednn_linear(True)
    yield
    set_onednn_linear(before)


def _kernels(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return Linear(96, 80)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_inference_runs_on_onednn_and_matches_f_linear(bias, dtype, onednn):
    if dtype not in lin._DTYPES:
        pytest.skip("oneDNN has no bf16 on this CPU")
    torch.manual_seed(0)
    x, w = torch.randn(2, 33, 96, dtype=dtype), torch.randn(80, 96, dtype=dtype)
    b = torch.randn(80, dtype=dtype) if bias else None
    x_strided = torch.randn(2, 33, 192, dtype=dtype)[..., ::2]  # a column slice, as attention outputs arrive
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for inp in (x, x_strided, x[0]):
        with torch.inference_mode():
            assert "mkldnn::_linear_pointwise" in _kernels(lambda: linear(inp, w, b))
            torch.testing.assert_close(linear(inp, w, b), F.linear(inp, w, b), rtol=tol, atol=tol)


@needs_onednn
def test_switch_off_and_on(layer, onednn):
    x = torch.randn(4, 96)
    try:
        set_onednn_linear(False)
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" not in _kernels(lambda: layer(x))
            off = layer(x)
    finally:
        set_onednn_linear(True)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _kernels(lambda: layer(x))
        torch.testing.assert_close(layer(x), off, rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_stay_on_f_linear(layer):
    x = torch.randn(3, 96, requires_grad=True)
    assert "mkldnn::_linear_pointwise" not in _kernels(lambda: layer(x))
    ref = torch.nn.Linear(96, 80)
    ref.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, ref.weight.grad)
    with torch.no_grad():  # no oneDNN linear for these
        for dtype in (torch.float16, torch.float64):
            m = Linear(96, 80).to(dtype)
            xd = torch.randn(3, 96, dtype=dtype)
            assert "mkldnn::_linear_pointwise" not in _kernels(lambda: m(xd))
            assert torch.equal(m(xd), F.linear(xd, m.weight, m.bias))


def test_cpu_autocast_is_honoured(layer):
    x = torch.randn(3, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert "mkldnn::_linear_pointwise" not in _kernels(lambda: layer(x))
    assert out.dtype == torch.bfloat16


def test_mixed_dtypes_raise_like_f_linear(layer):
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(2, 96, dtype=torch.float64))


def test_unavailable_backend_is_refused(monkeypatch):
    monkeypatch.setattr(lin, "_kernel_available", lambda: False)
    with pytest.raises(RuntimeError, match="oneDNN"):
        set_onednn_linear(True)


def test_adopt_linears_switches_plain_linears_only():
    torch.manual_seed(0)

    class Custom(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), Custom(16, 4))
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        lin.adopt_linears(model)
        assert type(model[0]) is Linear and type(model[2]) is Custom
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("machine,capability,expected", [("x86_64", "AVX512", True), ("x86_64", "AVX2", False),
                                                        ("AMD64", "AVX512", True), ("aarch64", "SVE256", False)])
def test_on_by_default_only_on_avx512_x86(monkeypatch, machine, capability, expected):
    monkeypatch.setattr(lin.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(lin, "_kernel_available", lambda: True)
    assert default_onednn() is expected
