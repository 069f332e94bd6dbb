"""LoRA dialects, application, hotload/clear and export, checked against diffusers' own loader
(where it handles the dialect on a tiny model) or against an independent reference written here:
the diffusers model with ``W += strength * alpha / rank * up @ down`` added by hand.
"""
import json
import re
import types
from collections import Counter

import pytest
import torch
from torch import nn
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin

from diffsynth.loading.lora import (CanonicalLoRA, apply_lora, clear_lora, convert_lora, describe_lora,
                                 detect_dialect, export_kohya, export_peft, load_lora_into_pipeline,
                                 lora_from_peft_model_state, save_lora)
from diffsynth.models.flux_dit import FluxDiT, FluxDiTConfig, dit_from_diffusers, image_ids

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
H, MLP = 32, 128
STRENGTH = 0.7


# ----------------------------------------------------------------------------- models and inputs

def _random_diffusers(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


BASE_SD = {k: v.clone() for k, v in _random_diffusers().state_dict().items()}


def diffusers_model():
    model = FluxTransformer2DModel(**TINY, guidance_embeds=True).eval()
    model.load_state_dict(BASE_SD)
    return model


def ours_model():
    sd = dit_from_diffusers(BASE_SD)
    model = FluxDiT(FluxDiTConfig(in_channels=64, out_channels=64, hidden_size=H, num_heads=2, num_double_blocks=2,
                                  num_single_blocks=2, context_dim=24, pooled_dim=20, axes_dim=(4, 6, 6))).eval()
    model.load_state_dict(sd)
    return model


def _inputs(channels=64):
    g = torch.Generator().manual_seed(1)
    return dict(img=torch.randn(1, 6, channels, generator=g), txt=torch.randn(1, 5, 24, generator=g),
                pooled=torch.randn(1, 20, generator=g), t=torch.rand(1, generator=g),
                img_ids=image_ids(4, 6, 1), txt_ids=torch.zeros(1, 5, 3), guidance=torch.full((1,), 3.5))


X, X128 = _inputs(), _inputs(128)


@torch.no_grad()
def run_diffusers(model, x=X):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                 timestep=x["t"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


@torch.no_grad()
def run_ours(model, x=X):
    return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["pooled"], x["guidance"])


BASE_OUT = run_diffusers(diffusers_model())
BASE_OURS = run_ours(ours_model())


def assert_match(got, expected, label):
    """fp32 agreement (~1e-5 relative) and proof that the LoRA changed the output."""
    assert (expected - BASE_OUT[..., : expected.shape[-1]]).abs().max() > 1e-2, f"{label}: LoRA had no effect"
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{label}: max rel error {err:.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _DiffusersPipe(FluxLoraLoaderMixin):
    """The least a FluxLoraLoaderMixin needs to load LoRAs into a bare transformer."""

    def __init__(self, transformer):
        self.transformer, self.text_encoder, self.hf_device_map = transformer, None, None
        self.components = {"transformer": transformer}


def diffusers_with(*loras):
    """diffusers' own loader: each (state dict or path, strength) becomes an adapter."""
    model = diffusers_model()
    pipe = _DiffusersPipe(model)
    for i, (lora, _) in enumerate(loras):
        pipe.load_lora_weights(dict(lora) if isinstance(lora, dict) else str(lora), adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], [s for _, s in loras])
    return model


def ours_with(*loras, hotload=False):
    model = ours_model()
    for lora, s in loras:
        apply_lora(model, convert_lora(lora) if isinstance(lora, dict) else lora, alpha=s, hotload=hotload)
    return model


# ----------------------------------------------------------------------------- the independent reference

# BFL module -> (out, in) for the tiny model, and its diffusers module(s) (rows split in this order).
def _bfl_modules():
    mods = {"img_in": (H, 64), "txt_in": (H, 24), "time_in.in_layer": (H, 256), "time_in.out_layer": (H, H),
            "vector_in.in_layer": (H, 20), "vector_in.out_layer": (H, H), "guidance_in.in_layer": (H, 256),
            "guidance_in.out_layer": (H, H), "final_layer.linear": (64, H),
            "final_layer.adaLN_modulation.1": (2 * H, H)}
    for i in range(2):
        for s in ("img", "txt"):
            mods.update({f"double_blocks.{i}.{s}_mod.lin": (6 * H, H), f"double_blocks.{i}.{s}_attn.qkv": (3 * H, H),
                         f"double_blocks.{i}.{s}_attn.proj": (H, H), f"double_blocks.{i}.{s}_mlp.0": (MLP, H),
                         f"double_blocks.{i}.{s}_mlp.2": (H, MLP)})
        mods.update({f"single_blocks.{i}.linear1": (3 * H + MLP, H), f"single_blocks.{i}.linear2": (H, H + MLP),
                     f"single_blocks.{i}.modulation.lin": (3 * H, H)})
    return mods


BFL = _bfl_modules()
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
           "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
           "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
           "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
           "img_attn.norm.query_norm.scale": "attn.norm_q", "img_attn.norm.key_norm.scale": "attn.norm_k",
           "txt_attn.norm.query_norm.scale": "attn.norm_added_q", "txt_attn.norm.key_norm.scale": "attn.norm_added_k"}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear",
           "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
           "linear1_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
           "norm.query_norm.scale": "attn.norm_q", "norm.key_norm.scale": "attn.norm_k"}


