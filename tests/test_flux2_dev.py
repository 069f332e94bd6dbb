"""FLUX.2 [dev] on tiny random weights: the Mistral-Small-3 prompt encoder against transformers' Mistral3 through
diffusers' Flux2Pipeline prompt embedding (system message, layers 10/20/30, 512 tokens), its loading (both key
layouts, vision tower set aside, layers past 30 not loaded), and Flux2ImagePipeline against diffusers'
Flux2Pipeline (fp32, <= 2/255 per pixel): text-to-image with embedded guidance, editing with a reference image."""
from __future__ import annotations

import json

import pytest
import torch
from test_flux2_pipeline import SIZE, compare, noise, pictures

from diffsynth.loading.registry import build, describe, detect
from diffsynth.models.flux2_text_encoder import (MISTRAL_FORMAT, MISTRAL_SYSTEM_MESSAGE, MISTRAL_VOCAB, chat_text,
                                                 encode_prompt, load_tokenizer, tokenize_chat)
from diffsynth.ops.files import CheckpointError, save_safetensors
from diffsynth.pipelines.flux2_image import Flux2ImagePipeline, ModelConfig
from diffsynth.testing.tiny_flux2 import (TINY_MISTRAL, build_tiny_flux2_dev, mistral_token_ids, write_tiny_mistral3,
                                          write_tiny_mistral_tokenizer)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return build_tiny_flux2_dev(tmp_path_factory.mktemp("dev") / "FLUX.2-dev")


@pytest.fixture(scope="module")
def dev_pipe(dev):
    return ours(dev)


def ours(root) -> Flux2ImagePipeline:
    return Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(root / "text_encoder")), ModelConfig(path=str(root / "transformer")),
        ModelConfig(path=str(root / "vae" / "diffusion_pytorch_model.safetensors"))])


