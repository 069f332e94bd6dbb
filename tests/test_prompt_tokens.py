"""LoRA-Encoder (a LoRA file -> one prompt token, any LoRA dialect) and AttriCtrl value controllers."""
import pytest
import torch
import torch.nn.functional as F

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading.lora import convert_lora, export_kohya, read_lora_file
from diffsynth.loading.registry import build, detect
from diffsynth.models.flux_dit import timestep_embedding
from diffsynth.ops.files import load_state_dict, save_safetensors
from diffsynth.testing.tiny_image import record_dit_calls
from diffsynth.testing.tiny_adapters import (lora_encoder_state_dict, tiny_lora_encoder_layers, write_tiny_lora_encoder,
                                             write_tiny_value_controller)

quiet = dict(progress_bar_cmd=lambda x: x)
KW = dict(prompt="", height=64, width=64, num_inference_steps=2, t5_sequence_length=16, seed=1, output_type="latent",
          **quiet)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_root):
    d = tmp_path_factory.mktemp("prompt_tokens")
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, i, o in tiny_lora_encoder_layers()[:12]:  # a LoRA on some layers only
        lora[f"{name}.lora_A.weight"] = torch.randn(2, i, generator=g) * 0.3
        lora[f"{name}.lora_B.weight"] = torch.randn(o, 2, generator=g) * 0.3
    save_safetensors(lora, d / "lora.safetensors")
    return dict(encoder=write_tiny_lora_encoder(d / "lora_encoder.safetensors"), lora=d / "lora.safetensors",
                brightness=write_tiny_value_controller(d / "brightness.safetensors"),
                contrast=write_tiny_value_controller(d / "contrast.safetensors", seed=5), dir=d)


@pytest.fixture(scope="module")
def pipe(tiny_configs, files):
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=tiny_configs() + [ModelConfig(path=str(files[k])) for k in ("encoder", "brightness", "contrast")])


def reference_token(sd, lora):
    """The encoder's computation written out with plain tensor operations."""
    width = sd["special_embeds"].shape[-1]
    tokens = [sd["special_embeds"]]
    for name, i, o in tiny_lora_encoder_layers():
        key = f"embedder.model_dict.{name.replace('.', '___')}"
        a = lora.get(f"{name}.lora_A.weight", torch.zeros(1, i))
        b = lora.get(f"{name}.lora_B.weight", torch.zeros(o, 1))
        h = F.layer_norm(sd[f"{key}.x"] @ a.T @ b.T, (o,), sd[f"{key}.layer_norm.weight"], sd[f"{key}.layer_norm.bias"])
        kind = name.split(".", 2)[2].replace(".", "___")
        tokens.append(h @ sd[f"embedder.proj_dict.{kind}.weight"].T + sd[f"embedder.proj_dict.{kind}.bias"])
    x = torch.cat(tokens, 1)
    p = "encoders.0."
    lin = lambda t, n: t @ sd[f"{p}{n}.weight"].T + sd[f"{p}{n}.bias"]  # noqa: E731
    h = F.layer_norm(x, (width,), sd[f"{p}layer_norm1.weight"], sd[f"{p}layer_norm1.bias"])
    q, k, v = lin(h, "attn.to_q"), lin(h, "attn.to_k"), lin(h, "attn.to_v")
    x = x + lin(torch.softmax(q @ k.transpose(1, 2) / width ** 0.5, -1) @ v, "attn.to_out")
    h = lin(F.layer_norm(x, (width,), sd[f"{p}layer_norm2.weight"], sd[f"{p}layer_norm2.bias"]), "fc1")
    x = x + lin(h * torch.sigmoid(1.702 * h), "fc2")
    x = F.layer_norm(x[:, :1], (width,), sd["final_layer_norm.weight"], sd["final_layer_norm.bias"])
    return x @ sd["final_linear.weight"].T + sd["final_linear.bias"]


def test_lora_token_matches_written_out_computation(pipe, files):
    lora = load_state_dict(str(files["lora"]))
    got = pipe.lora_encoder(convert_lora(*read_lora_file(files["lora"])))
    assert got.shape == (1, 1, 32)
    assert torch.allclose(got, reference_token(lora_encoder_state_dict(), lora), atol=1e-5)


