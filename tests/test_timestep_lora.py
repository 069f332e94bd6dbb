"""Timestep LoRA (DiffSynth-Studio 2.0's FLUX.1-dev-Timestep-LoRA): against diffusers' DiT with the LoRA merged
for one timestep (written out here from DiffSynth-Studio's algorithm), the pipeline, the example script."""
import math

import pytest
import torch
from safetensors.torch import save_file

from diffsynth import FluxImagePipeline
from diffsynth.loading.registry import build, detect
from diffsynth.models.flux_dit import dit_from_diffusers
from diffsynth.testing.tiny_image import record_dit_calls
from diffsynth.testing.tiny_timestep_lora import FILE, build_tiny_timestep_lora, tiny_timestep_lora_state_dict
from test_dit import diffusers_model, inputs, ours_from

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(height=32, width=32, num_inference_steps=2, t5_sequence_length=16, progress_bar_cmd=lambda x: x,
             output_type="latent")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return build_tiny_timestep_lora(tmp_path_factory.mktemp("multialign") / "MultiAlign-FLUX.1-dev")


def merged(ref, sd, sigma: float, alpha: float):
    """diffusers' DiT with the LoRA folded in at one timestep: for each layer y = W x + b gets
    alpha * B (diag(gamma) A x + beta), gamma/beta = Linear(e), e = [cos, sin](1000 sigma * 10000^(-k/128))."""
    k = torch.arange(128, dtype=torch.float32)
    angle = 1000 * sigma * torch.exp(-math.log(10000) * k / 128)
    e = torch.cat([torch.cos(angle), torch.sin(angle)])
    params = dict(ref.named_parameters())
    layers = {k.split(".lora_")[0][len("base_model.model."):] for k in sd}
    with torch.no_grad():
        for name in layers:
            p = f"base_model.model.{name}"
            gamma = sd[f"{p}.lora_time_gamma.weight"] @ e + sd[f"{p}.lora_time_gamma.bias"]
            beta = sd[f"{p}.lora_time_beta.weight"] @ e + sd[f"{p}.lora_time_beta.bias"]
            up, down = sd[f"{p}.lora_B.weight"], sd[f"{p}.lora_A.weight"]
            params[f"{name}.weight"] += alpha * up @ torch.diag(gamma) @ down
            params[f"{name}.bias"] += alpha * up @ beta
    return ref


def test_timestep_lora_equals_diffusers_with_the_lora_merged_at_that_timestep(lora_dir):
    ref = diffusers_model(guidance=True)
    ours = ours_from(dit_from_diffusers(ref.state_dict()), True)
    (det,) = detect(str(lora_dir / FILE))
    lora = build(det, torch.float32, "cpu")["timestep_lora"]
    lora.alpha = 1.5
    lora.check(ours)
    x = inputs(batch=1, h=4, w=6)
    sigma = torch.tensor([0.6])
    args = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], sigma, x["pooled"], torch.full((1,), 3.5))
    with torch.no_grad():
        plain = ours(*args)
        lora.attach(ours, sigma)
        got = ours(*args)
        lora.detach()
        assert torch.equal(ours(*args), plain)  # the hooks are gone
        ref = merged(ref, tiny_timestep_lora_state_dict(), 0.6, 1.5)
        want = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
                   timestep=sigma, img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=torch.full((1,), 3.5),
                   return_dict=False)[0]
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pipeline_applies_it_at_every_step(tiny_pipe, lora_dir, monkeypatch):
    """Every DiT evaluation runs with the LoRA attached at that evaluation's sigma (the module test above pins
    what an attached LoRA computes) and detached after it."""
    base = tiny_pipe("a cat", seed=0, **SMALL)
    attached = []
    try:
        tiny_pipe.load_timestep_lora(str(lora_dir / FILE), alpha=2.0)
        lora = tiny_pipe.timestep_lora
        calls = record_dit_calls(monkeypatch, passthrough=True)
        attach = lora.attach
        monkeypatch.setattr(lora, "attach", lambda dit, sigma: attached.append(sigma.clone()) or attach(dit, sigma))
        with_lora = tiny_pipe("a cat", seed=0, **SMALL)
        assert len(attached) == len(calls) == SMALL["num_inference_steps"]
        for sigma, call in zip(attached, calls):
            assert torch.equal(sigma, call.timestep)
        assert not any(m._forward_hooks for m in tiny_pipe.dit.modules())  # detached after each call
        batched = tiny_pipe("a cat", seed=0, cfg_scale=2.0, **SMALL)
        separate = tiny_pipe("a cat", seed=0, cfg_scale=2.0, batch_cfg=False, **SMALL)
    finally:
        tiny_pipe.timestep_lora = None
    assert (base - with_lora).abs().max() > 1e-3
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)  # one timestep embedding per row
    torch.testing.assert_close(tiny_pipe("a cat", seed=0, **SMALL), base, rtol=0, atol=0)


def test_bad_timestep_lora_inputs(tiny_pipe, tiny_root, lora_dir, tmp_path):
    with pytest.raises(ValueError, match="not a timestep LoRA"):
        tiny_pipe.load_timestep_lora(str(tiny_root / "ae.safetensors"))
    with pytest.raises(ValueError, match=r"is a timestep LoRA .*pipe.load_timestep_lora"):
        tiny_pipe.load_lora(tiny_pipe.dit, str(lora_dir / FILE))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        tiny_pipe.load_timestep_lora(str(lora_dir / FILE), alpha=float("nan"))
    sd = tiny_timestep_lora_state_dict()
    deeper = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in sd.items()}
    save_file(deeper, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match="blocks.7"):
        tiny_pipe.load_timestep_lora(str(tmp_path / "deep.safetensors"))
    assert tiny_pipe.timestep_lora is None


def test_example_script(tiny_root, lora_dir, tmp_path, monkeypatch):
    from example_harness import run_example
    glb = run_example("model_inference/FLUX.1-dev-Timestep-LoRA.py", tmp_path, monkeypatch,
                      {"black-forest-labs/FLUX.1-dev": tiny_root, "DiffSynth-Studio/MultiAlign-FLUX.1-dev": lora_dir})
    assert (tmp_path / "FLUX.1-dev-Timestep-LoRA.jpg").is_file() and glb["pipe"].timestep_lora.alpha == 2.0
    assert isinstance(glb["pipe"], FluxImagePipeline)
