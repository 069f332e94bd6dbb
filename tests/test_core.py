"""The variant-ready core: table-driven strict detection, the unit mechanism, model_fn's extension points."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffsynth.loading import components as table
from diffsynth.loading.registry import build, detect
from diffsynth.models.flux_dit import Extensions, FluxDiT, FluxDiTConfig, image_ids
from diffsynth.models.flux_dit_cache import CachedStep, FirstBlockCache
from diffsynth.ops.files import CheckpointError
from diffsynth.pipelines.denoise import DiTCall, model_fn, run_dit
from diffsynth.pipelines.units import run_units, step_unit, unit

CONFIG = dict(hidden_size=32, num_heads=2, num_double_blocks=2, num_single_blocks=2, context_dim=24,
              pooled_dim=16, axes_dim=(4, 6, 6))


def tiny_dit(seed: int = 0, **kw) -> FluxDiT:
    torch.manual_seed(seed)
    dit = FluxDiT(FluxDiTConfig(**{**CONFIG, **kw})).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
    return dit


def dit_inputs(batch: int = 1, h: int = 4, w: int = 4, text: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(batch, 16, h, w, generator=g), timestep=torch.full((batch,), 0.7),
                prompt_emb=torch.randn(batch, text, 24, generator=g), pooled_prompt_emb=torch.randn(batch, 16, generator=g),
                text_ids=torch.zeros(batch, text, 3), image_ids=image_ids(h, w, batch),
                guidance=torch.full((batch,), 3.5))


def write(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


# ----------------------------------------------------------------------------- detection

def _diffusers_controlnet_sd():
    from diffusers import FluxControlNetModel
    torch.manual_seed(0)
    return FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                               axes_dims_rope=(4, 6, 6), num_mode=10).state_dict()


def _xlabs_controlnet_sd(dit_sd):
    sd = {k: v for k, v in dit_sd.items() if k.startswith(("double_blocks.0.", "img_in", "txt_in", "time_in", "vector_in"))}
    sd.update({"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "input_hint_block.0.bias": torch.zeros(16),
               "controlnet_blocks.0.weight": torch.zeros(32, 32), "controlnet_blocks.0.bias": torch.zeros(32),
               "pos_embed_input.weight": torch.zeros(32, 64), "pos_embed_input.bias": torch.zeros(32)})
    return sd


def _siglip_sd(prefix: str):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14))
    return {prefix + k: v for k, v in model.state_dict().items()}


def test_every_family_is_recognised_as_what_it_is_never_as_a_dit(tmp_path):
    """Control, adapter and encoder files that carry DiT-like blocks are named as what they are."""
    from diffsynth.models.flux_dit import dit_to_bfl
    bfl_dit = dit_to_bfl(tiny_dit().state_dict())
    files = {
        "flux-controlnet": _diffusers_controlnet_sd(),
        "xlabs-controlnet": _xlabs_controlnet_sd(bfl_dit),
        "flux-ipadapter": {"ip_adapter.0.to_k_ip.weight": torch.zeros(32, 24),
                           "image_proj.proj.weight": torch.zeros(96, 16), "image_proj.norm.weight": torch.zeros(24)},
        "flux-redux": {"redux_up.weight": torch.zeros(96, 16), "redux_up.bias": torch.zeros(96),
                       "redux_down.weight": torch.zeros(24, 96), "redux_down.bias": torch.zeros(24)},
        "siglip": _siglip_sd(""),
        "qwen2.5-vl": {"model.visual.patch_embed.proj.weight": torch.zeros(16, 3, 2, 14, 14),
                       "model.language_model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 16),
                       "lm_head.weight": torch.zeros(32, 16)},
        "flux-dit": bfl_dit,
    }
    xlabs_ip = {"double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight": torch.zeros(32, 24),
                "ip_adapter_proj_model.proj.weight": torch.zeros(96, 16)}
    for family, sd in [*files.items(), ("flux-ipadapter", xlabs_ip), ("siglip", _siglip_sd("vision_model."))]:
        found = detect(write(tmp_path, f"{family}.safetensors", sd))
        assert [d.family for d in found] == [family], family


def test_recognised_family_without_loader_says_so(tmp_path, monkeypatch):
    """A family whose loader does not exist yet (here InfiniteYou's projector with its builder taken away)
    names itself instead of failing as an unknown file or loading as something else."""
    import dataclasses
    family = table.FAMILY_BY_NAME["infiniteyou-projector"]
    monkeypatch.setitem(table.FAMILY_BY_NAME, family.name, dataclasses.replace(family, build=None))
    sd = {"image_proj.latents": torch.zeros(1, 8, 32), "image_proj.proj_in.weight": torch.zeros(32, 16),
          "image_proj.layers.0.0.to_kv.weight": torch.zeros(64, 32)}
    det = detect(write(tmp_path, "image_proj_model.safetensors", sd))[0]
    with pytest.raises(CheckpointError, match="InfiniteYou image projector.*cannot load it yet"):
        build(det)


def test_table_drives_vram_groups_and_in_loop_models():
    groups = {name: g for g in table.vram_groups() for name in g}
    assert "text_encoder_2" in groups["text_encoder_1"] and "dit" not in groups["text_encoder_1"]
    assert set(groups["dit"]) == {c.name for c in table.COMPONENTS if c.vram_group == "denoise"}
    assert {c.name for c in table.COMPONENTS if c.in_loop} <= set(groups["dit"])  # on the device while denoising
    assert "dit" in table.in_loop_names() and "vae_decoder" not in table.in_loop_names()
    assert table.component("text_encoder").name == "text_encoder_1"
    with pytest.raises(KeyError, match="not a model of the pipeline"):
        table.component("unet")


# ----------------------------------------------------------------------------- units

class FakePipe:
    def load_models_to_device(self, names):
        self.loaded = tuple(names)


def test_unit_kinds_and_declarations():
    @unit(outputs=("doubled",))
    def shared_unit(pipe, x):
        return {"doubled": 2 * x}

    @unit(per_branch=True, outputs=("emb",))
    def branch_unit(pipe, prompt, doubled):
        return {"emb": f"{prompt}:{doubled}"}

    @unit(both_branches=True, outputs=("seen",))
    def both_unit(pipe, branches, doubled):
        return [{"seen": [b["prompt"] for b in branches]} for _ in branches]

    shared, posi, nega = {"x": 3}, {"prompt": "p"}, {"prompt": "n"}
    run_units(FakePipe(), [shared_unit, branch_unit, both_unit], shared, posi, nega, cfg=True)
    assert shared["doubled"] == 6 and posi["emb"] == "p:6" and nega["emb"] == "n:6"
    assert posi["seen"] == nega["seen"] == ["p", "n"]

    @unit(outputs=("a",))
    def sloppy(pipe):
        return {"a": 1, "b": 2}
    with pytest.raises(RuntimeError, match=r"undeclared outputs \['b'\]"):
        run_units(FakePipe(), [sloppy], {}, {}, {}, cfg=False)
    with pytest.raises(ValueError, match="not among its outputs"):
        unit(outputs=("a",), model_inputs=("c",))(lambda pipe: {})


def test_active_unit_replaces_prompt_encoding(tiny_pipe):
    """A unit with `active` + `replaces` stands in for CLIP+T5 encode_prompt (Step1X/Nexus-Gen style)."""
    from diffsynth.pipelines.flux_image import PROMPT_OUTPUTS
    from diffsynth.pipelines.units import active_units
    calls = []

    @unit(per_branch=True, outputs=PROMPT_OUTPUTS, model_inputs=PROMPT_OUTPUTS, replaces=("encode_prompt",),
          active=lambda pipe: True)
    def other_encoder(pipe, prompt, num_images=1):
        calls.append(prompt)
        return {"prompt_emb": torch.zeros(num_images, 3, tiny_pipe.dit.config.context_dim),
                "pooled_prompt_emb": torch.zeros(num_images, tiny_pipe.dit.config.pooled_dim),
                "text_ids": torch.zeros(num_images, 3, 3)}

    units = active_units(tiny_pipe, [*tiny_pipe.units, other_encoder])
    assert "encode_prompt" not in [u.name for u in units]
    original = tiny_pipe.units
    try:
        tiny_pipe.units = [*original, other_encoder]
        tiny_pipe("x", height=32, width=32, num_inference_steps=1, seed=0, output_type="latent",
                  progress_bar_cmd=lambda x: x)
    finally:
        tiny_pipe.units = original
    assert calls == ["x"]


# ----------------------------------------------------------------------------- model_fn and the DiT forward

def test_model_fn_rejects_inputs_no_step_takes():
    dit = tiny_dit()
    models = type("M", (), {"dit": dit})
    with pytest.raises(TypeError, match=r"no denoising step takes: \['kontext_latents'\]"):
        model_fn(models, **dit_inputs(), kontext_latents=torch.zeros(1))


def test_pipeline_rejects_unknown_arguments(tiny_pipe):
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['kontxt_images'\]"):
        tiny_pipe("x", kontxt_images=[], num_inference_steps=1)


def test_step_unit_adds_channels_reference_tokens_and_residuals():
    """A step unit's additions reach the DiT exactly as a hand-built call would."""
    dit = tiny_dit(in_channels=128)
    x = dit_inputs()
    g = torch.Generator().manual_seed(5)
    cond, ref = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 4, 128, generator=g)
    ref_ids = image_ids(4, 4, 1, index=1)[:, :4]
    res = torch.randn(1, 4, 32, generator=g)

    @step_unit()
    def variant(models, call: DiTCall, step, my_cond):
        call.channels.append(my_cond)
        call.ref.append((ref, ref_ids))
        call.residuals.append(lambda kind, i: res if kind == "double" else None)

    with torch.no_grad():
        got = model_fn(type("M", (), {"dit": dit}), **x, step_units=[variant], my_cond=cond)
        from diffsynth.models.flux_dit import patchify, unpatchify
        img = patchify(torch.cat([x["latents"], cond], 1))
        want = dit(img, x["image_ids"], x["prompt_emb"], x["text_ids"], x["timestep"], x["pooled_prompt_emb"],
                   x["guidance"], ref=ref, ref_ids=ref_ids,
                   ext=Extensions(residual=lambda kind, i: res if kind == "double" else None))
    torch.testing.assert_close(got, unpatchify(want, 4, 4))