def reference(root):
    """diffusers' Flux2Pipeline; its tokenizer the folder's text tokenizer, since the PixtralProcessor it would load
    needs torchvision (its chat-template call is the same: the processor adds no BOS to a text that has one)."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer
    pipe = diffusers.Flux2Pipeline.from_pretrained(str(root), dtype=torch.float32, tokenizer=None)
    pipe.tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    return pipe


def oracle_tokenizers(folder) -> list:
    """The tokenizers diffusers may hold: the text tokenizer, and the PixtralProcessor where torchvision imports."""
    from transformers import AutoProcessor, AutoTokenizer
    found = [AutoTokenizer.from_pretrained(str(folder))]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return found
    return found + [AutoProcessor.from_pretrained(str(folder))]


def mistral(path):
    (det,) = detect(str(path))
    assert (det.family, det.format, det.components) == ("mistral3", "hf", ("text_encoder_mistral",))
    return build(det, torch.float32, "cpu")["text_encoder_mistral"]


# ----------------------------------------------------------------------------- the prompt encoder

@torch.no_grad()
def test_prompt_embedding_matches_diffusers(dev, one_thread):
    pytest.importorskip("diffusers")
    from diffusers import Flux2Pipeline
    from transformers import Mistral3ForConditionalGeneration
    prompts = ["a red cat on the table", "", "a [IMG] dog"]
    ref_model = Mistral3ForConditionalGeneration.from_pretrained(str(dev / "text_encoder"), dtype=torch.float32).eval()
    got = encode_prompt(load_tokenizer(dev / "tokenizer"), mistral(dev / "text_encoder"), prompts, "cpu",
                        MISTRAL_FORMAT)
    for tokenizer in oracle_tokenizers(dev / "tokenizer"):
        expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(ref_model, tokenizer, prompts, torch.float32, "cpu")
        assert got.shape == expected.shape == (3, 512, 3 * TINY_MISTRAL["hidden_size"])
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        print(f"Mistral prompt embedding vs diffusers ({type(tokenizer).__name__}): rel err {err:.2e}")
        assert err < 1e-5


def test_system_message_is_diffusers_and_in_the_tokens(dev):
    system_messages = pytest.importorskip("diffusers.pipelines.flux2.system_messages")
    assert MISTRAL_SYSTEM_MESSAGE == system_messages.SYSTEM_MESSAGE and "object\nattribution" in MISTRAL_SYSTEM_MESSAGE
    tokenizer = load_tokenizer(dev / "tokenizer")
    assert chat_text(tokenizer, "a cat", MISTRAL_FORMAT) == \
        f"<s>[SYSTEM_PROMPT]{MISTRAL_SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a cat[/INST]"
    input_ids, mask = tokenize_chat(tokenizer, ["a cat"], MISTRAL_FORMAT)
    ids = input_ids[0][mask[0].bool()].tolist()
    from transformers import AutoTokenizer  # (the oracle that reads the ids back)
    text = AutoTokenizer.from_pretrained(str(dev / "tokenizer"), local_files_only=True).decode(ids)
    assert ids.count(mistral_token_ids()["<s>"]) == 1 and ids[0] == mistral_token_ids()["<s>"]  # one BOS, the template's
    assert MISTRAL_SYSTEM_MESSAGE in text and text.endswith("[INST]a cat[/INST]")
    assert input_ids.shape == (1, 512) and input_ids[0, -1] == mistral_token_ids()["<pad>"]


@pytest.mark.parametrize("layout", [4, 5])
def test_loads_both_key_layouts_without_vision_and_late_layers(layout, tmp_path):
    folder = write_tiny_mistral3(tmp_path, layout=layout)
    (det,) = detect(str(folder))
    assert not any("vision" in k or "projector" in k or "lm_head" in k for k in det.refs)
    model = mistral(folder)
    assert model.config.num_hidden_layers == 30 and len(model.layers) == 30  # the 31st on are never read: not loaded
    assert not any(k.startswith(("layers.30.", "norm.")) for k in det.refs)
    assert all(not p.is_meta for p in model.parameters())


def test_single_file_loading_and_its_errors(dev, tmp_path):
    """A single file reads config.json beside it; without one, Mistral-Small-3's head_dim (128) is assumed, which the
    tiny widths refuse loudly. Unknown keys are refused, not dropped; too few layers are named."""
    from safetensors.torch import load_file
    config = json.loads((dev / "text_encoder" / "config.json").read_text())
    sd = {}
    for shard in sorted((dev / "text_encoder").glob("model-*.safetensors")):
        sd.update(load_file(shard))
    save_safetensors(sd, tmp_path / "bare" / "mistral.safetensors")
    with pytest.raises(CheckpointError, match=r"not multiples of Mistral-Small-3's head_dim 128: put the model's config"):
        mistral(tmp_path / "bare" / "mistral.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_safetensors(sd, tmp_path / "mistral.safetensors")
    assert mistral(tmp_path / "mistral.safetensors").config.num_hidden_layers == 30
    save_safetensors({**sd, "language_model.model.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="unexpected.*extra.weight"):
        mistral(tmp_path / "extra.safetensors")
    sd = {k: v for k, v in sd.items() if not any(k.startswith(f"language_model.model.layers.{i}.") for i in range(20, 32))}
    save_safetensors(sd, tmp_path / "short.safetensors")
    config["text_config"]["num_hidden_layers"] = 20
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="after layer 30, this Mistral has 20 layers"):
        mistral(tmp_path / "short.safetensors")


def tiny_bare_mistral(layers: int = 32):
    """transformers' MistralModel at toy width with Mistral-Small-3's vocabulary, head size and norm epsilon (what a
    file without config.json is read with), its final norm perturbed (a norm applied where it should not be shows)."""
    from transformers import MistralConfig, MistralModel
    config = MistralConfig(vocab_size=MISTRAL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=128, rope_theta=1e9,
                           rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = MistralModel(config).eval()
    with torch.no_grad():
        model.norm.weight.add_(torch.randn(32))
    return model


@torch.no_grad()
def assert_same_states(ours, oracle):
    """Hidden states 10, 20 and 30 (those FLUX.2 reads) of `ours` equal `oracle`'s (transformers)."""
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    got = ours(ids, None, MISTRAL_FORMAT.layers)
    expected = oracle(input_ids=ids, output_hidden_states=True).hidden_states
    for state, k in zip(got, MISTRAL_FORMAT.layers):
        torch.testing.assert_close(state, expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [32, 30])
def test_comfyui_language_model_file_whole_and_cut_to_30_layers(layers, tmp_path):
    """ComfyUI's `mistral_3_small_flux2_*.safetensors`: the language model alone under `model.`, Mistral's 131072-token
    vocabulary, its tokenizer as a byte tensor, no config.json, 40 layers or cut to 30. Hidden states 10, 20, 30
    equal the whole model's in transformers, the last one un-normed; the 31st layer on is not even read."""
    whole = tiny_bare_mistral()
    tensors = {f"model.{k}": t for k, t in whole.state_dict().items()
               if not (k.startswith("layers.") and int(k.split(".")[1]) >= layers)}
    tensors["tekken_model"] = torch.frombuffer(bytearray(b'{"vocab": []}'), dtype=torch.uint8)
    save_safetensors(tensors, tmp_path / "mistral_3_small_flux2_bf16.safetensors")
    (det,) = detect(str(tmp_path / "mistral_3_small_flux2_bf16.safetensors"))
    assert (det.family, det.format) == ("mistral3", "lm")
    assert not any(k.startswith(("layers.30.", "norm.")) for k in det.refs)
    ours = build(det, torch.float32, "cpu")["text_encoder_mistral"]
    assert len(ours.layers) == 30
    assert_same_states(ours, whole)
    # another decoder of the same design (a Llama's vocabulary) is not taken for FLUX.2's encoder
    other = {k: t for k, t in tensors.items() if k != "tekken_model"}
    other["model.embed_tokens.weight"] = other["model.embed_tokens.weight"][:32000]
    save_safetensors(other, tmp_path / "llama.safetensors")
    with pytest.raises(CheckpointError, match="not a recognised model file"):
        detect(str(tmp_path / "llama.safetensors"))