def test_any_lora_dialect_gives_the_same_token(pipe, files, tmp_path):
    ours = convert_lora(*read_lora_file(files["lora"]))
    save_safetensors(export_kohya(ours), tmp_path / "kohya.safetensors")
    kohya = convert_lora(*read_lora_file(tmp_path / "kohya.safetensors"))
    assert torch.allclose(pipe.lora_encoder(ours), pipe.lora_encoder(kohya), atol=1e-5)


def test_lora_token_steers_and_scale_matters(pipe, files):
    base = pipe(**KW)
    steered = pipe(**KW, lora_encoder_inputs=str(files["lora"]))
    config = pipe(**KW, lora_encoder_inputs=[ModelConfig(path=str(files["lora"]))])
    assert torch.equal(steered, config)
    assert (steered - base).abs().max() > 1e-4
    half = pipe(**KW, lora_encoder_inputs=str(files["lora"]), lora_encoder_scale=0.5)
    assert (half - steered).abs().max() > 1e-5


def test_value_controllers(pipe, files, monkeypatch):
    """Each value's tokens reach every DiT call after the 16 T5 tokens (text id 0), on both CFG rows."""
    calls = record_dit_calls(monkeypatch, passthrough=True)
    first, second = pipe.value_controller
    with torch.no_grad():
        tokens = {v: first(torch.tensor(v)) for v in (0.9, 0.1)}
        contrast = second(torch.tensor(0.5))
    for value in (0.9, 0.1):
        calls.clear()
        pipe(**KW, value_controller_inputs=[value, None])
        assert len(calls) == KW["num_inference_steps"]
        for call in calls:
            torch.testing.assert_close(call.prompt_emb[:, 16:], tokens[value][None], rtol=0, atol=0)
            assert call.text_ids.shape[1] == 16 + len(tokens[value]) and not call.text_ids[:, 16:].any()
    assert (tokens[0.9] - tokens[0.1]).abs().max() > 1e-3  # the value changes the tokens
    calls.clear()
    pipe(**KW, value_controller_inputs=[0.9, 0.5], cfg_scale=2.0, negative_prompt="blurry")
    both = torch.cat([tokens[0.9], contrast])[None].expand(2, -1, -1)  # one batch: positive and negative rows
    for call in calls:
        torch.testing.assert_close(call.prompt_emb[:, 16:], both, rtol=0, atol=0)
    controller = pipe.value_controller[0]
    sd = load_state_dict(str(files["brightness"]))
    emb = timestep_embedding(torch.tensor([900.0]))
    expected = F.linear(F.silu(F.linear(emb, sd["prefer_value_embedder.0.weight"], sd["prefer_value_embedder.0.bias"])),
                        sd["prefer_value_embedder.2.weight"], sd["prefer_value_embedder.2.bias"]) + sd["positional_embedding"]
    assert torch.allclose(controller(torch.tensor(0.9)), expected, atol=1e-5)


@pytest.mark.parametrize("kw, error, match", [
    (dict(value_controller_inputs=[0.5]), ValueError, "1 values for 2"),
    (dict(value_controller_inputs=[1.5, None]), ValueError, r"in \[0, 1\]"),
    (dict(lora_encoder_inputs=[]), ValueError, "empty"),
    (dict(lora_encoder_inputs=3), TypeError, "LoRA paths"),
])
def test_bad_inputs(pipe, kw, error, match):
    with pytest.raises(error, match=match):
        pipe(**KW, **kw)


def test_without_the_models_is_an_error(tiny_pipe, files):
    with pytest.raises(RuntimeError, match="LoRA-Encoder"):
        tiny_pipe(**KW, lora_encoder_inputs=str(files["lora"]))
    with pytest.raises(ValueError, match="0 loaded value controllers"):
        tiny_pipe(**KW, value_controller_inputs=[0.5])


def test_detection(files):
    assert detect(str(files["encoder"]))[0].family == "flux-lora-encoder"
    assert detect(str(files["brightness"]))[0].family == "flux-value-controller"
    assert set(build(detect(str(files["brightness"]))[0])) == {"value_controller"}