def test_reference_tokens_attend_and_are_dropped():
    """ref tokens equal a forward over [target, ref] tokens whose output rows are cut to the target."""
    dit = tiny_dit()
    x = dit_inputs()
    from diffsynth.models.flux_dit import patchify
    img = patchify(x["latents"])
    ref = torch.randn(1, 6, 64)
    ref_ids = torch.cat([torch.ones(1, 6, 1), torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2)], -1)
    args = (x["prompt_emb"], x["text_ids"], x["timestep"], x["pooled_prompt_emb"], x["guidance"])
    with torch.no_grad():
        got = dit(img, x["image_ids"], *args, ref=ref, ref_ids=ref_ids)
        full = dit(torch.cat([img, ref], 1), torch.cat([x["image_ids"], ref_ids], 1), *args)
        plain = dit(img, x["image_ids"], *args)
    torch.testing.assert_close(got, full[:, :img.shape[1]])
    assert (got - plain).abs().max() > 1e-4


def test_attention_hook_sees_the_right_queries_and_adds_its_output():
    """double blocks: image queries before RoPE; single blocks: queries after RoPE; zeros change nothing."""
    dit = tiny_dit()
    x = dit_inputs()
    shapes = []

    def zero_hook(kind, index, q, rows):
        shapes.append((kind, index, tuple(q.shape)))
        return torch.zeros_like(q)

    def bias_hook(kind, index, q, rows):
        return torch.full_like(q, 0.05) if kind == "double" and index == 0 else None

    with torch.no_grad():
        base = run_dit(dit, DiTCall(**x))
        zero = run_dit(dit, DiTCall(**x, attention=[zero_hook]))
        shifted = run_dit(dit, DiTCall(**x, attention=[bias_hook]))
    torch.testing.assert_close(zero, base)
    assert (shifted - base).abs().max() > 1e-4
    n_img, n_all = 4, 4 + 5
    assert shapes == [("double", 0, (1, 2, n_img, 16)), ("double", 1, (1, 2, n_img, 16)),
                      ("single", 0, (1, 2, n_all, 16)), ("single", 1, (1, 2, n_img, 16))]


