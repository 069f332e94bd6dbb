"""FLUX VAE: parity with diffusers (both checkpoint formats), config inference, tiling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffsynth.models.flux_vae import (
    AttnBlock,
    FluxVAEConfig,
    FluxVAEDecoder,
    FluxVAEEncoder,
    infer_vae_config,
    tiled_apply,
    vae_from_bfl,
    vae_from_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

# All widths are multiples of 32 so the real num_groups=32 is exercised.
TINY = FluxVAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(module: torch.nn.Module, seed: int) -> None:
    # Default init leaves GroupNorm affine = identity and biases ~0; noise makes every
    # parameter matter, so a misrouted tensor cannot go unnoticed.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = 0.1 if p.ndim == 1 else 0.02
            p.add_(torch.randn(p.shape, generator=g) * std)


def diffusers_vae(cfg: FluxVAEConfig) -> AutoencoderKL:
    n = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.num_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()


def ours_from(enc_sd, dec_sd, cfg=TINY):
    enc, dec = FluxVAEEncoder(cfg).eval(), FluxVAEDecoder(cfg).eval()
    enc.load_state_dict(enc_sd, strict=True)
    dec.load_state_dict(dec_sd, strict=True)
    return enc, dec


@torch.no_grad()
def compare_with_diffusers(vae: AutoencoderKL, enc, dec) -> tuple[float, float]:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    s, t = TINY.scaling_factor, TINY.shift_factor
    ref_z = (vae.encode(x).latent_dist.mode() - t) * s
    z = torch.randn(2, 16, 4, 6)
    ref_img = vae.decode(z / s + t).sample
    return rel_err(enc(x), ref_z), rel_err(dec(z), ref_img)


def test_parity_diffusers_weights_through_our_converter():
    torch.manual_seed(0)
    vae = diffusers_vae(TINY)
    perturb(vae, seed=0)
    enc, dec = ours_from(*vae_from_diffusers(vae.state_dict()))
    enc_err, dec_err = compare_with_diffusers(vae, enc, dec)
    print(f"diffusers->ours: encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5


def test_parity_bfl_weights_through_diffusers_converter():
    # Independent direction: our modules define the BFL layout, diffusers' own
    # LDM->diffusers converter maps it, so a key mistake on our side cannot cancel out.
    torch.manual_seed(0)
    enc, dec = FluxVAEEncoder(TINY).eval(), FluxVAEDecoder(TINY).eval()
    perturb(enc, seed=1)
    perturb(dec, seed=2)
    ae = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    ae |= {f"decoder.{k}": v for k, v in dec.state_dict().items()}
    vae = diffusers_vae(TINY)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ae, vae.config), strict=True)
    # And our loader must round-trip the same file.
    enc2, dec2 = ours_from(*vae_from_bfl(ae))
    enc_err, dec_err = compare_with_diffusers(vae, enc2, dec2)
    print(f"bfl->diffusers: encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_bfl_prefixes_of_all_in_one_files(prefix):
    enc, dec = FluxVAEEncoder(TINY), FluxVAEDecoder(TINY)
    sd = {f"{prefix}encoder.{k}": v for k, v in enc.state_dict().items()}
    sd |= {f"{prefix}decoder.{k}": v for k, v in dec.state_dict().items()}
    sd["model.diffusion_model.img_in.weight"] = torch.zeros(1)  # transformer keys are ignored
    enc_sd, dec_sd = vae_from_bfl(sd)
    assert enc_sd.keys() == enc.state_dict().keys()
    assert all(torch.equal(enc_sd[k], v) for k, v in enc.state_dict().items())
    assert all(torch.equal(dec_sd[k], v) for k, v in dec.state_dict().items())


def test_full_size_key_layout_matches_ae_safetensors():
    with torch.device("meta"):
        enc, dec = FluxVAEEncoder(), FluxVAEDecoder()
    e, d = enc.state_dict(), dec.state_dict()
    # ae.safetensors holds 244 tensors: 106 encoder + 138 decoder.
    assert (len(e), len(d)) == (106, 138)
    assert e["mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert e["conv_out.weight"].shape == (32, 512, 3, 3)
    assert e["down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert "down.3.downsample.conv.weight" not in e and "down.2.downsample.conv.weight" in e
    assert d["up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert d["up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "up.0.upsample.conv.weight" not in d and "up.0.block.2.conv2.weight" in d


ODD = FluxVAEConfig(
    in_channels=4, out_channels=4, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4
)


@pytest.mark.parametrize("cfg", [TINY, FluxVAEConfig(), ODD])
def test_infer_vae_config(cfg):
    with torch.device("meta"):
        enc, dec = FluxVAEEncoder(cfg), FluxVAEDecoder(cfg)
    assert infer_vae_config(enc.state_dict()) == cfg
    assert infer_vae_config(dec.state_dict()) == cfg


def test_bad_state_dicts_raise_naming_keys():
    enc, dec = FluxVAEEncoder(TINY), FluxVAEDecoder(TINY)
    ae = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    ae |= {f"decoder.{k}": v for k, v in dec.state_dict().items()}
    del ae["decoder.mid.attn_1.k.bias"]
    with pytest.raises(ValueError, match=r"mid\.attn_1\.k\.bias"):
        vae_from_bfl(ae)
    with pytest.raises(ValueError, match="missing keys"):
        vae_from_bfl({"model.diffusion_model.img_in.weight": torch.zeros(1)})
    vae = diffusers_vae(TINY).state_dict()
    del vae["encoder.down_blocks.1.downsamplers.0.conv.weight"]
    with pytest.raises(ValueError, match=r"down\.1\.downsample\.conv\.weight"):
        vae_from_diffusers(vae)


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("scale", [8, 1 / 8])
def test_tiled_apply_is_exact_for_local_functions(scale):
    # A function whose output pixel depends only on its own input pixel(s) must tile
    # without any error; this pins tile placement, the ramp masks and the normalization.
    if scale == 8:
        fn = lambda t: (2 * t + 1).repeat_interleave(8, -2).repeat_interleave(8, -1)  # noqa: E731
        x, tile, stride = torch.randn(1, 2, 21, 37), 8, 5  # non-uniform: last tile pulled back
    else:
        fn = lambda t: F.avg_pool2d(t, 8) * 3 - 1  # noqa: E731
        x, tile, stride = torch.randn(1, 2, 168, 296), 64, 40
    out = tiled_apply(fn, x, tile, stride, scale)
    torch.testing.assert_close(out, fn(x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_tiled_equals_untiled_when_one_tile_fits():
    torch.manual_seed(0)
    enc, dec = FluxVAEEncoder(TINY).eval(), FluxVAEDecoder(TINY).eval()
    z = torch.randn(1, 16, 12, 16)
    assert torch.equal(dec(z, tiled=True, tile_size=16, tile_stride=8), dec(z))
    x = torch.rand(1, 3, 96, 128) * 2 - 1
    assert torch.equal(enc(x, tiled=True, tile_size=128, tile_stride=64), enc(x))


@torch.no_grad()
def test_tiled_vae_matches_tiles_and_approximates_untiled():
    torch.manual_seed(0)
    enc, dec = FluxVAEEncoder(TINY).eval(), FluxVAEDecoder(TINY).eval()
    perturb(enc, seed=3)
    perturb(dec, seed=4)

    # Decode, tile 24 / stride 16 latents: tiles start at 0 and 16 on each axis.
    z = torch.randn(1, 16, 40, 40)
    tiled, full = dec(z, tiled=True, tile_size=24, tile_stride=16), dec(z)
    # Where only one tile contributes, the output IS that tile's decode, bit for bit
    # (pins the x8 output placement through the real module).
    assert torch.equal(tiled[..., :128, :128], dec(z[..., :24, :24])[..., :128, :128])
    assert torch.equal(tiled[..., 192:, 192:], dec(z[..., 16:, 16:])[..., 64:, 64:])

    # Encode, tile 192 / stride 128 pixels: tiles start at 0 and 128 px (0 and 16 latents).
    x = torch.rand(1, 3, 320, 320) * 2 - 1
    tiled_z, full_z = enc(x, tiled=True, tile_size=192, tile_stride=128), enc(x)
    assert torch.equal(tiled_z[..., :16, :16], enc(x[..., :192, :192])[..., :16, :16])

    # Against the untiled result tiling cannot be exact: GroupNorm statistics and the
    # mid attention are global, and a random-weight VAE is not trained to be tile-robust
    # (decoding a 24x24 crop alone already differs by ~6% in its centre). Measured:
    # decode 9.1e-2, encode 1.4e-1 relative max error. For scale, shifting the input by
    # a single latent pixel gives ~1.2, so 0.2 still catches misplaced or misweighted tiles.
    dec_err, enc_err = rel_err(tiled, full), rel_err(tiled_z, full_z)
    print(f"tiled vs untiled: decode rel err {dec_err:.2e}, encode rel err {enc_err:.2e}")
    assert dec_err < 0.2 and enc_err < 0.2


def test_attention_runs_on_a_fused_sdpa_kernel():
    """Tokens reach SDPA with contiguous channels, so it never takes the math path (which would hold the
    (H*W)^2 score matrix: 1 GB in fp32 for a 1024 px image)."""
    block = AttnBlock(32, 8).eval()
    x = torch.randn(1, 32, 12, 10)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = block(x)
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels
    y = block.norm(x)
    q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (block.q, block.k, block.v))
    ref = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, -1) @ v
    torch.testing.assert_close(out, x + block.proj_out(ref.transpose(1, 2).reshape(1, 32, 12, 10)),
                               rtol=1e-5, atol=1e-5)
