"""Attention backends and regional compilation (with hot-loaded LoRAs)."""
import pytest
import torch

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.ops import attention as attn

KW = dict(height=64, width=96, num_inference_steps=2, t5_sequence_length=16, seed=3,
          progress_bar_cmd=lambda x: x, output_type="latent")


@pytest.fixture
def restore_backend():
    yield
    attn.set_attention_backend("auto")


def test_backends_agree_on_cpu(restore_backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    mask = torch.rand(10, 10, generator=g) > 0.3
    mask[:, 0] = True
    outs = {}
    for name in ("auto", "sdpa", "math"):
        attn.set_attention_backend(name)
        outs[name] = (attn.attention(q, k, v), attn.attention(q, k, v, mask))
    for name in ("sdpa", "math"):
        for a, b in zip(outs[name], outs["auto"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_never_picks_an_approximate_kernel(restore_backend, monkeypatch):
    """With SageAttention installed and a CUDA half-precision call, "auto" still computes exact attention."""
    def sage(*args, **kwargs):
        raise AssertionError("auto picked SageAttention")
    monkeypatch.setitem(attn._kernels, "sage", sage)
    monkeypatch.setitem(attn._kernels, "flash", None)
    monkeypatch.setattr(attn, "_half_cuda", lambda q, mask: True)  # as if the tensors were CUDA bf16
    q, k, v = (torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    attn.set_attention_backend("auto")
    torch.testing.assert_close(attn.attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=0, atol=0)


def test_unknown_or_missing_backend_errors(restore_backend):
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_attention_backend("xformers2")
    for name, package in (("flash", "flash-attn"), ("sage", "sageattention")):
        if name in attn.available_backends():
            attn.set_attention_backend(name)  # installed: refuses CPU tensors clearly instead
            with pytest.raises(RuntimeError, match="needs CUDA"):
                attn.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)))
        else:
            with pytest.raises(ImportError, match=package):
                attn.set_attention_backend(name)
    assert attn.get_attention_backend() in attn.BACKENDS


def test_pipeline_backend_switch(tiny_pipe, restore_backend):
    base = tiny_pipe("a cat", **KW)
    tiny_pipe.set_attention_backend("math")
    torch.testing.assert_close(tiny_pipe("a cat", **KW), base, rtol=1e-4, atol=1e-4)


def _fresh_pipe(root):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(root / p)) for p in
        ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")])


def _lora(pipe, seed=0, rank=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("blocks.0.attn.a_to_qkv", "single_blocks.1.to_qkv_mlp"):
        out_f, in_f = pipe.dit.get_submodule(name).weight.shape
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    return sd


def _compile_and_hotload(root, backend, cfg=True):
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = _fresh_pipe(root), _fresh_pipe(root)
    with pytest.warns(UserWarning, match="on the CPU: the compiled DiT step measured"):  # (it does not pay there)
        compiled.compile(backend=backend, dynamic=False)  # static shapes: a batch-2 graph compiles in seconds
    base = eager("a cat", **KW)
    torch.testing.assert_close(compiled("a cat", **KW), base, rtol=1e-4, atol=1e-4)
    for pipe in (eager, compiled):  # a LoRA hot-loaded after compiling is honoured (recompiles once)
        pipe.load_lora(pipe.dit, _lora(pipe), alpha=0.8, hotload=True)
    with_lora = eager("a cat", **KW)
    merged = _fresh_pipe(root)  # oracle: the same LoRA merged into the weights
    merged.load_lora(merged.dit, _lora(merged), alpha=0.8)
    torch.testing.assert_close(with_lora, merged("a cat", **KW), rtol=1e-4, atol=1e-4)
    assert (with_lora - base).abs().max() > 1e-3
    torch.testing.assert_close(compiled("a cat", **KW), with_lora, rtol=1e-4, atol=1e-4)
    compiled.clear_lora()
    torch.testing.assert_close(compiled("a cat", **KW), base, rtol=1e-4, atol=1e-4)
    if cfg:  # batched CFG doubles the batch: one more graph per block kind
        kw = dict(KW, cfg_scale=2.0, negative_prompt="a dog")
        torch.testing.assert_close(compiled("a cat", **kw), eager.clear_lora() or eager("a cat", **kw),
                                   rtol=1e-4, atol=1e-4)


def test_compile_matches_eager_and_follows_hotloaded_lora(tiny_root):
    """Dynamo tracing of the blocks (aot_eager backend: no code generation), batched CFG included."""
    _compile_and_hotload(tiny_root, "aot_eager")


@pytest.mark.slow
def test_compile_inductor(tiny_root):
    """Inductor's generated kernels match eager, follow a hot-loaded LoRA and drop it again. CFG's batch-2
    graph is covered by the aot_eager test above: under inductor it costs another minute on CPU."""
    _compile_and_hotload(tiny_root, "inductor", cfg=False)