def test_step_cache_runs_the_same_forward_with_extensions():
    """A cache that never skips (threshold 0) gives exactly the uncached forward, residuals included, and a
    skipped branch of a CFG batch is computed from its own residual while the other runs."""
    dit = tiny_dit()
    x = dit_inputs(batch=2)
    res = torch.randn(2, 4, 32)
    ext = Extensions(residual=lambda kind, i: res)
    from diffsynth.models.flux_dit import patchify
    args = (patchify(x["latents"]), x["image_ids"], x["prompt_emb"], x["text_ids"], x["timestep"],
            x["pooled_prompt_emb"], x["guidance"])
    with torch.no_grad():
        plain = dit(*args, ext=ext)
        states = [FirstBlockCache(0.0, 3), FirstBlockCache(0.0, 3)]
        cached = dit(*args, ext=ext, cache=CachedStep(states, 0))
        torch.testing.assert_close(cached, plain)
        states[0].threshold = 1e9  # branch 0 skips step 1, branch 1 computes it
        step1 = dit(*args, ext=ext, cache=CachedStep(states, 1))
    torch.testing.assert_close(step1[1:], plain[1:])
    assert states[0].skipped_steps == [1] and states[1].computed_steps == [0, 1]


def test_a_tensor_of_the_wrong_width_is_named(tmp_path):
    """One tensor inconsistent with the rest: the error names it with both shapes (no raw torch traceback)."""
    from diffsynth.models.flux_dit import dit_to_bfl
    sd = dit_to_bfl(tiny_dit().state_dict())
    sd["double_blocks.1.img_mlp.2.weight"] = torch.zeros(32, 100)
    det = detect(write(tmp_path, "bad.safetensors", sd))[0]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ff_a\.2\.weight: \(32, 100\) in the file, \(32, 128\) expected"):
        build(det)


