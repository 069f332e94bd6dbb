"""FLUX.2 VAE: parity with diffusers' AutoencoderKLFlux2 (encode incl. 2x2 patches and batch-norm
normalisation, decode), detection apart from FLUX.1's VAE, loading errors."""
from __future__ import annotations

import pytest
import torch

from diffsynth.loading.registry import build, detect
from diffsynth.models.flux2_vae import Flux2VAEDecoder, Flux2VAEEncoder, flux2_vae_parts, patchify, unpatchify
from diffsynth.ops.files import save_safetensors
from diffsynth.testing import build_tiny_flux
from diffsynth.testing.tiny_flux2 import tiny_flux2_vae_state_dict, write_tiny_flux2_vae

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return write_tiny_flux2_vae(tmp_path_factory.mktemp("flux2vae"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def ours(vae_dir):
    (det,) = detect(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    assert (det.family, det.format) == ("flux2-vae", "diffusers")
    return build(det, torch.float32, "cpu")


@torch.no_grad()
def test_encode_decode_match_diffusers(vae_dir, one_thread):
    from diffusers import AutoencoderKLFlux2
    ref = AutoencoderKLFlux2.from_pretrained(str(vae_dir)).eval()
    models = ours(vae_dir)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = patchify(ref.encode(x).latent_dist.mode())  # what Flux2KleinPipeline does with it
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    expected = (z - mean) / std
    enc_err = rel_err(models["vae_encoder"](x), expected)
    latents = torch.randn(2, 128, 2, 3, generator=torch.Generator().manual_seed(1))
    expected_img = ref.decode(unpatchify(latents * std + mean)).sample
    dec_err = rel_err(models["vae_decoder"](latents), expected_img)
    print(f"FLUX.2 VAE vs diffusers: encode rel err {enc_err:.2e}, decode rel err {dec_err:.2e}")
    assert enc_err < 1e-5 and dec_err < 1e-5


def test_patchify_is_diffusers_channel_order():
    z = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(z)
    assert p.shape == (1, 8, 2, 2)
    # channel 4c + 2i + j of patch (r, s) is pixel (2r + i, 2s + j) of channel c
    assert p[0, 4 * 1 + 2 * 1 + 0, 1, 0] == z[0, 1, 3, 0]
    assert torch.equal(unpatchify(p), z)


def test_tile_units_are_the_unpatchified_latents(vae_dir, one_thread):
    """(1, 128, 4, 4) latents are 8x8 latents of the 32-channel VAE: a tile of 8 covers them (exactly the
    untiled decode), a tile of 4 cuts them."""
    dec = ours(vae_dir)["vae_decoder"]
    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = dec(latents)
        one_tile = dec(latents, tiled=True, tile_size=8, tile_stride=4)
        four_tiles = dec(latents, tiled=True, tile_size=4, tile_stride=2)
    assert whole.shape == (1, 3, 64, 64)
    assert torch.equal(one_tile, whole) and four_tiles.shape == whole.shape and not torch.equal(four_tiles, whole)


def test_detection_keeps_flux1_and_flux2_vaes_apart(vae_dir, tmp_path):
    flux1 = build_tiny_flux(tmp_path / "f1")
    assert [d.family for d in detect(str(flux1 / "ae.safetensors"))] == ["flux-vae"]
    assert [d.family for d in detect(str(vae_dir / "diffusion_pytorch_model.safetensors"))] == ["flux2-vae"]


@pytest.mark.parametrize("quant_convs", ["top level", "nested"])
def test_bfl_names_load_the_same_model(vae_dir, tmp_path, quant_convs):
    """The same weights under BFL's block names build the same modules: with the quant convs at the top level,
    or as black-forest-labs/flux2's AutoEncoder saves them (`encoder.quant_conv`, `decoder.post_quant_conv`,
    and the BatchNorm's `bn.num_batches_tracked`)."""
    sd = tiny_flux2_vae_state_dict()
    enc, dec = flux2_vae_parts(sd, "diffusers")
    bfl = {f"encoder.{k}": v for k, v in enc.items() if not k.startswith(("bn.", "quant_conv."))}
    bfl |= {f"decoder.{k}": v for k, v in dec.items() if not k.startswith(("bn.", "post_quant_conv."))}
    bfl |= {k: sd[k] for k in ("bn.running_mean", "bn.running_var")}
    for key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        half = "encoder." if key.startswith("quant") else "decoder."
        bfl[key if quant_convs == "top level" else half + key] = sd[key]
    if quant_convs == "nested":
        bfl["bn.num_batches_tracked"] = torch.tensor(1000)
    save_safetensors(bfl, tmp_path / "flux2-vae.safetensors")
    (det,) = detect(str(tmp_path / "flux2-vae.safetensors"))
    assert (det.family, det.format) == ("flux2-vae", "bfl")
    a, b = build(det, torch.float32, "cpu"), ours(vae_dir)
    for name in ("vae_encoder", "vae_decoder"):
        assert isinstance(a[name], (Flux2VAEEncoder, Flux2VAEDecoder))
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_statistics_or_quant_conv_are_named():
    sd = tiny_flux2_vae_state_dict()
    with pytest.raises(ValueError, match="bn.running_var"):
        flux2_vae_parts({k: v for k, v in sd.items() if k != "bn.running_var"}, "diffusers")
    with pytest.raises(ValueError, match="quant_conv"):
        flux2_vae_parts({k: v for k, v in sd.items() if not k.startswith("quant_conv.")}, "diffusers")
    with pytest.raises(ValueError, match="statistics have"):
        flux2_vae_parts({**sd, "bn.running_mean": torch.zeros(3)}, "diffusers")