def test_llama_cpp_gguf_file(tmp_path):
    """A GGUF conversion (llama.cpp's names, each head's q/k rows interleaved as its converter writes them for
    Llama-type models, matrices in Q8_0) equals transformers' model holding the Q8_0-rounded weights."""
    pytest.importorskip("gguf")
    from diffsynth.testing.llama_cpp import write_llm_gguf
    model = tiny_bare_mistral()
    rounded = write_llm_gguf(tmp_path / "Mistral-Small-3.2-24B-Q8_0.gguf", model, "llama", interleave_head_dim=128)
    (det,) = detect(str(tmp_path / "Mistral-Small-3.2-24B-Q8_0.gguf"))
    assert (det.family, det.format) == ("mistral3", "gguf")
    ours = build(det, torch.float32, "cpu")["text_encoder_mistral"]
    with torch.no_grad():
        for key, w in rounded.items():
            model.get_parameter(key).copy_(w)
    assert_same_states(ours, model)


def test_inspect_names_the_mistral_encoder(dev, capsys):
    from diffsynth.cli import main
    assert main(["inspect", "--json", str(dev / "text_encoder")]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert (model["family"], model["components"]) == ("mistral3", ["text_encoder_mistral"])
    (det,) = detect(str(dev / "transformer"))
    assert describe(det)["architecture"]["guidance_embedder"] is True


# ----------------------------------------------------------------------------- the pipeline

@torch.no_grad()
@pytest.mark.parametrize("edits", [0, 1])
def test_matches_diffusers_flux2_pipeline(dev, dev_pipe, edits, one_thread):
    """Text-to-image and editing with a reference image, embedded guidance 2.5 (to the guidance embedder)."""
    h, w = SIZE
    refs = pictures(3, (64, 96))[:edits] or None
    got = dev_pipe("a red cat", edit_image=refs, edit_image_auto_resize=False, embedded_guidance=2.5, height=h,
                   width=w, seed=7, num_inference_steps=3, output_type="pt")
    expected = reference(dev)(prompt="a red cat", image=refs, height=h, width=w, num_inference_steps=3,
                              guidance_scale=2.5, latents=noise(7, h, w), output_type="pt").images
    print(f"dev, {edits} reference image(s): max diff {compare(got, expected) * 255:.3f}/255")
    other = dev_pipe("a red cat", edit_image=refs, edit_image_auto_resize=False, embedded_guidance=4.0, height=h,
                     width=w, seed=7, num_inference_steps=3, output_type="pt")
    assert (other - got).abs().max() > 1e-3  # the guidance reaches the DiT


def test_the_loaded_encoder_picks_the_prompt_unit(dev_pipe, dev, tmp_path):
    from diffsynth.pipelines.units import active_units
    names = [u.name for u in active_units(dev_pipe, dev_pipe.units)]
    assert "encode_prompt_mistral" in names and "encode_prompt" not in names
    assert dev_pipe.text_encoder_qwen3 is None and dev_pipe.tokenizer.chat_template
    from diffsynth.testing.tiny_flux2 import write_tiny_qwen3
    with pytest.raises(ValueError, match="two FLUX.2 text encoders"):
        Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(dev / "text_encoder")), ModelConfig(path=str(write_tiny_qwen3(tmp_path)))])


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    folder = write_tiny_mistral_tokenizer(tmp_path)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(FileNotFoundError, match="has no chat template"):
        load_tokenizer(folder)


def test_cli_generate_from_dev_folder(dev, dev_pipe, tmp_path, one_thread):
    from PIL import Image

    from diffsynth.cli import main
    out = tmp_path / "dev.png"
    assert main(["generate", "--model-dir", str(dev), "--prompt", "a cat", "--height", "32", "--width", "48",
                 "--steps", "2", "--seed", "4", "--embedded-guidance", "2.5", "--device", "cpu", "--dtype", "fp32",
                 "--output", str(out)]) == 0
    expected = dev_pipe("a cat", height=32, width=48, num_inference_steps=2, seed=4, embedded_guidance=2.5)
    with Image.open(out) as image:
        assert image.convert("RGB").tobytes() == expected.tobytes()
