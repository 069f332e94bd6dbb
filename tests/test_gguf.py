"""GGUF: our GGML dequantizers against the `gguf` package, and quantized DiT files (city96 layout) end to end."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from diffsynth.ops.gguf import BLOCK_SIZES, QUANT_TYPES, dequantize, scan_gguf  # noqa: E402
from diffsynth.loading.registry import build, describe, detect  # noqa: E402
from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_to_bfl  # noqa: E402

# byte offsets of the fp16 scale fields in each block (random bytes there could be inf/nan)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def random_blocks(name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    _, size = BLOCK_SIZES[name]
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for p in F16_FIELDS[name]:
        raw[..., p:p + 2] = (rng.standard_normal((rows, blocks, 1)) * 0.1).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, blocks * size)


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_dequantize_matches_gguf_package(name):
    raw = random_blocks(name, rows=5, blocks=3)
    expected = gguf.quants.dequantize(raw, T[name])
    got = dequantize(torch.from_numpy(raw), name)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)
    assert dequantize(torch.from_numpy(raw), name, torch.bfloat16).dtype == torch.bfloat16


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError, match="whole 34-byte blocks"):
        dequantize(torch.zeros(2, 33, dtype=torch.uint8), "Q8_0")
    with pytest.raises(NotImplementedError, match="IQ1_S"):
        dequantize(torch.zeros(2, 50, dtype=torch.uint8), "IQ1_S")


# ----------------------------------------------------------------------------- writing test files

def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A simple Q4_K encoder (the gguf package has none): min/max per 32-element sub-block."""
    rows, cols = x.shape
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - lo) / 15, -lo
    d = np.maximum(scale.max(-1, keepdims=True) / 63, 1e-8).astype(np.float16)
    dmin = np.maximum(mins.max(-1, keepdims=True) / 63, 1e-8).astype(np.float16)
    sc = np.clip(np.round(scale / d.astype(np.float32)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mins / dmin.astype(np.float32)), 0, 63).astype(np.uint8)
    step = np.maximum(d.astype(np.float32) * sc, 1e-12)[..., None]
    q = np.clip(np.round((sub + (dmin.astype(np.float32) * m)[..., None]) / step), 0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    return quantize_q4_k(x) if qtype == "Q4_K" else gguf.quants.quantize(x, T[qtype])


GGUF_CONFIG = FluxDiTConfig(hidden_size=256, num_heads=2, num_double_blocks=1, num_single_blocks=1,
                            context_dim=256, pooled_dim=256, axes_dim=(16, 56, 56))


def reference_dit(seed: int = 0) -> FluxDiT:
    torch.manual_seed(seed)
    model = FluxDiT(GGUF_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def write_gguf(path, sd: dict[str, torch.Tensor], qtype: str) -> dict[str, str]:
    """city96-style file: BFL keys, matrices quantized where rows fit whole blocks, the rest F32."""
    block = BLOCK_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    types = {}
    for key, t in sd.items():
        arr = t.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % block == 0:
            writer.add_tensor(key, quantize(arr, qtype), raw_dtype=T[qtype])
            types[key] = qtype
        else:
            writer.add_tensor(key, arr)
            types[key] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def dequantized_reference(path) -> FluxDiT:
    """The same DiT with every tensor dequantized by the gguf package (independent of our reader)."""
    reader = gguf.GGUFReader(str(path))
    sd = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        sd[t.name] = torch.from_numpy(np.array(values)).float().reshape(
            tuple(int(d) for d in reversed(t.shape.tolist())))
    from diffsynth.models.flux_dit import dit_from_bfl
    model = FluxDiT(GGUF_CONFIG).eval()
    model.load_state_dict(dit_from_bfl(sd))
    return model


def dit_inputs(seed=0, tokens=16, text=8):
    g = torch.Generator().manual_seed(seed)
    from diffsynth.models.flux_dit import image_ids
    return dict(img=torch.randn(1, tokens, 64, generator=g), img_ids=image_ids(8, 8),
                txt=torch.randn(1, text, 256, generator=g), txt_ids=torch.zeros(1, text, 3),
                timestep=torch.tensor([0.7]), pooled=torch.randn(1, 256, generator=g), guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("qtype, tol", [("Q8_0", 0.01), ("Q4_K", 0.15)])
def test_gguf_dit_loads_quantized_and_matches(tmp_path, qtype, tol):
    fp32 = reference_dit()
    path = tmp_path / f"flux1-dev-{qtype}.gguf"
    types = write_gguf(path, dit_to_bfl(fp32.state_dict()), qtype)
    assert qtype in types.values()

    refs = scan_gguf(str(path))
    assert {k: r.extra for k, r in refs.items()} == types
    (det,) = detect(str(path))
    info = describe(det)
    assert det.family == "flux-dit" and info["quant_types"][qtype] == sum(v == qtype for v in types.values())
    assert info["architecture"]["hidden_size"] == 256

    dit = build(det, torch.float32, "cpu")["dit"]
    qkv = dit.blocks[0].attn.a_to_qkv
    assert qkv.quant_type == qtype and qkv.weight.dtype == torch.uint8  # stays quantized in memory
    assert qkv.weight.numel() < qkv.weight_shape[0] * qkv.weight_shape[1] * 2
    from diffsynth.loading.vram import install_cast
    install_cast(dit, "cpu", torch.float32)

    with torch.no_grad():
        got = dit(**dit_inputs())
        expected = dequantized_reference(path)(**dit_inputs())
        full = fp32(**dit_inputs())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    err = ((got - full).norm() / full.norm()).item()
    assert 0 < err < tol


def test_gguf_pipeline_with_bf16_compute(tmp_path, tiny_root):
    """A GGUF DiT (BFL keys of the tiny model, Q8_0 where rows allow) runs inside the pipeline."""
    from safetensors.torch import load_file
    from diffsynth import FluxImagePipeline, ModelConfig
    path = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(path, load_file(tiny_root / "flux1-dev.safetensors"), "Q8_0")
    configs = [ModelConfig(path=str(path))] + [ModelConfig(path=str(tiny_root / p)) for p in
                                               ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu", model_configs=configs)
    ref = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu", model_configs=[
        ModelConfig(path=str(tiny_root / p)) for p in
        ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")])
    assert pipe.dit.blocks[0].attn.a_to_qkv.quant_type == "Q8_0" and pipe.dit.dtype == torch.bfloat16
    kw = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=8, seed=0,
              progress_bar_cmd=lambda x: x, output_type="latent")
    a, b = pipe("a cat", **kw).float(), ref("a cat", **kw).float()
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_truncated_gguf_is_refused(tmp_path):
    from diffsynth import CheckpointError
    path = tmp_path / "x.gguf"
    write_gguf(path, {"a.weight": torch.randn(4, 32)}, "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[:-60])
    with pytest.raises(CheckpointError, match="truncated"):
        scan_gguf(str(path))
    path.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF"):
        scan_gguf(str(path))


def test_lora_hotloads_onto_gguf_layers_and_merge_is_refused(tmp_path):
    from diffsynth.loading.lora import apply_lora, clear_lora
    from diffsynth.loading.vram import install_cast
    path = tmp_path / "q8.gguf"
    write_gguf(path, dit_to_bfl(reference_dit().state_dict()), "Q8_0")
    dit = build(detect(str(path))[0], torch.float32, "cpu")["dit"]
    install_cast(dit, "cpu", torch.float32)
    expected = dequantized_reference(path)
    g = torch.Generator().manual_seed(3)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 256, generator=g) * 0.1,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(768, 4, generator=g) * 0.1,
            "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(4, 1280, generator=g) * 0.1,
            "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(256, 4, generator=g) * 0.1}
    with torch.no_grad():
        before = dit(**dit_inputs())
        apply_lora(dit, lora, alpha=0.7, hotload=True)
        apply_lora(expected, lora, alpha=0.7)  # merged into the dequantized reference
        torch.testing.assert_close(dit(**dit_inputs()), expected(**dit_inputs()), rtol=1e-5, atol=1e-5)
        clear_lora(dit)
        assert torch.equal(dit(**dit_inputs()), before)
    with pytest.raises(ValueError, match="GGUF-quantized.*hotload=True"):
        apply_lora(dit, lora, alpha=0.7)


def test_cli_lora_on_gguf_dit_is_hotloaded(tmp_path, tiny_root):
    """GGUF blocks cannot absorb a merged delta: `generate --lora` hot-loads it there instead."""
    from safetensors.torch import load_file
    from diffsynth.cli import build_parser, build_pipeline
    from test_cli import write_tiny_lora
    path = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(path, load_file(tiny_root / "flux1-dev.safetensors"), "Q8_0")
    lora = write_tiny_lora(tiny_root / "flux1-dev.safetensors", tmp_path / "lora.safetensors")
    models = [str(path)] + [str(tiny_root / p) for p in
                            ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]
    args = build_parser().parse_args(["generate", "--prompt", "x", "--lora", str(lora), "--device", "cpu",
                                      "--dtype", "fp32"])
    pipe = build_pipeline(args, models)
    layer = pipe.dit.blocks[0].attn.a_to_qkv
    assert layer.quant_type == "Q8_0" and len(layer._forward_hooks) == 1
