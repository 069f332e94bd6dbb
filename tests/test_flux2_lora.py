"""FLUX.2 LoRA: the published dialects (diffusers/PEFT, kohya, ComfyUI/ai-toolkit with BFL names, PEFT's
`base_model.model.`, DiffSynth-Studio training output) load into our FLUX.2 DiT, merged or hot-loaded, with the
same output as diffusers' Flux2Transformer2DModel with that LoRA (fp32, tiny random weights); strict key
checks; kohya and PEFT export read back by diffusers."""
import pytest
import torch

from diffsynth.loading.lora import (FLUX2, apply_lora, clear_lora, convert_lora, describe_lora, detect_dialect,
                                    export_kohya, export_peft, lora_from_peft_model_state, naming_for, save_lora)
from diffsynth.models.flux2_dit import Flux2DiT, dit_to_bfl, infer_dit_config
from diffsynth.testing.tiny_flux2 import tiny_flux2_dit_config, tiny_flux2_dit_state_dict

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

# DiffSynth-Studio 2.0's --lora_target_modules for FLUX.2 (2 single blocks here)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "linear_in",
           "linear_out", "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
           "single_transformer_blocks.1.attn.to_out"]
RANK, ALPHA = 4, 6.0


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], -1).reshape(1, 16, 4)
    txt_ids = torch.stack([torch.zeros(5)] * 3 + [torch.arange(5.0)], -1)[None]
    return dict(img=torch.randn(1, 16, 128, generator=g), img_ids=img_ids, txt=torch.randn(1, 5, 96, generator=g),
                txt_ids=txt_ids, timestep=torch.tensor([0.6]))


def run_diffusers(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timestep"],
                     img_ids=x["img_ids"], txt_ids=x["txt_ids"]).sample


def base_diffusers():
    config = {k: v for k, v in tiny_flux2_dit_config().items() if not k.startswith("_")}
    model = diffusers.Flux2Transformer2DModel(**config).eval()
    model.load_state_dict(tiny_flux2_dit_state_dict(), strict=True)
    return model


def ours() -> Flux2DiT:
    sd = tiny_flux2_dit_state_dict()
    model = Flux2DiT(infer_dit_config(sd)).eval()
    model.load_state_dict(sd)
    return model


