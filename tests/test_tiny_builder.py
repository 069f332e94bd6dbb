"""The tiny random FLUX.1 folder: exact layout, determinism, shard indexes, shapes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffsynth.models.flux_dit import FluxDiT, dit_from_bfl, infer_dit_config
from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder, infer_vae_config, vae_from_bfl
from diffsynth.nano import text
from diffsynth.testing import (
    COMFY_PREFIXES,
    TINY,
    bfl_to_diffusers_dit,
    build_tiny_comfy_checkpoint,
    build_tiny_flux,
    tiny_dit_state_dict,
)

COMMON = {
    "ae.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
}
DIFFUSERS_DIT = {
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/config.json",
}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny"))


def test_layout(tmp_path, tiny):
    assert set(files(tiny)) == COMMON | {"flux1-dev.safetensors"}
    root = build_tiny_flux(tmp_path / "d", dit_format="diffusers")
    assert set(files(root)) == COMMON | DIFFUSERS_DIT
    with pytest.raises(ValueError, match="dit_format"):
        build_tiny_flux(tmp_path / "x", dit_format="gguf")


def test_deterministic(tmp_path, tiny):
    assert files(build_tiny_flux(tmp_path / "again")) == files(tiny)
    other = files(build_tiny_flux(tmp_path / "seed1", seed=1))
    assert other["flux1-dev.safetensors"] != files(tiny)["flux1-dev.safetensors"]
    assert other["tokenizer_2/spiece.model"] == files(tiny)["tokenizer_2/spiece.model"]
    assert text._t5_spiece.__wrapped__() == text._t5_spiece()  # retraining is deterministic
    a = build_tiny_comfy_checkpoint(tmp_path / "a.safetensors").read_bytes()
    assert build_tiny_comfy_checkpoint(tmp_path / "b.safetensors").read_bytes() == a


@pytest.mark.parametrize("folder,stem", [("text_encoder_2", "model"), ("transformer", "diffusion_pytorch_model")])
def test_shard_index_maps_every_key(tmp_path, folder, stem):
    root = build_tiny_flux(tmp_path, dit_format="diffusers") / folder
    index = json.loads((root / f"{stem}.safetensors.index.json").read_text())
    seen, total = {}, 0
    for shard in sorted(root.glob(f"{stem}-*.safetensors")):
        for key, tensor in load_file(shard).items():
            seen[key] = shard.name
            total += tensor.numel() * tensor.element_size()
    assert index["weight_map"] == seen
    assert len(set(seen.values())) == 2
    assert index["metadata"]["total_size"] == total


def test_dit_bfl_keys_and_shapes(tiny):
    c = TINY["dit"]
    h, m, d = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"]), c["head_dim"]
    assert c["num_heads"] * d == h and sum(c["axes_dim"]) == d
    sd = load_file(tiny / "flux1-dev.safetensors")
    expect = {
        "img_in.weight": (h, 64),
        "txt_in.weight": (h, c["context_dim"]),
        "time_in.in_layer.weight": (h, 256),
        "vector_in.in_layer.weight": (h, c["pooled_dim"]),
        "guidance_in.out_layer.weight": (h, h),
        "double_blocks.1.img_mod.lin.weight": (6 * h, h),
        "double_blocks.1.txt_attn.qkv.bias": (3 * h,),
        "double_blocks.0.img_attn.norm.key_norm.scale": (d,),
        "double_blocks.0.txt_mlp.2.weight": (h, m),
        "single_blocks.1.linear1.weight": (3 * h + m, h),
        "single_blocks.1.linear2.weight": (h, h + m),
        "single_blocks.0.modulation.lin.weight": (3 * h, h),
        "final_layer.linear.weight": (64, h),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
    }
    assert {k: tuple(sd[k].shape) for k in expect} == expect
    assert not any(k.startswith(("double_blocks.2", "single_blocks.2")) for k in sd)
    scales = torch.cat([v for k, v in sd.items() if k.endswith(".scale")])
    assert (scales - 1).abs().max() < 0.1
    assert not any(k.startswith("guidance_in") for k in tiny_dit_state_dict(guidance=False))


def test_diffusers_dit_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    root = build_tiny_flux(tmp_path, dit_format="diffusers") / "transformer"
    config = {k: v for k, v in json.loads((root / "config.json").read_text()).items() if not k.startswith("_")}
    model = diffusers.FluxTransformer2DModel(**config).eval()
    sd = {}
    for shard in root.glob("*.safetensors"):
        sd.update(load_file(shard))
    model.load_state_dict(sd, strict=True)
    assert sd.keys() == bfl_to_diffusers_dit(tiny_dit_state_dict()).keys()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(1, 16, 64, generator=g),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample
        # the BFL file of the same seed, through our loader, is the same model
        bfl = load_file(build_tiny_flux(tmp_path / "bfl") / "flux1-dev.safetensors")
        config = infer_dit_config(dit_from_bfl(bfl))
        config.axes_dim = TINY["dit"]["axes_dim"]  # rope axes are not stored in the file
        ours = FluxDiT(config).eval()
        ours.load_state_dict(dit_from_bfl(bfl), strict=True)
        g = torch.Generator().manual_seed(0)
        x, txt, pooled = (torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 32, generator=g),
                          torch.randn(1, 32, generator=g))
        got = ours(x, torch.zeros(1, 16, 3), txt, torch.zeros(1, 8, 3), torch.tensor([0.5]), pooled,
                   torch.tensor([3.5]))
    assert out.abs().mean() > 1e-2
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_ae_layout_loads_in_diffusers(tiny):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    c = TINY["vae"]
    sd = load_file(tiny / "ae.safetensors")
    assert sd["encoder.conv_in.weight"].shape == (c["ch"], 3, 3, 3)
    assert sd["encoder.conv_out.weight"].shape[0] == 2 * c["z_channels"]
    assert sd["decoder.conv_in.weight"].shape == (c["ch"] * c["ch_mult"][-1], c["z_channels"], 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert all(k.startswith(("encoder.", "decoder.")) for k in sd)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=c["z_channels"],
        block_out_channels=[c["ch"] * m for m in c["ch_mult"]],
        down_block_types=["DownEncoderBlock2D"] * len(c["ch_mult"]),
        up_block_types=["UpDecoderBlock2D"] * len(c["ch_mult"]),
        layers_per_block=c["num_res_blocks"],
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(sd), vae.config), strict=True)
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        # the same file through our loader: the same encoder and decoder (ours work on normalised latents)
        enc_sd, dec_sd = vae_from_bfl(sd)
        config = infer_vae_config(enc_sd)
        enc, dec = FluxVAEEncoder(config).eval(), FluxVAEDecoder(config).eval()
        enc.load_state_dict(enc_sd, strict=True)
        dec.load_state_dict(dec_sd, strict=True)
        normalised = (z - config.shift_factor) * config.scaling_factor
        torch.testing.assert_close(enc(x), normalised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dec(normalised), y, rtol=1e-5, atol=1e-5)
    assert z.shape == (1, 16, 4, 4) and y.abs().mean() > 1e-2


def test_comfy_checkpoint_has_the_same_tensors(tmp_path, tiny):
    path = build_tiny_comfy_checkpoint(tmp_path / "flux_aio.safetensors")
    sd = load_file(path)
    assert all(k.startswith(tuple(COMFY_PREFIXES.values())) for k in sd)
    parts = {
        "dit": load_file(tiny / "flux1-dev.safetensors"),
        "vae": load_file(tiny / "ae.safetensors"),
        "clip": load_file(tiny / "text_encoder" / "model.safetensors"),
        "t5": {
            **load_file(tiny / "text_encoder_2" / "model-00001-of-00002.safetensors"),
            **load_file(tiny / "text_encoder_2" / "model-00002-of-00002.safetensors"),
        },
    }
    assert len(sd) == sum(len(p) for p in parts.values())
    for name, part in parts.items():
        for key, tensor in part.items():
            assert torch.equal(sd[COMFY_PREFIXES[name] + key], tensor), key
    assert torch.equal(parts["dit"]["img_in.weight"], tiny_dit_state_dict()["img_in.weight"])


def test_metadata_and_no_leftovers(tiny):
    with safe_open(tiny / "flux1-dev.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tiny.rglob("*.tmp"))
    clip = json.loads((tiny / "text_encoder" / "config.json").read_text())
    assert clip["eos_token_id"] == clip["vocab_size"] - 1 and clip["bos_token_id"] == clip["vocab_size"] - 2