def _attributes_read(fn, names: set[str], seen: set) -> set[str]:
    """Model attributes `pipe.<name>` that fn or the functions of its module it calls read (vae_encode reads
    the VAE encoder)."""
    import inspect
    import re
    import sys
    source = inspect.getsource(fn)
    read = set(re.findall(r"pipe\.(\w+)", source)) & names
    if "vae_encode(" in source:
        read.add("vae_encoder")
    module = sys.modules[fn.__module__]
    for called in set(re.findall(r"\b(\w+)\(", source)):
        helper = getattr(module, called, None)
        if inspect.isfunction(helper) and helper.__module__ == fn.__module__ and helper not in seen:
            seen.add(helper)
            read |= _attributes_read(helper, names, seen)
    return read


def test_units_declare_every_model_they_read():
    """The trainer frees, after caching, every model no running unit reads; a unit that reads an undeclared
    model would then find it gone (Kontext training with --cache_dir once lost its VAE encoder that way)."""
    from diffsynth.loading.components import COMPONENTS
    from diffsynth.pipelines.flux_image import BASE_UNITS
    from diffsynth.pipelines.units import Unit
    names = {c.name for c in COMPONENTS}
    undeclared = {u.name: sorted(_attributes_read(u.fn, names, {u.fn}) - set(u.reads))
                  for u in BASE_UNITS if isinstance(u, Unit)}
    assert not {k: v for k, v in undeclared.items() if v}