def run_ours(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A LoRA made with peft on diffusers' model and saved by diffusers; and that model's output with it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = base_diffusers()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    x = inputs()
    expected = run_diffusers(model, x)
    path = tmp_path_factory.mktemp("flux2_lora") / "peft"
    diffusers.Flux2KleinPipeline.save_lora_weights(
        path, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    return path / "pytorch_lora_weights.safetensors", expected, x


def diffusers_with(sd: dict) -> torch.nn.Module:
    """diffusers' model with a LoRA file's tensors, converted by diffusers' own FLUX.2 LoRA loader."""
    model = base_diffusers()
    converted = diffusers.Flux2KleinPipeline.lora_state_dict(sd)
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
    return model


def test_peft_lora_made_with_peft_matches_diffusers(peft_lora, one_thread):
    path, expected, x = peft_lora
    model = ours()
    base = run_ours(model, x)
    report = apply_lora(model, path, hotload=True)
    assert len(report.applied) == 2 * 12 + 2 * 2  # 12 layers per double block, 2 per single block
    assert rel(run_ours(model, x), expected) <= 1e-5
    clear_lora(model)
    assert torch.equal(run_ours(model, x), base)  # hot-loading clears bit for bit
    apply_lora(model, path)  # merged
    assert rel(run_ours(model, x), expected) <= 1e-5


def canonical(peft_lora):
    from diffsynth.loading.lora import read_lora_file
    return convert_lora(*read_lora_file(peft_lora[0]), naming=FLUX2)


def test_kohya_export_reads_back_and_diffusers_agrees(peft_lora, tmp_path, one_thread):
    """kohya names with BFL's fused q/k/v: diffusers' kohya converter and ours give the same model."""
    _, expected, x = peft_lora
    kohya = export_kohya(canonical(peft_lora))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in kohya
    assert detect_dialect(kohya, FLUX2) == "kohya"
    model = ours()
    apply_lora(model, kohya)
    out = run_ours(model, x)
    assert rel(out, expected) <= 1e-5
    assert rel(out, run_diffusers(diffusers_with(dict(kohya)), x)) <= 1e-5


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_bfl_names_ai_toolkit_and_peft_prefix(peft_lora, prefix, one_thread):
    """ai-toolkit / ComfyUI (`diffusion_model.` + BFL names, lora_A/B) and PEFT's `base_model.model.`."""
    _, expected, x = peft_lora
    kohya = export_kohya(canonical(peft_lora))
    bfl_modules = {k.removesuffix(".weight").replace(".", "_"): k.removesuffix(".weight")
                   for k in dit_to_bfl(tiny_flux2_dit_state_dict())}
    sd = {}
    for k, v in kohya.items():  # the same LoRA under BFL module names, alpha folded into lora_B
        stem, _, role = k.partition(".")
        module = bfl_modules[stem.removeprefix("lora_unet_")]
        if role == "lora_down.weight":
            sd[f"{prefix}{module}.lora_A.weight"] = v
        elif role == "lora_up.weight":
            sd[f"{prefix}{module}.lora_B.weight"] = v * (kohya[stem + ".alpha"] / v.shape[1])
    model = ours()
    apply_lora(model, sd)
    assert rel(run_ours(model, x), expected) <= 1e-5
    assert rel(run_ours(model, x), run_diffusers(diffusers_with(sd), x)) <= 1e-5


def test_peft_export_loads_in_diffusers(peft_lora, tmp_path, one_thread):
    _, expected, x = peft_lora
    sd, metadata = export_peft(canonical(peft_lora))
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in sd
    save_lora(tmp_path / "peft.safetensors", sd, metadata)
    model = base_diffusers()
    model.load_lora_adapter(str(tmp_path / "peft.safetensors"), prefix="transformer", adapter_name="x")
    assert rel(run_diffusers(model, x), expected) <= 1e-5
    back = ours()
    apply_lora(back, tmp_path / "peft.safetensors")
    assert rel(run_ours(back, x), expected) <= 1e-5


def test_diffsynth_training_output(peft_lora, one_thread):
    """DiffSynth-Studio 2.0 saves `pipe.dit.`-prefixed (or bare, after --remove_prefix_in_ckpt) PEFT keys."""
    _, expected, x = peft_lora
    lora = canonical(peft_lora)
    state = {}
    for name, lw in lora.layers.items():
        state[f"pipe.dit.{name}.lora_A.default.weight"] = lw.down
        state[f"pipe.dit.{name}.lora_B.default.weight"] = lw.up * lw.scale
    assert detect_dialect(state, FLUX2) == "diffsynth"
    model = ours()
    apply_lora(model, state)
    assert rel(run_ours(model, x), expected) <= 1e-5
    trained = lora_from_peft_model_state({k.removeprefix("pipe.dit."): v for k, v in state.items()}, naming=FLUX2)
    assert trained.family == "flux2" and sorted(trained.layers) == sorted(lora.layers)
    kohya = export_kohya(trained)  # what --lora_format kohya writes for FLUX.2
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight" in kohya


def test_strict_key_checks(peft_lora):
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
          "transformer.transformer_blocks.0.attn.to_nonsense.lora_A.weight": torch.zeros(2, 32),
          "transformer.transformer_blocks.0.attn.to_nonsense.lora_B.weight": torch.zeros(32, 2)}
    model = ours()
    before = model.transformer_blocks[0].attn.to_q.weight.clone()
    with pytest.raises(ValueError, match="to_nonsense"):
        apply_lora(model, sd)
    assert torch.equal(model.transformer_blocks[0].attn.to_q.weight, before)  # nothing applied
    flux1 = {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(192, 2)}
    with pytest.raises(ValueError, match="img_mod_lin"):  # a FLUX.1 LoRA names layers FLUX.2 lacks
        apply_lora(model, flux1)
    wrong = {"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(2, 32),
             "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(ValueError, match="no such layer"):  # a deeper model's LoRA
        apply_lora(model, wrong)


def test_naming_follows_the_model_and_describe(peft_lora):
    model = ours()
    assert naming_for(model) is FLUX2 and naming_for(model.config) is FLUX2
    info = describe_lora(peft_lora[0], model.config)
    assert info["family"] == "flux2" and info["num_layers"] == 28 and info["not_applied"] == []
    assert info["alphas"] == {ALPHA: 28}


@torch.no_grad()
def test_pipeline_load_lora_matches_diffusers_pipeline(peft_lora, tmp_path, one_thread):
    """`pipe.load_lora(pipe.dit, kohya file)` on a tiny klein folder = diffusers' Flux2KleinPipeline with
    `load_lora_weights` of the same file (<= 2/255); clear_lora restores the plain images bit for bit."""
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig
    from diffsynth.testing.tiny_flux2 import build_tiny_flux2
    root = build_tiny_flux2(tmp_path / "klein")
    path = tmp_path / "kohya.safetensors"
    save_lora(path, export_kohya(canonical(peft_lora)))
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(root / p)) for p in ("text_encoder", "transformer", "vae/diffusion_pytorch_model.safetensors")])
    kw = dict(height=48, width=64, seed=7, num_inference_steps=2, output_type="pt")
    plain = pipe("a red cat", **kw)
    pipe.load_lora(pipe.dit, str(path), hotload=True)
    got = pipe("a red cat", **kw)
    ref = diffusers.Flux2KleinPipeline.from_pretrained(str(root), dtype=torch.float32)
    ref.load_lora_weights(str(path))
    noise = torch.randn(1, 128, 3, 4, generator=torch.Generator("cpu").manual_seed(7))
    expected = ref(prompt="a red cat", height=48, width=64, num_inference_steps=2, guidance_scale=1.0,
                   latents=noise, output_type="pt").images
    assert (got - expected).abs().max() <= 2 / 255 and (got - plain).abs().max() > 4 / 255
    pipe.clear_lora()
    assert torch.equal(pipe("a red cat", **kw), plain)