def bfl_to_diffusers(bfl, t):
    """Split a BFL-layout tensor (weight delta, bias delta or norm scale) onto diffusers module names."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", bfl)
    if m:
        kind, i, rest = m.groups()
        prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{i}."
        target = (_DOUBLE if kind == "double" else _SINGLE)[rest]
    else:
        prefix, target = "", _TOP[bfl]
        if bfl == "final_layer.adaLN_modulation.1":  # BFL (shift, scale) -> diffusers (scale, shift)
            t = torch.cat(t.chunk(2)[::-1])
    if isinstance(target, str):
        return {prefix + target: t}
    sizes = [H] * 3 + [MLP] * (len(target) == 4)
    return {prefix + name: part for name, part in zip(target, t.split(sizes))}


def reference(deltas, bias=None, norms=None, widen_to=None):
    """diffusers model with weight deltas added by hand (diffusers module names)."""
    model = diffusers_model()
    mods = dict(model.named_modules())
    with torch.no_grad():
        if widen_to:
            old = model.x_embedder
            model.x_embedder = nn.Linear(widen_to, old.out_features)
            model.x_embedder.weight.zero_()
            model.x_embedder.weight[:, : old.in_features] = old.weight
            model.x_embedder.bias.copy_(old.bias)
            mods["x_embedder"] = model.x_embedder
        for name, d in deltas.items():
            mods[name].weight += d
        for name, d in (bias or {}).items():
            mods[name].bias += d
        for name, v in (norms or {}).items():
            mods[name].weight.copy_(v)
    return model


def random_entries(names, seed, alphas=True, in_override=None):
    """{module: (down, up, alpha|None)} with varied ranks and alphas; shapes from BFL or a shape dict."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, (name, (o, i)) in enumerate(names.items()):
        i = (in_override or {}).get(name, i)
        r = 1 + (j + seed) % 4
        alpha = (0.5 * r * (1 + (j % 3))) if alphas and j % 5 != 4 else None
        out[name] = (torch.randn(r, i, generator=g) * 0.2, torch.randn(o, r, generator=g) * 0.2, alpha)
    return out


def delta(down, up, alpha, strength=STRENGTH):
    return strength * (1.0 if alpha is None else alpha / down.shape[0]) * up @ down


def bfl_reference(entries, strength=STRENGTH, **kw):
    deltas = {}
    for bfl, (down, up, alpha) in entries.items():
        deltas.update(bfl_to_diffusers(bfl, delta(down, up, alpha, strength)))
    return reference(deltas, **kw)


def write(entries, key, down="lora_down.weight", up="lora_up.weight", alpha="alpha"):
    sd = {}
    for name, (d, u, a) in entries.items():
        sd[f"{key(name)}.{down}"], sd[f"{key(name)}.{up}"] = d, u
        if a is not None and alpha:
            sd[f"{key(name)}.{alpha}"] = torch.tensor(a)
    return sd


def kohya_key(bfl):
    return "lora_unet_" + bfl.replace(".", "_")


