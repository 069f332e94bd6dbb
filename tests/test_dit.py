"""DiT parity with diffusers' FluxTransformer2DModel on identical random weights (fp32)."""
import pytest
import torch
from diffusers import FluxTransformer2DModel

from diffsynth.models import flux_dit
from diffsynth.models.flux_dit import (Extensions, FluxDiT, FluxDiTConfig, apply_rope, dit_from_bfl, dit_from_diffusers,
                                       dit_to_bfl, image_ids, infer_dit_config, patchify, rope_frequencies,
                                       unpatchify)

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


def diffusers_model(guidance: bool, seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval()
    with torch.no_grad():  # norms start at identity and some layers at zero: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def diffusers_to_bfl(sd, hidden):
    """Independent reference: the published BFL<->diffusers table, written out in the test."""
    out = {}
    top = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    for k, v in sd.items():
        mod, p = k.rsplit(".", 1)
        if mod in top:
            out[f"{top[mod]}.{p}"] = v
        elif mod == "norm_out.linear":
            scale, shift = v.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
              "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    n_double = TINY["num_layers"]
    for i in range(n_double):
        b = f"transformer_blocks.{i}."
        for src, dst in double.items():
            for p in ("weight", "bias"):
                if b + src + "." + p in sd:
                    name = "scale" if dst.endswith("_norm") else p
                    out[f"double_blocks.{i}.{dst}.{name}"] = sd[b + src + "." + p]
        for p in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{p}"] = torch.cat([sd[f"{b}attn.to_{c}.{p}"] for c in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{p}"] = torch.cat([sd[f"{b}attn.add_{c}_proj.{p}"] for c in "qkv"])
    for i in range(TINY["num_single_layers"]):
        b = f"single_transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(
                [sd[f"{b}attn.to_{c}.{p}"] for c in "qkv"] + [sd[f"{b}proj_mlp.{p}"]])
            out[f"single_blocks.{i}.linear2.{p}"] = sd[f"{b}proj_out.{p}"]
            out[f"single_blocks.{i}.modulation.lin.{p}"] = sd[f"{b}norm.linear.{p}"]
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"{b}attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"{b}attn.norm_k.weight"]
    return out


def inputs(batch, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    n_txt = 7
    return dict(
        img=torch.randn(batch, (h // 2) * (w // 2), 64, generator=g),
        txt=torch.randn(batch, n_txt, TINY["joint_attention_dim"], generator=g),
        pooled=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=image_ids(h, w, batch), txt_ids=torch.zeros(batch, n_txt, 3))


def ours_from(sd, guidance):
    config = infer_dit_config(sd)
    assert config.guidance_embed == guidance
    config.axes_dim = TINY["axes_dims_rope"]
    model = FluxDiT(config).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("source", ["diffusers", "bfl", "bfl-prefixed"])
def test_dit_matches_diffusers(guidance, source):
    ref = diffusers_model(guidance)
    sd = ref.state_dict()
    if source == "diffusers":
        ours = ours_from(dit_from_diffusers(sd), guidance)
    else:
        bfl = diffusers_to_bfl(sd, 32)
        if source == "bfl-prefixed":
            bfl = {"model.diffusion_model." + k: v for k, v in bfl.items()}
        ours = ours_from(dit_from_bfl(bfl), guidance)
    x = inputs(batch=2, h=6, w=10)  # non-square token grid 3x5
    guid = torch.full((2,), 3.5) if guidance else None
    with torch.no_grad():
        expected = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                       timestep=x["timestep"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                       guidance=guid, return_dict=False)[0]
        got = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timestep"], x["pooled"], guid)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_block_residuals_match_diffusers_controlnet_inputs():
    """`Extensions.residual` adds per-block image residuals exactly where diffusers adds ControlNet samples
    (this also covers the last single block, which computes image outputs only)."""
    ref = diffusers_model(True)
    ours = ours_from(dit_from_diffusers(ref.state_dict()), True)
    x = inputs(batch=2, h=6, w=10)
    g = torch.Generator().manual_seed(3)
    res = {kind: [torch.randn(2, 15, 32, generator=g) * 0.5 for _ in range(2)] for kind in ("double", "single")}
    guid = torch.full((2,), 3.5)
    with torch.no_grad():
        expected = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                       timestep=x["timestep"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=guid,
                       controlnet_block_samples=res["double"], controlnet_single_block_samples=res["single"],
                       return_dict=False)[0]
        got = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timestep"], x["pooled"], guid,
                   ext=Extensions(residual=lambda kind, i: res[kind][i]))
        plain = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timestep"], x["pooled"], guid)
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_single_block_context_tokens_are_keys_and_values_only():
    """block(img, context=txt) is block(cat[txt, img]) without the text rows, in value and gradient."""
    torch.manual_seed(0)
    block = flux_dit.SingleBlock(32, 2, 64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    txt, img, vec = torch.randn(2, 5, 32), torch.randn(2, 9, 32), torch.randn(2, 32)
    ids = torch.cat([torch.zeros(5, 3), image_ids(6, 6)[0]])
    rope = rope_frequencies(ids, (4, 6, 6), 10000)
    full = block(torch.cat([txt, img], 1), vec, rope)[:, 5:]
    img_only = block(img, vec, rope, context=txt)
    torch.testing.assert_close(img_only, full, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), block.to_qkv_mlp.weight)[0] for out in (full, img_only)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_rope_eager_complex_and_compiled_real_forms_agree(monkeypatch):
    ids = torch.cat([torch.zeros(3, 3), image_ids(4, 6)[0]])
    table = rope_frequencies(ids, (4, 6, 6), 10000)
    x = torch.randn(2, 3, 9, 16)
    eager = apply_rope(x, table)
    monkeypatch.setattr(flux_dit.torch.compiler, "is_compiling", lambda: True)
    real = apply_rope(x, table)
    torch.testing.assert_close(eager, real, rtol=1e-6, atol=1e-6)
    # Independent reference: rotate each channel pair (a, b) by its angle.
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = table[..., 0], table[..., 1]
    expected = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    torch.testing.assert_close(eager, expected, rtol=1e-6, atol=1e-6)
    assert apply_rope(x.bfloat16(), table).dtype == torch.bfloat16


def test_bfl_round_trip_is_exact():
    sd = dit_from_diffusers(diffusers_model(True).state_dict())
    back = dit_from_bfl(dit_to_bfl(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_infer_config_reads_depth_and_width():
    sd = dit_from_diffusers(diffusers_model(False).state_dict())
    c = infer_dit_config(sd)
    assert (c.hidden_size, c.num_heads, c.num_double_blocks, c.num_single_blocks) == (32, 2, 2, 2)
    assert (c.context_dim, c.pooled_dim, c.in_channels, c.guidance_embed) == (24, 20, 64, False)


def test_guidance_required_for_dev():
    model = FluxDiT(FluxDiTConfig(hidden_size=32, num_heads=2, num_double_blocks=1, num_single_blocks=1,
                                  context_dim=8, pooled_dim=8, axes_dim=(4, 6, 6)))
    x = inputs(1, 4, 4)
    with pytest.raises(ValueError, match="guidance"):
        model(x["img"], x["img_ids"], torch.randn(1, 7, 8), x["txt_ids"], x["timestep"], torch.randn(1, 8))


def test_unknown_bfl_key_is_named():
    bfl = diffusers_to_bfl(diffusers_model(True).state_dict(), 32)
    bfl["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="img_attn.extra"):
        dit_from_bfl(bfl)


def test_patchify_round_trip():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpatchify(patchify(x), 6, 10), x)
