"""The bf16 CPU attention kernel (ops/cpu_attention.py): same numerics as torch's CPU flash kernel against an
fp32 reference, every shape it accepts, the dispatch rules of attention("auto"), and the build's fallbacks."""
import pytest
import torch
import torch.nn.functional as F

from diffsynth.ops import attention as attn
from diffsynth.ops import cpu_attention as ca

needs_kernel = pytest.mark.skipif(ca.kernel_status() is not None, reason=f"bf16 CPU kernel: {ca.kernel_status()}")


def qkv(b, h, lq, lk, d, scale=1.0, seed=0, token_major=True):
    """bf16 q, k, v; token_major: (B, L, H, D) storage seen as (B, H, L, D), as the DiTs call attention."""
    g = torch.Generator().manual_seed(seed)

    def make(n, s):
        x = torch.randn(b, n, h, d, generator=g) * s if token_major else torch.randn(b, h, n, d, generator=g) * s
        return (x.transpose(1, 2) if token_major else x).bfloat16()
    return make(lq, scale), make(lk, scale), make(lk, 1.0)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 2, 10, 7, 64), (2, 3, 97, 130, 128), (1, 2, 200, 65, 256), (1, 1, 96, 64, 192),
                                   (1, 4, 300, 257, 128), (3, 1, 1, 1, 128)])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_matches_an_fp32_reference_as_closely_as_torchs_kernel(shape, scale):
    q, k, v = qkv(*shape, scale=scale)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ours, sdpa = ca.attention_bf16(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == sdpa.shape and ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 1.2 * rel_err(sdpa, ref) + 1e-4, (rel_err(ours, ref), rel_err(sdpa, ref))


@needs_kernel
def test_online_softmax_rescales_when_a_later_block_holds_the_maximum():
    """Each query's best key sits in the last block of 64, with logits large enough that a missed rescale shows."""
    q, k, v = qkv(1, 2, 70, 200, 128, token_major=False)
    k[:, :, 190] = q[:, :, 0] * 3
    k[:, :, 5] = -q[:, :, 0] * 3
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_err(ca.attention_bf16(q, k, v), ref) <= 1.2 * rel_err(F.scaled_dot_product_attention(q, k, v), ref) + 1e-4


@needs_kernel
def test_a_nan_reaches_the_output_instead_of_vanishing():
    """torch's CPU kernel can turn a NaN query into a finite row; ours keeps it NaN (a NaN key: every row)."""
    q, k, v = qkv(1, 2, 70, 100, 128, token_major=False)
    q_bad, k_bad = q.clone(), k.clone()
    q_bad[0, 1, 7, 3] = float("nan")
    k_bad[0, 0, 80, 0] = float("nan")
    out = ca.attention_bf16(q_bad, k, v)
    assert out[0, 1, 7].isnan().all() and out[0, 1, 8:].isfinite().all() and out[0, 0].isfinite().all()
    out = ca.attention_bf16(q, k_bad, v)
    assert out[0, 0].isnan().all() and out[0, 1].isfinite().all()


@needs_kernel
def test_any_strides_batch_broadcast_and_output_layout():
    q, k, v = qkv(2, 3, 50, 80, 128)
    k_exp, v_exp = k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1)  # batch stride 0
    q_odd = torch.randn(2, 3, 50, 130).bfloat16()[..., 1:129]  # odd offsets: copied to a contiguous layout
    for a, b, c in ((q, k_exp, v_exp), (q_odd, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        out = ca.attention_bf16(a, b, c)
        torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(a.float(), b.float(), c.float()),
                                   rtol=0.02, atol=0.02)
        assert out.transpose(1, 2).is_contiguous()  # (B, L, H, D) storage: merging heads copies nothing


@needs_kernel
def test_thread_count_does_not_change_the_result():
    q, k, v = qkv(1, 3, 300, 300, 128)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ca.attention_bf16(q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_kernel
def test_auto_dispatch_takes_only_bf16_cpu_inference_without_mask(monkeypatch):
    calls = []
    real = ca.attention_bf16
    monkeypatch.setattr(ca, "attention_bf16", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(1, 2, 20, 20, 128)
    attn.set_attention_backend("auto")
    out = attn.attention(q, k, v)
    assert calls == [1]
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(), rtol=0.02, atol=0.02)
    mask = torch.ones(20, 20, dtype=torch.bool)
    attn.attention(q, k, v, mask)                                  # a mask: SDPA
    attn.attention(q.float(), k.float(), v.float())                # fp32: SDPA
    attn.attention(*(torch.randn(1, 2, 8, 72).bfloat16() for _ in range(3)))  # head size 72: SDPA
    qg = q.detach().requires_grad_()
    attn.attention(qg, k, v).float().sum().backward()              # autograd: SDPA, and gradients flow
    assert qg.grad is not None and calls == [1]
    try:
        attn.set_attention_backend("sdpa")
        attn.attention(q, k, v)
    finally:
        attn.set_attention_backend("auto")
    assert calls == [1]


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process-state-free build of the kernel into tmp_path (restored afterwards)."""
    monkeypatch.setattr(ca, "_state", {})
    monkeypatch.setenv("DIFFSYNTH_KERNEL_CACHE", str(tmp_path / "kernels"))
    return tmp_path / "kernels"


def test_without_a_usable_cpu_or_compiler_attention_falls_back_and_says_why(fresh_build, monkeypatch):
    monkeypatch.setattr(ca, "_cpu_flags", lambda: {"avx2"})
    assert "no AVX512-BF16" in ca.kernel_status()
    q, k, v = qkv(1, 2, 20, 20, 128)
    assert not ca.applies(q, k, v, None)
    torch.testing.assert_close(attn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)

    monkeypatch.setattr(ca, "_state", {})
    monkeypatch.setattr(ca, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    monkeypatch.setattr(ca.platform, "system", lambda: "Linux")
    monkeypatch.setattr(ca.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ca, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C compiler found"):
        assert "no C compiler" in ca.kernel_status()
    assert not ca.applies(q, k, v, None)


def test_a_failing_compiler_leaves_nothing_in_the_cache(fresh_build, monkeypatch):
    monkeypatch.setattr(ca, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    monkeypatch.setattr(ca.platform, "system", lambda: "Linux")
    monkeypatch.setattr(ca.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CC", "sh -c 'echo broken >&2; exit 1' --")
    with pytest.warns(UserWarning, match="could not build the kernel"):
        assert "broken" in ca.kernel_status()
    assert list(fresh_build.iterdir()) == []  # the temporary output was removed


@needs_kernel
def test_the_build_is_cached_under_a_content_hash(fresh_build):
    assert ca.kernel_status() is None
    built = list(fresh_build.glob("attention_bf16-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob(".attention_bf16-*"))
    stamp = built[0].stat().st_mtime_ns
    ca._state.clear()
    assert ca.kernel_status() is None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_the_kernel_source_ships_with_the_package():
    """Wheels carry only the package data pyproject.toml names: the C source must be among it."""
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(ca.__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["diffsynth.ops"]
    assert any(ca._SOURCE.relative_to(root / "diffsynth" / "ops").match(p) for p in patterns)
