"""FLUX.2 [klein]'s Qwen3 prompt encoder: parity with diffusers' Flux2KleinPipeline prompt embedding (transformers'
Qwen3ForCausalLM, chat template without thinking, 512 tokens, layers 9/18/27), loading with and without config."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from diffsynth.loading.registry import build, detect
from diffsynth.models.flux2_text_encoder import (QWEN3_FORMAT, chat_text, encode_prompt, infer_qwen3_config,
                                                 load_qwen3, load_tokenizer)
from diffsynth.ops.files import CheckpointError, save_safetensors
from diffsynth.testing.tiny_flux2 import tiny_qwen3_config, write_tiny_qwen3, write_tiny_qwen3_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein_te")
    return write_tiny_qwen3(root), write_tiny_qwen3_tokenizer(root)


def hf_tokenizer(folder):
    """transformers' tokenizer for the oracle side (ours: load_tokenizer)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def ours(path):
    (det,) = detect(str(path))
    assert (det.family, det.format, det.components) == ("qwen3", "hf", ("text_encoder_qwen3",))
    return build(det, torch.float32, "cpu")["text_encoder_qwen3"]


@torch.no_grad()
def test_prompt_embedding_matches_diffusers(folders, one_thread):
    pytest.importorskip("diffusers")
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM
    te_dir, tok_dir = folders
    prompts = ["a red cat on the table", ""]
    ref_model = Qwen3ForCausalLM.from_pretrained(str(te_dir), torch_dtype=torch.float32).eval()
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(ref_model, hf_tokenizer(tok_dir), prompts, torch.float32,
                                                           "cpu")
    got = encode_prompt(load_tokenizer(tok_dir), ours(te_dir), prompts, "cpu", QWEN3_FORMAT)
    assert got.shape == expected.shape == (2, 512, 3 * tiny_qwen3_config()["hidden_size"])
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"Qwen3 prompt embedding vs diffusers: rel err {err:.2e}")
    assert err < 1e-5


@torch.no_grad()
def test_layers_past_the_last_read_are_not_loaded(folders, tmp_path, one_thread):
    """Qwen3-4B/8B have 36 layers and FLUX.2 reads the state after 27: the 28th layer on and the final norm are
    neither read from the file nor built, and the prompt embedding is still the whole model's (diffusers')."""
    pytest.importorskip("diffusers")
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(1)
    whole = Qwen3ForCausalLM(Qwen3Config.from_dict({**tiny_qwen3_config(), "num_hidden_layers": 36,
                                                    "max_window_layers": 36})).eval()
    whole.save_pretrained(tmp_path / "text_encoder")
    (det,) = detect(str(tmp_path / "text_encoder"))
    assert any(k.startswith("layers.26.") for k in det.refs)
    assert not any(k.startswith(("layers.27.", "norm.")) for k in det.refs)
    model = ours(tmp_path / "text_encoder")
    assert len(model.layers) == 27
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(whole, hf_tokenizer(folders[1]), ["a red cat"],
                                                           torch.float32, "cpu")
    got = encode_prompt(load_tokenizer(folders[1]), model, ["a red cat"], "cpu", QWEN3_FORMAT)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # given the whole state dict (LM head, final norm, all 36 layers), load_qwen3 takes only what it reads
    whole_sd = {k.removeprefix("model."): t for k, t in whole.state_dict().items()}
    assert {"lm_head.weight", "norm.weight", "layers.35.mlp.up_proj.weight"} <= whole_sd.keys()
    direct = load_qwen3(whole_sd, whole.config.to_dict())
    assert len(direct.layers) == 27
    torch.testing.assert_close(encode_prompt(load_tokenizer(folders[1]), direct, ["a red cat"], "cpu", QWEN3_FORMAT),
                               got, rtol=0, atol=0)


def test_chat_template_closes_thinking(folders):
    text = chat_text(load_tokenizer(folders[1]), "a cat")
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_config_inferred_without_config_json(folders, tmp_path):
    """A single file (ComfyUI's text_encoders/qwen_3_4b.safetensors) carries no config: shapes give it."""
    te_dir = folders[0]
    sd = {}
    for shard in sorted(te_dir.glob("model-*.safetensors")):
        sd.update(load_safetensors(shard))
    save_safetensors(sd, tmp_path / "qwen_3.safetensors")
    inferred, saved = ours(tmp_path / "qwen_3.safetensors").config, ours(te_dir).config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "qk_norm"):
        assert getattr(inferred, field) == getattr(saved, field), field
    assert infer_qwen3_config({k: v.shape for k, v in
                               ((k[len("model."):], v) for k, v in sd.items())})["num_hidden_layers"] == 28


def test_too_shallow_model_is_refused(folders, tmp_path):
    sd = {}
    for shard in sorted(folders[0].glob("model-*.safetensors")):
        sd.update(load_safetensors(shard))
    sd = {k: v for k, v in sd.items() if not any(k.startswith(f"model.layers.{i}.") for i in range(20, 28))}
    save_safetensors(sd, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="after layer 27, this Qwen3 has 20 layers"):
        ours(tmp_path / "short.safetensors")


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path)


@torch.no_grad()
def test_llama_cpp_gguf_file(tmp_path):
    """A GGUF conversion of Qwen3 (llama.cpp's names, per-head q/k norms, matrices in Q8_0; Qwen rows are not
    interleaved): hidden states 9, 18, 27 equal transformers' model holding the Q8_0-rounded weights."""
    pytest.importorskip("gguf")
    from transformers import Qwen3Config, Qwen3Model

    from diffsynth.testing.llama_cpp import write_llm_gguf
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=28,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   rope_theta=1e6)).eval()  # (Qwen3's, which a file without config is read with)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(0.1 * torch.randn_like(p))
    rounded = write_llm_gguf(tmp_path / "Qwen3-4B-Q8_0.gguf", model, "qwen3")
    (det,) = detect(str(tmp_path / "Qwen3-4B-Q8_0.gguf"))
    assert (det.family, det.format) == ("qwen3", "gguf")
    got = build(det, torch.float32, "cpu")["text_encoder_qwen3"]
    for key, w in rounded.items():
        model.get_parameter(key).copy_(w)
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    for state, k in zip(got(ids, None, QWEN3_FORMAT.layers), QWEN3_FORMAT.layers):
        torch.testing.assert_close(state, expected[k], rtol=1e-5, atol=1e-6)


def test_comfyui_fp8mixed_file(folders, tmp_path):
    """ComfyUI's `qwen_3_8b_fp8mixed.safetensors` style: the layers' matrices in fp8 with `.weight_scale`,
    `.input_scale` and a `.comfy_quant` marker, the rest bf16; each weight loads as `fp8 * scale`."""
    sd = {}
    for shard in sorted(folders[0].glob("model-*.safetensors")):
        sd.update(load_safetensors(shard))
    out, expected = {}, {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("model.layers."):
            scale, layer = v.abs().max() / 448, k.removesuffix(".weight")
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out.update({layer + ".weight_scale": scale.reshape(()), layer + ".input_scale": torch.ones(()),
                        layer + ".comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)})
            expected[k[len("model."):]] = out[k].float() * scale
        else:
            out[k] = v.to(torch.bfloat16)
    save_safetensors(out, tmp_path / "qwen_3_fp8mixed.safetensors")
    model = ours(tmp_path / "qwen_3_fp8mixed.safetensors")
    built = dict(model.named_parameters())
    assert {k for k in expected if k not in built} == {k for k in expected if k.startswith("layers.27.")}  # not read
    for key, w in expected.items():
        assert key not in built or torch.equal(built[key], w), key
