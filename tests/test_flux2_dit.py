"""FLUX.2 DiT: parity with diffusers' Flux2Transformer2DModel (fp32, tiny random weights) from the diffusers
folder, the BFL single file and ComfyUI's prefixed file; detection against FLUX.1; fp8 storage; inspect."""
import json

import pytest
import torch

from diffsynth.loading import components
from diffsynth.loading.registry import build, classify, describe, detect
from diffsynth.models import flux2_dit
from diffsynth.loading.vram import install_cast
from diffsynth.ops.files import CheckpointError
from diffsynth.models.flux2_dit import Flux2DiT, dit_from_bfl, dit_to_bfl, infer_dit_config
from diffsynth.testing import bfl_to_diffusers_dit, tiny_dit_state_dict
from diffsynth.testing.tiny_flux2 import (tiny_flux2_dit_config, tiny_flux2_dit_state_dict, write_tiny_flux2_bfl,
                                          write_tiny_flux2_transformer)

diffusers = pytest.importorskip("diffusers")
H, W, L = 4, 6, 7  # packed latent grid and text length


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def grid_ids(t: float, h: int, w: int) -> torch.Tensor:
    """(1, h*w, 4) ids (t, row, col, 0) as the FLUX.2 pipelines make them."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.full_like(rows, int(t)), rows, cols, torch.zeros_like(rows)], -1)
    return ids.reshape(1, h * w, 4).float()


def inputs(guidance: bool, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    txt_ids = torch.stack([torch.zeros(L), torch.zeros(L), torch.zeros(L), torch.arange(L.__float__())], -1)[None]
    return dict(img=torch.randn(batch, H * W, 128, generator=g), img_ids=grid_ids(0, H, W),
                txt=torch.randn(batch, L, 96, generator=g), txt_ids=txt_ids,
                timestep=torch.tensor([0.7, 0.25][:batch]),
                guidance=torch.tensor([4.0, 2.5][:batch]) if guidance else None)


def reference_model(guidance: bool) -> torch.nn.Module:
    config = {k: v for k, v in tiny_flux2_dit_config(guidance).items() if not k.startswith("_")}
    model = diffusers.Flux2Transformer2DModel(**config).eval()
    model.load_state_dict(tiny_flux2_dit_state_dict(guidance=guidance), strict=True)
    return model


def reference(model, x: dict, ref: torch.Tensor | None = None, ref_ids: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' Flux2KleinPipeline way: reference tokens appended, the output cut back to the target."""
    img, ids = x["img"], x["img_ids"]
    if ref is not None:
        img, ids = torch.cat([img, ref], 1), torch.cat([ids, ref_ids], 1)
    with torch.no_grad():
        out = model(hidden_states=img, encoder_hidden_states=x["txt"], timestep=x["timestep"], img_ids=ids,
                    txt_ids=x["txt_ids"], guidance=x["guidance"]).sample
    return out[:, : x["img"].shape[1]]