# diffusers module -> (out, in) of every Linear in the tiny transformer
DIFFUSERS = {n: (m.out_features, m.in_features) for n, m in diffusers_model().named_modules()
             if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- dialects vs diffusers

def _diffusers_kohya_subset(entries):
    """What diffusers' kohya converter gets right on a tiny model: it hard-codes FLUX.1's 3072/12288 split of
    linear1, and it names the top-level layers without the `transformer.` prefix, so they are silently dropped."""
    return {k: v for k, v in entries.items() if "_blocks." in k and not k.endswith("linear1")}


def test_kohya_matches_diffusers():
    entries = _diffusers_kohya_subset(random_entries(BFL, seed=1))
    assert len({a for *_, a in entries.values()}) > 3 and len({d.shape[0] for d, *_ in entries.values()}) == 4
    sd = write(entries, kohya_key)
    assert detect_dialect(sd) == "kohya"
    expected = run_diffusers(diffusers_with((sd, STRENGTH)))
    assert_match(run_ours(ours_with((sd, STRENGTH))), expected, "kohya vs diffusers (merge)")
    assert_match(run_ours(ours_with((sd, STRENGTH), hotload=True)), expected, "kohya vs diffusers (hotload)")
    assert_match(run_diffusers(bfl_reference(entries)), expected, "kohya: hand reference vs diffusers")


def test_kohya_linear1_and_top_level_match_reference():
    names = {k: BFL[k] for k in BFL if k.endswith("linear1") or "_blocks." not in k}
    entries = random_entries(names, seed=2)
    entries["final_layer.adaLN_modulation.1"] = entries["final_layer.adaLN_modulation.1"][:2] + (3.0,)
    sd = write(entries, kohya_key)
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(bfl_reference(entries)),
                 "kohya linear1 + top-level vs reference")


@pytest.mark.parametrize("variant", ["lora_down", "lora_A"])
def test_comfyui(variant):
    entries = random_entries(BFL, seed=3)
    names = ("lora_down.weight", "lora_up.weight") if variant == "lora_down" else ("lora_A.weight", "lora_B.weight")
    sd = write(entries, lambda n: f"diffusion_model.{n}", *names)
    assert detect_dialect(sd) == "comfyui"
    ours = run_ours(ours_with((sd, STRENGTH)))
    assert_match(ours, run_diffusers(bfl_reference(entries)), f"comfyui {variant} vs reference")
    if variant == "lora_down":  # diffusers reads the kohya-like ComfyUI form
        sub = _diffusers_kohya_subset(entries)
        sd = write(sub, lambda n: f"diffusion_model.{n}", *names)
        assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(diffusers_with((sd, STRENGTH))),
                     "comfyui lora_down vs diffusers")


def _peft_entries(seed, alphas):
    """Separate q/k/v with different ranks and missing parts (no to_v in block 0, no proj_mlp / to_k in single 1)."""
    skip = {"transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_mlp",
            "single_transformer_blocks.1.attn.to_k"}
    return random_entries({k: v for k, v in DIFFUSERS.items() if k not in skip}, seed, alphas)


def diffusers_reference(entries, strength=STRENGTH):
    return reference({k: delta(d, u, a, strength) for k, (d, u, a) in entries.items()})


@pytest.mark.parametrize("alphas", [True, False], ids=["alpha", "no-alpha"])
def test_peft_matches_diffusers(alphas):
    entries = _peft_entries(4, alphas)
    if alphas:  # diffusers gives alpha-less modules the most common alpha, not their rank: give all one
        entries = {k: (d, u, a if a is not None else 2.0) for k, (d, u, a) in entries.items()}
    sd = write(entries, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight", "alpha" if alphas else None)
    assert detect_dialect(sd) == "peft"
    lora = convert_lora(sd)
    fused = lora.layers["single_blocks.1.to_qkv_mlp"]
    assert fused.alpha is None and fused.up.shape == (3 * H + MLP, fused.rank)
    assert torch.equal(fused.up[H: 2 * H], torch.zeros(H, fused.rank))  # absent k is a zero block
    expected = run_diffusers(diffusers_with((sd, STRENGTH)))
    label = f"peft ({'alpha' if alphas else 'no alpha'}) vs diffusers"
    assert_match(run_ours(ours_with((sd, STRENGTH))), expected, label)
    assert_match(run_diffusers(diffusers_reference(entries)), expected, "peft: hand reference vs diffusers")


def test_diffusers_saved_files_keep_alphas_in_metadata(tmp_path):
    """Files written by diffusers carry lora_alpha / alpha_pattern only in the header, not as tensors."""
    from peft.utils import get_peft_model_state_dict
    entries = {k: (d, u, a if a is not None else 3.0) for k, (d, u, a) in _peft_entries(30, alphas=True).items()}
    sd = write(entries, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight")
    sd = {k: v.item() if k.endswith(".alpha") else v for k, v in sd.items()}  # tensor alphas break its saving
    model = diffusers_with((sd, STRENGTH))
    expected = run_diffusers(model)
    model.save_lora_adapter(tmp_path / "adapter", adapter_name="l0")  # bare keys, unprefixed metadata
    _DiffusersPipe.save_lora_weights(tmp_path / "pipe",  # prefixed keys and metadata
                                     transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="l0"),
                                     transformer_lora_adapter_metadata=model.peft_config["l0"].to_dict())
    for folder in ("adapter", "pipe"):
        path = tmp_path / folder / "pytorch_lora_weights.safetensors"
        info = describe_lora(path)
        assert not any(k.endswith(".alpha") for k in info["layers"]) and len(info["alphas"]) > 2
        assert_match(run_ours(ours_with((path, STRENGTH))), expected, f"diffusers-saved ({folder}) metadata alphas")


def test_bare_diffusers_names_match_diffusers():
    entries = _peft_entries(5, alphas=False)
    sd = write(entries, lambda n: n, "lora_A.weight", "lora_B.weight", None)
    assert detect_dialect(sd) == "diffusers"
    model = diffusers_model()
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="bare")
    model.set_adapters(["bare"], [STRENGTH])
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(model), "bare diffusers vs diffusers")