def load(path) -> Flux2DiT:
    (det,) = detect(str(path))
    assert det.family == "flux2-dit"
    return build(det)["dit"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_dit")
    out = {}
    for guidance in (False, True):
        sub = root / ("dev" if guidance else "klein")
        out[guidance] = {"diffusers": write_tiny_flux2_transformer(sub, guidance=guidance),
                         "bfl": write_tiny_flux2_bfl(sub / "flux2.safetensors", guidance=guidance),
                         "comfyui": write_tiny_flux2_bfl(sub / "comfy.safetensors", guidance=guidance,
                                                         prefix="model.diffusion_model.")}
    return out


@pytest.mark.parametrize("guidance", [False, True], ids=["klein", "guidance-embedder"])
@pytest.mark.parametrize("layout", ["diffusers", "bfl", "comfyui"])
def test_parity_with_diffusers(files, one_thread, layout, guidance):
    ours, theirs = load(files[guidance][layout]), reference_model(guidance)
    x = inputs(guidance)
    with torch.no_grad():
        out = ours(**x)
    assert out.shape == (2, H * W, 128)
    assert rel(out, reference(theirs, x)) <= 1e-5


@pytest.mark.parametrize("guidance", [False, True], ids=["klein", "guidance-embedder"])
def test_parity_with_reference_tokens(files, one_thread, guidance):
    """Two reference images (editing): their tokens join attention and leave the output."""
    ours, theirs = load(files[guidance]["diffusers"]), reference_model(guidance)
    x = inputs(guidance)
    ref = torch.randn(2, 2 * 6, 128, generator=torch.Generator().manual_seed(5))
    ref_ids = torch.cat([grid_ids(10, 2, 6)[:, :6], grid_ids(20, 2, 3)], 1)
    with torch.no_grad():
        out = ours(**x, ref=ref, ref_ids=ref_ids)
    expected = reference(theirs, x, ref, ref_ids)
    assert rel(out, expected) <= 1e-5
    assert rel(out, reference(theirs, x)) > 1e-3  # the references do change the result


def test_guidance_required_by_guidance_embedder(files):
    with pytest.raises(ValueError, match="guidance"):
        load(files[True]["bfl"])(**{**inputs(True), "guidance": None})
    with pytest.raises(ValueError, match="ref_ids"):
        load(files[False]["bfl"])(**inputs(False), ref=torch.zeros(2, 3, 128))


def test_bfl_round_trip_and_config_from_shapes():
    sd = tiny_flux2_dit_state_dict(guidance=True)
    bfl = dit_to_bfl(sd)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_stream_modulation.lin.weight" in bfl
    back = dit_from_bfl({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    c = infer_dit_config(sd)
    assert (c.hidden_size, c.num_heads, c.num_double_blocks, c.num_single_blocks) == (32, 2, 2, 2)
    assert (c.context_dim, c.mlp_hidden, c.guidance_embed, c.axes_dim) == (96, 96, True, (4, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown keys.*nonsense"):
        dit_from_bfl({**bfl, "nonsense.weight": torch.zeros(1)})


def test_other_sizes_load(tmp_path, one_thread):
    """Depths, widths and head counts come from the file (4B/9B/dev differ only in these)."""
    path = write_tiny_flux2_bfl(tmp_path / "f.safetensors", num_layers=1, num_single_layers=3,
                                num_attention_heads=3, attention_head_dim=8, mlp_ratio=2.5, joint_attention_dim=40)
    model = load(path)
    c = model.config
    assert (c.hidden_size, c.num_heads, c.num_double_blocks, c.num_single_blocks, c.mlp_hidden) == (24, 3, 1, 3, 60)
    assert c.axes_dim == (2, 2, 2, 2) and c.context_dim == 40


def test_config_json_rope_settings(tmp_path):
    folder = write_tiny_flux2_transformer(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(axes_dims_rope=[2, 6, 4, 4], rope_theta=1000)
    (folder / "config.json").write_text(json.dumps(config))
    c = load(folder).config
    assert c.axes_dim == (2, 6, 4, 4) and c.theta == 1000


def test_detection_does_not_mix_flux1_and_flux2(files, tiny_root):
    """FLUX.2 files also match FLUX.1's looser layout test: the table tries FLUX.2's family first."""
    families = [f.name for f in components.FAMILIES]
    assert families.index("flux2-dit") < families.index("flux-dit")
    for layout in ("diffusers", "bfl", "comfyui"):
        refs = {k.removeprefix("model.diffusion_model.").removeprefix("transformer."): r
                for k, r in _scan(files[False][layout]).items()}
        assert classify(refs)[0].name == "flux2-dit"
    flux1_bfl = tiny_dit_state_dict()
    for sd in (flux1_bfl, bfl_to_diffusers_dit(flux1_bfl)):
        assert flux2_dit.detect(sd) is None  # FLUX.2's detector rejects FLUX.1 files
        assert classify(sd)[0].name == "flux-dit"
    assert detect(str(tiny_root / "flux1-dev.safetensors"))[0].family == "flux-dit"
    assert components.FAMILY_BY_NAME["flux2-dit"].low_precision_storage


def _scan(path):
    from diffsynth.ops.files import scan
    return scan(str(path))


def test_inspect_names_it(files):
    (det,) = detect(str(files[True]["comfyui"]))
    info = describe(det)
    assert info["family"] == "flux2-dit" and info["format"] == "bfl" and info["components"] == ["dit"]
    assert info["architecture"]["variant"] == "FLUX.2 DiT, 2+2 blocks of width 32"
    assert info["architecture"]["guidance_embedder"] is True
    assert flux2_dit.variant_name(infer_dit_config_like(3072, 5, 20, False)) == "FLUX.2 DiT, [klein] 4B-like"
    assert flux2_dit.variant_name(infer_dit_config_like(4096, 8, 24, False)) == "FLUX.2 DiT, [klein] 9B-like"


def infer_dit_config_like(hidden, double, single, guidance):
    from diffsynth.models.flux2_dit import Flux2DiTConfig
    return Flux2DiTConfig(hidden_size=hidden, num_heads=hidden // 128, num_double_blocks=double,
                          num_single_blocks=single, guidance_embed=guidance)


def test_cli_inspect(files, capsys):
    from diffsynth.cli import main
    main(["inspect", str(files[False]["diffusers"])])
    out = capsys.readouterr().out
    assert "flux2-dit (diffusers layout) -> dit" in out and "FLUX.2 DiT" in out


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_fp8_storage_loads_and_runs(files, one_thread, layout):
    (det,) = detect(str(files[False][layout]))
    model = build(det, dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)["dit"]
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.single_transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32  # small tensors precise
    install_cast(model, "cpu", torch.float32)
    x = inputs(False)
    with torch.no_grad():
        out = model(**x)
    assert out.dtype == torch.float32
    assert 0 < rel(out, reference(reference_model(False), x)) < 0.05


def test_gradient_checkpointing_same_gradients(one_thread):
    sd = tiny_flux2_dit_state_dict()
    grads = []
    for checkpointing in (False, True):
        model = Flux2DiT(infer_dit_config(sd))
        model.load_state_dict(sd)
        model.gradient_checkpointing = checkpointing
        model(**inputs(False)).square().mean().backward()
        grads.append(model.transformer_blocks[0].attn.to_q.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_gguf_file_stays_quantized(tmp_path, one_thread):
    """A city96-style GGUF (BFL names, Q8_0 matrices): loads with its blocks kept, except BFL's fused q/k/v,
    which are split (dequantized once); the output equals the gguf package's dequantized weights."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from diffsynth.ops.quant import quant_type
    sd = dit_to_bfl(tiny_flux2_dit_state_dict())
    path, dequantized = tmp_path / "flux2-Q8_0.gguf", {}
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, t in sd.items():
        arr = t.float().numpy()
        if arr.ndim == 2:
            raw = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            arr = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, arr)
        dequantized[key] = torch.from_numpy(np.array(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = load(path)
    assert quant_type(model.transformer_blocks[0].ff.linear_in) == "Q8_0"
    assert quant_type(model.transformer_blocks[0].attn.to_q) is None  # split from the fused qkv
    install_cast(model, "cpu", torch.float32)
    expected = Flux2DiT(model.config).eval()
    expected.load_state_dict(dit_from_bfl(dequantized))
    x = inputs(False)
    with torch.no_grad():
        assert rel(model(**x), expected(**x)) <= 1e-5


def test_scaled_fp8_comfyui_file(tmp_path, one_thread):
    """ComfyUI's scaled fp8 (e4m3fn matrices with a per-tensor `.scale_weight`): scales kept beside the weights,
    folded into BFL's fused q/k/v when they are split."""
    from safetensors.torch import save_file
    prefix = "model.diffusion_model."
    out = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}  # ComfyUI's marker
    for k, v in dit_to_bfl(tiny_flux2_dit_state_dict()).items():
        if v.ndim == 2:
            scale = v.abs().max() / 448
            out[prefix + k] = (v / scale).to(torch.float8_e4m3fn)
            out[prefix + k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            out[prefix + k] = v
    save_file(out, tmp_path / "scaled.safetensors")
    (det,) = detect(str(tmp_path / "scaled.safetensors"))
    model = build(det, dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)["dit"]
    linear_in = model.transformer_blocks[0].ff.linear_in
    assert linear_in.weight.dtype == torch.float8_e4m3fn and linear_in.scale_weight.numel() == 1
    install_cast(model, "cpu", torch.float32)
    x = inputs(False)
    with torch.no_grad():
        assert 0 < rel(model(**x), reference(reference_model(False), x)) < 0.05


def comfy_mixed_fp8(fmt: str = "float8_e4m3fn") -> dict:
    """ComfyUI's "mixed" quantized file (e.g. flux2_dev_fp8mixed): the double blocks' matrices in fp8, each with a
    `.weight_scale`, an `.input_scale` and a `.comfy_quant` JSON marker; every other tensor in bf16."""
    prefix, out = "model.diffusion_model.", {}
    marker = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    for k, v in dit_to_bfl(tiny_flux2_dit_state_dict()).items():
        if v.ndim == 2 and k.startswith("double_blocks."):
            scale = v.abs().max() / 448
            layer = prefix + k.removesuffix(".weight")
            out.update({prefix + k: (v / scale).to(torch.float8_e4m3fn), layer + ".weight_scale": scale.reshape(()),
                        layer + ".input_scale": torch.ones(()), layer + ".comfy_quant": marker.clone()})
        else:
            out[prefix + k] = v.to(torch.bfloat16)
    return out


def test_comfyui_mixed_fp8_file(tmp_path, one_thread):
    """Each fp8 layer computes with `fp8 * weight_scale` (the input scales are for fp8 matmuls: unused); a layer
    marked with a format there is no decoder for is refused by name."""
    from safetensors.torch import save_file
    sd = comfy_mixed_fp8()
    save_file(sd, tmp_path / "flux2_dev_fp8mixed.safetensors")
    (det,) = detect(str(tmp_path / "flux2_dev_fp8mixed.safetensors"))
    model = build(det, dtype=torch.float32)["dit"]
    stored = sd["model.diffusion_model.double_blocks.0.img_mlp.0.weight"]
    scale = sd["model.diffusion_model.double_blocks.0.img_mlp.0.weight_scale"]
    assert torch.equal(model.transformer_blocks[0].ff.linear_in.weight, stored.float() * scale)
    save_file(comfy_mixed_fp8("nvfp4"), tmp_path / "nvfp4.safetensors")
    (det,) = detect(str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\..* is stored in ComfyUI's 'nvfp4' format"):
        build(det, dtype=torch.float32)


def test_first_block_cache_against_diffusers_pieces(files, one_thread):
    """First-Block-Cache on the DiT, with reference tokens: step 0 computes and stores the residual (stack output
    minus first-block output, target tokens); step 1 (a huge threshold) skips and must give diffusers'
    proj_out(norm_out(first block's output at step 1 + that residual)), read off diffusers' own model by hooks;
    the last step computes again."""
    from diffsynth.models.flux_dit_cache import CachedStep, FirstBlockCache
    ours, theirs = load(files[False]["diffusers"]), reference_model(False)
    n = H * W
    ref = torch.randn(1, 6, 128, generator=torch.Generator().manual_seed(5))
    ref_ids = grid_ids(10, 2, 3)
    steps = [dict(inputs(False, batch=1, seed=s), timestep=torch.tensor([t])) for s, t in ((1, 0.9), (2, 0.6), (3, 0.3))]
    seen = {}
    hooks = [theirs.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.update(first=out[1])),
             theirs.norm_out.register_forward_pre_hook(lambda m, a, kw: seen.update(stack=a[0], temb=a[1]),
                                                       with_kwargs=True)]
    state = FirstBlockCache(1e9, num_steps=3)
    outs = []
    with torch.no_grad():
        for i, x in enumerate(steps):
            outs.append(ours(**x, ref=ref, ref_ids=ref_ids, cache=CachedStep([state], i)))
            reference(theirs, x, ref, ref_ids)
            if i == 0:
                residual = seen["stack"][:, :n] - seen["first"][:, :n]
            if i == 1:
                skipped = theirs.proj_out(theirs.norm_out(seen["first"][:, :n] + residual, seen["temb"]))
            if i != 1:
                assert rel(outs[i], reference(theirs, x, ref, ref_ids)) <= 1e-5  # computed steps: the full model
    for h in hooks:
        h.remove()
    assert state.computed_steps == [0, 2] and state.skipped_steps == [1]
    assert rel(outs[1], skipped) <= 1e-5
    assert rel(outs[1], reference(theirs, steps[1], ref, ref_ids)) > 1e-3  # (skipping did change the result)


def test_step_caches_refuse_what_they_cannot_do(files):
    from diffsynth.models.flux_dit_cache import CachedStep, TeaCache
    ours = load(files[False]["diffusers"])
    with torch.no_grad(), pytest.raises(ValueError, match="TeaCache's rescaling polynomial is fitted to FLUX.1"):
        ours(**inputs(False, batch=1), cache=CachedStep([TeaCache(0.1, 3)], 0))