def test_onetrainer():
    entries = random_entries(DIFFUSERS, seed=6)
    entries = {k: (d, u, a if a is not None else float(d.shape[0])) for k, (d, u, a) in entries.items()}
    key = lambda n: "lora_transformer_" + n.replace(".", "_")  # noqa: E731
    sd = write(entries, key)
    assert detect_dialect(sd) == "onetrainer"
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(diffusers_reference(entries)),
                 "onetrainer vs reference")
    # diffusers' OneTrainer converter maps only attention and top-level layers of blocks
    sub = {k: v for k, v in entries.items() if ".attn." in k or "_blocks." not in k}
    sd = write(sub, key)
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(diffusers_with((sd, STRENGTH))),
                 "onetrainer vs diffusers")


def test_xlabs_matches_diffusers():
    proc = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
            "proj_lora2": "txt_attn.proj"}
    names = {}
    for i in range(2):
        names.update({f"double_blocks.{i}.processor.{p}": f"double_blocks.{i}.{b}" for p, b in proc.items()})
        names.update({f"single_blocks.{i}.processor.qkv_lora": f"single_blocks.{i}.linear1_qkv",
                      f"single_blocks.{i}.processor.proj_lora": f"single_blocks.{i}.linear2"})
    shapes = {**BFL, **{f"single_blocks.{i}.linear1_qkv": (3 * H, H) for i in range(2)}}
    entries = random_entries({x: shapes[b] for x, b in names.items()}, seed=7, alphas=False)
    sd = write(entries, lambda n: n, "down.weight", "up.weight", None)
    assert detect_dialect(sd) == "xlabs"
    lora = convert_lora(sd)
    assert lora.layers["single_blocks.0.to_qkv_mlp"].up.shape[0] == 3 * H + MLP  # padded with zero mlp rows
    expected = run_diffusers(diffusers_with((sd, STRENGTH)))
    assert_match(run_ours(ours_with((sd, STRENGTH))), expected, "xlabs vs diffusers")
    ref = bfl_reference({names[x]: v for x, v in entries.items()})
    assert_match(run_diffusers(ref), expected, "xlabs: hand reference vs diffusers")


# ----------------------------------------------------------------------------- dialects diffusers lacks (tiny)

def _control_lora(seed=8):
    """BFL Control-LoRA: BFL keys, lora_A/lora_B, a lora_B bias everywhere, full norm scales, 128-wide img_in."""
    entries = random_entries(BFL, seed, alphas=False, in_override={"img_in": 128})
    g = torch.Generator().manual_seed(seed)
    sd, biases, norms = write(entries, lambda n: n, "lora_A.weight", "lora_B.weight", None), {}, {}
    for name, (_, up, _) in entries.items():
        sd[f"{name}.lora_B.bias"] = biases[name] = torch.randn(up.shape[0], generator=g) * 0.1
    for i in range(2):
        for n in ("img_attn.norm.query_norm.scale", "img_attn.norm.key_norm.scale",
                  "txt_attn.norm.query_norm.scale", "txt_attn.norm.key_norm.scale"):
            norms[f"double_blocks.{i}.{n}"] = 1 + torch.randn(H // 2, generator=g) * 0.3
        for n in ("norm.query_norm.scale", "norm.key_norm.scale"):
            norms[f"single_blocks.{i}.{n}"] = 1 + torch.randn(H // 2, generator=g) * 0.3
    sd.update(norms)
    return sd, entries, biases, norms


def _control_reference(entries, biases, norms, strength=STRENGTH):
    bias = {}
    for name, b in biases.items():
        bias.update(bfl_to_diffusers(name, strength * b))
    norm = {}
    for name, v in norms.items():
        norm.update(bfl_to_diffusers(name, v))
    return bfl_reference(entries, strength, bias=bias, norms=norm, widen_to=128)


def test_bfl_control_lora_matches_reference():
    sd, entries, biases, norms = _control_lora()
    assert detect_dialect(sd) == "bfl_control"
    lora = convert_lora(sd)
    assert len(lora.norm_weights) == 12 and lora.layers["x_embedder"].down.shape == (entries["img_in"][0].shape[0], 128)
    expected = run_diffusers(_control_reference(entries, biases, norms), X128)
    model = ours_model()
    report = apply_lora(model, lora, alpha=STRENGTH)
    assert report.widened == ["x_embedder"] and model.x_embedder.weight.shape == (H, 128)
    assert_match(run_ours(model, X128), expected, "bfl control vs reference (merge)")
    model = ours_model()
    apply_lora(model, lora, alpha=STRENGTH, hotload=True)
    assert_match(run_ours(model, X128), expected, "bfl control vs reference (hotload)")
    clear_lora(model)
    assert model.x_embedder.weight.shape == (H, 64) and model.x_embedder.in_features == 64
    assert torch.equal(run_ours(model), run_ours(ours_model()))


def test_bfl_control_export_loads_in_diffusers(tmp_path):
    """diffusers' Control-LoRA converter is FLUX.1-sized; our PEFT export (bias, norms, wide x_embedder) is not."""
    sd, entries, biases, norms = _control_lora(9)
    sd_peft, meta = export_peft(convert_lora(sd))
    save_lora(tmp_path / "control.safetensors", sd_peft, meta)
    expected = run_diffusers(_control_reference(entries, biases, norms), X128)
    assert_match(run_diffusers(diffusers_with((tmp_path / "control.safetensors", STRENGTH)), X128), expected,
                 "bfl control -> peft export -> diffusers vs reference")


def test_fal_kontext_matches_reference():
    entries = random_entries(BFL, seed=10, alphas=False)
    sd = write(entries, lambda n: f"base_model.model.{n}", "lora_A.weight", "lora_B.weight", None)
    assert detect_dialect(sd) == "fal_kontext"
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_diffusers(bfl_reference(entries)), "fal kontext vs reference")


INTERNAL = {n: (m.out_features, m.in_features) for n, m in ours_model().named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("fmt", ["pipe.dit.{}.lora_A.default.weight", "{}.lora_A.default.weight", "{}.lora_A.weight"])
def test_diffsynth_format_matches_reference(fmt):
    entries = random_entries(INTERNAL, seed=11, alphas=False)
    sd = {}
    for name, (d, u, _) in entries.items():
        sd[fmt.format(name)], sd[fmt.format(name).replace("lora_A", "lora_B")] = d, u
    assert detect_dialect(sd) == "diffsynth"
    ref = ours_model()
    with torch.no_grad():
        for name, (d, u, a) in entries.items():
            ref.get_submodule(name).weight += delta(d, u, a)
    assert_match(run_ours(ours_with((sd, STRENGTH))), run_ours(ref), f"diffsynth {fmt.split('{')[0] or 'bare'}")


def test_training_output_round_trip():
    """PEFT-injected FluxDiT (as our trainer does) -> lora_from_peft_model_state -> merged: same output."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = ["a_to_qkv", "b_to_qkv", "ff_a.0", "ff_a.2", "ff_b.0", "ff_b.2", "a_to_out", "b_to_out", "proj_out",
               "norm.linear", "norm1_a.linear", "norm1_b.linear", "to_qkv_mlp"]
    trained = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), ours_model())
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    sd = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert any(k.endswith("a_to_qkv.lora_A.default.weight") for k in sd)
    lora = lora_from_peft_model_state(sd, lora_alpha=8)
    assert len(lora.layers) == 2 * 10 + 2 * 3  # 10 linears per double block, 3 per single block
    model = ours_model()
    apply_lora(model, lora)
    assert_match(run_ours(model), run_ours(trained), "training output (peft-injected) vs merged")


# ----------------------------------------------------------------------------- CLIP text encoder

def _clip():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


CLIP_MODULES = {f"text_model.encoder.layers.{i}.{m}": ((32 if m == "mlp.fc1" else 16), (32 if m == "mlp.fc2" else 16))
                for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}


@pytest.mark.parametrize("fmt", ["lora_te1_{us}", "lora_te_{us}", "text_encoders.clip_l.transformer.{dot}",
                                 "text_encoder.{dot}", "onetrainer"])
def test_text_encoder_lora(fmt):
    entries = random_entries(CLIP_MODULES, seed=12)
    if fmt == "onetrainer":  # OneTrainer names CLIP like kohya, beside lora_transformer_ DiT keys
        key = lambda n: "lora_te1_" + n.replace(".", "_")  # noqa: E731
    else:
        key = lambda n: fmt.format(us=n.replace(".", "_"), dot=n)  # noqa: E731
    sd = write(entries, key, *(("lora_A.weight", "lora_B.weight") if fmt.startswith("text_encoder.") else ()))
    dit_entries = random_entries({"double_blocks.0.img_attn.qkv": BFL["double_blocks.0.img_attn.qkv"]}, seed=13)
    if fmt == "onetrainer":
        dit_entries = {"transformer_blocks.0.attn.to_q": random_entries({"q": (H, H)}, 13)["q"]}
        sd.update(write(dit_entries, lambda n: "lora_transformer_" + n.replace(".", "_")))
    else:
        sd.update(write(dit_entries, kohya_key))
    clip, dit = _clip(), ours_model()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    pipe = types.SimpleNamespace(text_encoder_1=clip)
    report = load_lora_into_pipeline(pipe, dit, sd, alpha=STRENGTH)
    assert len([n for n in report.applied if n.startswith("text_encoder_1.")]) == len(CLIP_MODULES)
    after = clip.state_dict()
    for name, (d, u, a) in entries.items():
        w = name.removeprefix("text_model.") + ".weight"  # transformers 5 drops the text_model level
        w = w if w in after else name + ".weight"
        torch.testing.assert_close(after[w] - before[w], delta(d, u, a), rtol=1e-5, atol=1e-6)
    assert (dit.blocks[0].attn.a_to_qkv.weight != ours_model().blocks[0].attn.a_to_qkv.weight).any()
    with pytest.raises(ValueError, match="text_encoder_1"):
        load_lora_into_pipeline(types.SimpleNamespace(text_encoder_1=None), ours_model(), sd)


def test_pipeline_load_lora_and_clear(tmp_path):
    from diffsynth.pipelines.flux_image import FluxImagePipeline
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.text_encoder_1 = ours_model(), _clip()
    before = {k: v.clone() for k, v in pipe.text_encoder_1.state_dict().items()}
    sd = write(random_entries(BFL, seed=31), kohya_key)
    te_entries = random_entries(CLIP_MODULES, seed=32)
    sd.update(write(te_entries, lambda n: "lora_te1_" + n.replace(".", "_")))
    save_lora(tmp_path / "l.safetensors", sd)
    pipe.load_lora(pipe.dit, tmp_path / "l.safetensors", alpha=STRENGTH, hotload=True)
    assert_match(run_ours(pipe.dit), run_ours(ours_with((sd, STRENGTH))), "pipeline load_lora hotload")
    merged = _clip()  # the text encoder with the weight deltas added by hand
    with torch.no_grad():
        for name, (down, up, alpha) in te_entries.items():
            merged.get_submodule(name.removeprefix("text_model.")).weight += delta(down, up, alpha)  # transformers 5
    tokens = torch.arange(8)[None]
    with torch.no_grad():
        hot = pipe.text_encoder_1(tokens).last_hidden_state
        torch.testing.assert_close(hot, merged(tokens).last_hidden_state, rtol=1e-5, atol=1e-5)
        pipe.clear_lora()
    assert torch.equal(run_ours(pipe.dit), BASE_OURS)
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder_1.state_dict().items())


# ----------------------------------------------------------------------------- export

def _mixed_lora():
    """kohya (fused layers with alpha, linear1, final layers) + separate diffusers q/k (block-diagonal)."""
    entries = random_entries({k: v for k, v in BFL.items() if "txt_attn.qkv" not in k}, seed=14)
    sd = write(entries, kohya_key)
    qk = random_entries({f"transformer_blocks.{i}.attn.add_{c}_proj": (H, H) for i in range(2) for c in "qk"}, 15)
    sd.update(write(qk, lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight"))
    deltas = {}
    for bfl, (d, u, a) in entries.items():
        deltas.update(bfl_to_diffusers(bfl, delta(d, u, a)))
    deltas.update({k: delta(d, u, a) for k, (d, u, a) in qk.items()})
    return sd, reference(deltas), qk


def test_export_peft_loads_in_diffusers(tmp_path):
    sd, ref, qk = _mixed_lora()
    lora = convert_lora(sd)
    ours = run_ours(ours_with((lora, STRENGTH)))
    assert_match(ours, run_diffusers(ref), "mixed kohya+peft vs reference")
    out, meta = export_peft(lora)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == config["transformer.r"] and config["transformer.rank_pattern"]
    # block-diagonal fused q/k split back into the original parts and ranks; absent v left out
    d, u, _ = qk["transformer_blocks.0.attn.add_k_proj"]
    assert out["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"].shape == d.shape
    assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_A.weight" not in out
    save_lora(tmp_path / "peft.safetensors", out, meta)
    assert_match(run_diffusers(diffusers_with((tmp_path / "peft.safetensors", STRENGTH))), ours,
                 "ours -> export_peft -> diffusers")
    assert_match(run_ours(ours_with((tmp_path / "peft.safetensors", STRENGTH))), ours, "ours -> export_peft -> ours")


def _assert_same_lora(a: CanonicalLoRA, b: CanonicalLoRA):
    for mine, theirs in ((a.layers, b.layers), (a.te_layers, b.te_layers)):
        assert mine.keys() == theirs.keys()
        for k in mine:
            x, y = mine[k], theirs[k]
            assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up), k
            assert x.scale == y.scale, k


def test_kohya_round_trip_is_exact(tmp_path):
    sd, _, _ = _mixed_lora()
    clip_entries = random_entries(CLIP_MODULES, seed=16)
    sd.update(write(clip_entries, lambda n: "lora_te1_" + n.replace(".", "_")))
    lora = convert_lora(sd)
    lora.layers["final_proj_out"].alpha = None  # final layers fold alpha (diffusers ignores it there)
    lora.layers["final_norm_out.linear"].alpha = None
    out = export_kohya(lora)
    assert out["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == lora.layers["blocks.0.attn.a_to_qkv"].alpha
    save_lora(tmp_path / "kohya.safetensors", out)
    back = convert_lora(out)
    assert back.dialect == "kohya" and not back.unknown
    _assert_same_lora(lora, back)
    # a final layer with alpha != rank: alpha folded into up, same update
    lora = convert_lora(sd)
    fin = lora.layers["final_norm_out.linear"]
    fin.alpha = 3.0 * fin.rank
    back = convert_lora(export_kohya(lora))
    torch.testing.assert_close(back.layers["final_norm_out.linear"].delta(), fin.delta(), rtol=1e-6, atol=1e-7)


def test_export_kohya_loads_in_diffusers():
    entries = _diffusers_kohya_subset(random_entries(BFL, seed=17))
    lora = convert_lora(write(entries, lambda n: f"diffusion_model.{n}", "lora_A.weight", "lora_B.weight"))
    out = export_kohya(lora)
    assert_match(run_diffusers(diffusers_with((out, STRENGTH))), run_ours(ours_with((lora, STRENGTH))),
                 "ours -> export_kohya -> diffusers")


def test_export_kohya_refuses_bias_and_norms():
    sd, *_ = _control_lora()
    with pytest.raises(ValueError, match="norm"):
        export_kohya(convert_lora(sd))
    with pytest.warns(UserWarning, match="bias"):
        out = export_kohya(convert_lora(sd), strict=False)
    assert not any("img_in" in k for k in out)


# ----------------------------------------------------------------------------- hotload, stacking, errors

def test_hotload_then_clear_is_bit_identical():
    model = ours_model()
    before_out = run_ours(model)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd, *_ = _control_lora(18)
    apply_lora(model, convert_lora(sd), alpha=0.5, hotload=True)
    apply_lora(model, write(random_entries(BFL, seed=19), kohya_key), alpha=0.3, hotload=True)
    assert not torch.equal(run_ours(model, X128), run_ours(ours_model(), X))
    assert model.x_embedder.weight.shape == (H, 128)
    clear_lora(model)
    assert torch.equal(run_ours(model), before_out)
    after = model.state_dict()
    assert after.keys() == before_sd.keys() and all(torch.equal(after[k], before_sd[k]) for k in after)
    assert not any(m._forward_hooks for m in model.modules())


def test_two_loras_stack_with_separate_strengths():
    a = write(_diffusers_kohya_subset(random_entries(BFL, seed=20)), kohya_key)
    b = write(_peft_entries(21, alphas=False), lambda n: f"transformer.{n}", "lora_A.weight", "lora_B.weight", None)
    expected = run_diffusers(diffusers_with((a, 0.7), (b, -0.4)))
    assert_match(run_ours(ours_with((a, 0.7), (b, -0.4), hotload=True)), expected, "two loras hotload vs diffusers")
    assert_match(run_ours(ours_with((a, 0.7), (b, -0.4))), expected, "two loras merged vs diffusers")


def test_per_module_alpha_is_honoured():
    g = torch.Generator().manual_seed(22)
    d, u = torch.randn(2, H, generator=g), torch.randn(H, 2, generator=g)
    sd = write({"double_blocks.0.img_attn.proj": (d, u, 1.0), "double_blocks.0.txt_attn.proj": (d, u, 8.0)}, kohya_key)
    model, base = ours_model(), ours_model()
    apply_lora(model, sd, alpha=STRENGTH)
    for name, alpha in (("a_to_out", 1.0), ("b_to_out", 8.0)):
        got = getattr(model.blocks[0].attn, name).weight - getattr(base.blocks[0].attn, name).weight
        torch.testing.assert_close(got, STRENGTH * alpha / 2 * u @ d, rtol=1e-5, atol=1e-6)


def test_unmatched_keys_raise_or_warn():
    entries = random_entries({k: BFL[k] for k in ("double_blocks.0.img_attn.proj", "double_blocks.1.txt_mlp.0")}, 23)
    good = write(entries, kohya_key)
    bad = dict(good)
    bad["lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight"] = torch.zeros(2, H)
    bad["lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight"] = torch.zeros(H, 2)
    bad.update(write(random_entries({"double_blocks.7.img_attn.proj": (H, H)}, 24), kohya_key))  # no block 7
    bad.update({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(2, 17),  # wrong in_features
                "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(H, 2)})
    model = ours_model()
    with pytest.raises(ValueError) as err:
        apply_lora(model, bad)
    for name in ("img_attn_bogus", "double_blocks_7_img_attn_proj", "single_blocks_0_linear2"):
        assert name in str(err.value)
    assert torch.equal(run_ours(model), run_ours(ours_model()))  # nothing applied
    with pytest.warns(UserWarning, match="img_attn_bogus") as rec:
        report = apply_lora(model, bad, alpha=STRENGTH, strict=False)
    assert "double_blocks_7_img_attn_proj" in str(rec[0].message) and len(report.skipped) == 3
    torch.testing.assert_close(run_ours(model), run_ours(ours_with((good, STRENGTH))), rtol=0, atol=0)


def test_dora_and_lycoris_are_refused():
    sd = write(random_entries({"double_blocks.0.img_attn.proj": (H, H)}, 25), kohya_key)
    with pytest.raises(ValueError, match="DoRA"):
        convert_lora({**sd, "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, H)})
    with pytest.raises(ValueError, match="LoKr"):
        convert_lora({"lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.ones(2, 2)})


def test_merge_computes_in_fp32_and_keeps_dtype():
    model = ours_model().to(torch.bfloat16)
    lin = model.blocks[0].attn.a_to_out
    w0 = lin.weight.detach().clone()
    d, u, a = random_entries({"double_blocks.0.img_attn.proj": (H, H)}, 26)["double_blocks.0.img_attn.proj"]
    apply_lora(model, write({"double_blocks.0.img_attn.proj": (d, u, a)}, kohya_key), alpha=STRENGTH)
    assert lin.weight.dtype == torch.bfloat16
    assert torch.equal(lin.weight, (w0.float() + delta(d, u, a)).to(torch.bfloat16))


def test_describe_lora(tmp_path):
    entries = random_entries({k: BFL[k] for k in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                                                    "final_layer.linear")}, 27)
    sd = write(entries, kohya_key)
    sd.update(write(random_entries({"double_blocks.9.img_mlp.0": (MLP, H)}, 28), kohya_key))
    save_lora(tmp_path / "l.safetensors", sd)
    info = describe_lora(tmp_path / "l.safetensors", ours_model().config)
    assert info["dialect"] == "kohya" and info["num_layers"] == 4
    extra = random_entries({"x": (MLP, H)}, 28).values()
    assert info["ranks"] == Counter(d.shape[0] for d, *_ in [*entries.values(), *extra])
    assert "single_blocks.1.to_qkv_mlp" in info["layers"]
    assert len(info["not_applied"]) == 1 and "double_blocks_9_img_mlp_0" in info["not_applied"][0]
    json.dumps(info)

