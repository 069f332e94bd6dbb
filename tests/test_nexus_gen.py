"""Nexus-Gen: the autoregressive pass, the adapters, the decoder files, the pipeline and the example scripts."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import build, detect
from diffsynth.models import nexus_gen as ng
from diffsynth.models.flux_dit import dit_from_bfl
from diffsynth.testing import build_tiny_flux
from diffsynth.testing.tiny import tiny_dit_state_dict
from diffsynth.testing.tiny_qwen import TINY_QWEN, build_tiny_nexus_gen

FLUX_FILES = ("text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nexus_dir(tmp_path_factory):
    return build_tiny_nexus_gen(tmp_path_factory.mktemp("nexus") / "Nexus-GenV2")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "FLUX.1-dev")


def _shards(nexus_dir):
    return sorted(str(p) for p in nexus_dir.glob("model-*.safetensors"))


def _pipe(nexus_dir, flux_dir, decoder):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=_shards(nexus_dir)), ModelConfig(path=str(nexus_dir / decoder)),
        *[ModelConfig(path=str(flux_dir / f)) for f in FLUX_FILES]])


def _image(seed=0, size=(64, 64)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def llm(nexus_dir):
    (det,) = detect(_shards(nexus_dir))
    assert det.family == "nexus-gen-llm"
    return build(det, torch.float32, "cpu")["nexus_gen"]


@pytest.mark.parametrize("reference", [None, 1])
def test_autoregressive_pass_equals_transformers(llm, nexus_dir, reference):
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(nexus_dir), dtype=torch.float32).eval()
    extra = {k: v for p in nexus_dir.glob("model-*.safetensors") for k, v in load_file(p).items()
             if k in ("vision_head.weight", "image_prefill_embeds.weight")}
    ref_image = None if reference is None else _image(reference)
    out = ng.nexus_gen_embeddings(llm, llm.processor, "a red cat", ref_image, torch.device("cpu"), torch.float32)
    assert out.embeds.shape == (ng.NUM_IMAGE_TOKENS, TINY_QWEN["hidden_size"])
    # independently: transformers' own modules, the placeholder's slots holding the learned prefill embeddings
    proc = llm.processor
    images = [ng.bound_image(ref_image, proc)] if ref_image is not None else []
    images.append(Image.new("RGB", (252, 252), (255, 255, 255)))
    user = "a red cat" if ref_image is None else "<|vision_start|><|image_pad|><|vision_end|> a red cat"
    answer = "Here is an image based on the description: " if ref_image is None else "Here is the image: "
    text = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n")
    vision = proc.images(images)
    ids = torch.tensor([proc.ids(proc.expand_image_tokens(text, vision["image_grid_thw"]))])
    with torch.no_grad():
        feats = torch.cat(hf.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"]).pooler_output)
        feats[-81:] = extra["image_prefill_embeds.weight"]
        slots = ids == hf.config.image_token_id
        embeds = hf.model.get_input_embeddings()(ids).masked_scatter(slots[..., None], feats)
        pos, _ = hf.model.get_rope_index(input_ids=ids, mm_token_type_ids=slots.int(),
                                         image_grid_thw=vision["image_grid_thw"])
        hidden = hf.model.language_model(inputs_embeds=embeds, position_ids=pos).last_hidden_state[0]
    where = slots[0].nonzero()[-81:, 0]
    want = hidden[where - 1] @ extra["vision_head.weight"].T
    torch.testing.assert_close(out.embeds, want, rtol=1e-5, atol=1e-5)
    if ref_image is not None:
        torch.testing.assert_close(out.ref_embeds, feats[:-81])


def test_merger_equals_a_transformers_decoder_layer():
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, Qwen2_5_VLRotaryEmbedding
    torch.manual_seed(0)
    c = ng.MergerConfig(hidden=48, heads=4, kv_heads=2, intermediate=96, out_dim=32)
    merger = ng.NexusGenMerger(c)
    for p in merger.parameters():
        p.data.normal_(0, 0.2)
    cfg = Qwen2_5_VLTextConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                               rope_scaling={"type": "mrope", "mrope_section": list(c.mrope_section)},
                               rope_theta=c.theta, vocab_size=10)
    cfg._attn_implementation = "eager"
    layer = Qwen2_5_VLDecoderLayer(cfg, 0).eval()
    layer.load_state_dict(merger.layers[0].state_dict())
    layer.self_attn.is_causal = False
    x, ref = torch.randn(1, 81, 48), torch.randn(1, 4, 48)
    grid, ref_grid = torch.tensor([1, 18, 18]), torch.tensor([1, 4, 4])
    ours = merger(x, grid, ref, ref_grid)
    # positions: rows/columns of the merged grid scaled by 72 / (unmerged size)
    def pos(h, n):
        r = torch.arange(h // 2).float()
        return torch.stack([torch.zeros(n), r.repeat_interleave(h // 2) * 72 / h, r.repeat(h // 2) * 72 / h])
    positions = torch.cat([pos(18, 81), pos(4, 4)], 1)[:, None]  # (3, 1, L)
    h = torch.cat([x, ref], 1)
    cos_sin = Qwen2_5_VLRotaryEmbedding(cfg)(h, positions)
    with torch.no_grad():
        h = layer(h, attention_mask=None, position_embeddings=cos_sin, position_ids=None)
        h = h[0] if isinstance(h, tuple) else h
        proj = merger.projector
        rms = lambda v, w: w * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
        y = rms(h, proj[0].weight) @ proj[1].weight.T + proj[1].bias
        y = F.silu(rms(y, proj[2].weight)) @ proj[4].weight.T + proj[4].bias
        want = rms(y, proj[5].weight)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_editing_text_ids():
    ids = ng.editing_text_ids(8, 12, torch.tensor([1, 18, 18]), torch.tensor([1, 4, 6]), batch=2)
    assert ids.shape == (2, 81 + 6, 3)
    assert not ids[:, :81, 0].any() and bool((ids[:, 81:, 0] == 1).all())
    assert ids[0, 9, 1].item() == pytest.approx(8 / 18) and ids[0, 1, 2].item() == pytest.approx(12 / 18)
    assert ids[0, 81 + 3, 1].item() == pytest.approx(8 / 4) and ids[0, 81 + 1, 2].item() == pytest.approx(12 / 6)


@pytest.mark.parametrize("decoder, adapter", [("generation_decoder.bin", "nexus_gen_generation_adapter"),
                                              ("edit_decoder.bin", "nexus_gen_editing_adapter")])
def test_decoder_files_hold_dit_and_adapter(nexus_dir, decoder, adapter):
    (det,) = detect(str(nexus_dir / decoder))
    assert (det.family, det.components) == ("nexus-gen-decoder", ("dit", adapter))
    models = build(det, torch.float32, "cpu")
    want = dit_from_bfl(tiny_dit_state_dict(0))
    for k, v in models["dit"].state_dict().items():
        assert torch.equal(v, want[k]), k
    saved = torch.load(nexus_dir / decoder, weights_only=True)
    prefix = "" if adapter.endswith("generation_adapter") else "embedding_merger."
    for k, v in models[adapter].state_dict().items():
        assert torch.equal(v, saved[prefix + k]), k
    if prefix == "":
        x = torch.randn(2, 5, TINY_QWEN["hidden_size"])
        a = saved
        y = F.layer_norm(F.relu(F.layer_norm(x @ a["adapter.0.weight"].T + a["adapter.0.bias"], (32,),
                                             a["adapter.1.weight"], a["adapter.1.bias"])) @ a["adapter.3.weight"].T
                         + a["adapter.3.bias"], (32,), a["adapter.4.weight"], a["adapter.4.bias"])
        torch.testing.assert_close(models[adapter](x), y)


def test_pipeline_generation_and_editing(nexus_dir, flux_dir):
    kw = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, seed=0, t5_sequence_length=16,
              output_type="latent", progress_bar_cmd=lambda x: x)
    gen = _pipe(nexus_dir, flux_dir, "generation_decoder.bin")
    a = gen(**kw)
    # The negative branch keeps the CLIP/T5 encoding (T5 tokens of another length -> two DiT calls): what the same
    # DiT without Nexus-Gen's Qwen gives for the negative prompt. One Euler step is linear in the velocity, so
    # CFG = neg + s * (pos - neg) of the two single-branch latents.
    plain = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(nexus_dir / "generation_decoder.bin")), *[ModelConfig(path=str(flux_dir / f))
                                                                       for f in FLUX_FILES]])
    one = {**kw, "num_inference_steps": 1}
    pos, neg, guided = gen(**one), plain(**{**one, "prompt": ""}), gen(**one, cfg_scale=2.0)
    torch.testing.assert_close(guided, neg + 2.0 * (pos - neg), rtol=1e-5, atol=1e-5)
    assert (pos - neg).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="edit_decoder.bin"):
        gen(**kw, nexus_gen_reference_image=_image())
    edit = _pipe(nexus_dir, flux_dir, "edit_decoder.bin")
    b = edit(**kw, nexus_gen_reference_image=_image())
    c = edit(**kw, nexus_gen_reference_image=_image(3))
    assert a.shape == b.shape == (1, 16, 4, 4) and not torch.allclose(b, c)
    with pytest.raises(RuntimeError, match="generation_decoder.bin"):
        edit(**kw)


def test_processor_location(nexus_dir, tmp_path, monkeypatch):
    """Beside the weights, else their processor/ subfolder, else where nexus_gen_processor_config says
    (2.0's scripts pass the repository id positionally: ModelConfig("owner/name", origin_file_pattern=...))."""
    from pathlib import Path
    from diffsynth.models.qwen_vl import QwenVLProcessor
    seen = []
    original = QwenVLProcessor.from_folder.__func__
    monkeypatch.setattr(QwenVLProcessor, "from_folder", classmethod(lambda cls, f: seen.append(Path(f)) or original(cls, f)))
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for p in nexus_dir.iterdir():
        if p.name.startswith("model") or p.name in ("config.json", "processor"):
            (weights_only / p.name).symlink_to(p)
    load = lambda folder, **kw: FluxImagePipeline.from_pretrained(  # noqa: E731
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=_shards(folder))], **kw)
    assert load(weights_only).nexus_gen.processor is not None and seen[-1] == weights_only / "processor"
    load(weights_only, nexus_gen_processor_config=str(nexus_dir))
    assert seen[-1] == nexus_dir
    (tmp_path / "models/DiffSynth-Studio").mkdir(parents=True)
    (tmp_path / "models/DiffSynth-Studio/Nexus-GenV2").symlink_to(nexus_dir)
    monkeypatch.chdir(tmp_path)
    load(nexus_dir, nexus_gen_processor_config=ModelConfig("DiffSynth-Studio/Nexus-GenV2", origin_file_pattern="processor"))
    assert seen[-1].resolve() == (nexus_dir / "processor").resolve()
    with pytest.raises(FileNotFoundError, match="lacks its processor files"):
        load(nexus_dir, nexus_gen_processor_config=str(tmp_path))


# ----------------------------------------------------------------------------- examples and training

@pytest.fixture
def example_models(nexus_dir, flux_dir, monkeypatch, tmp_path):
    warnings.simplefilter("ignore")
    (tmp_path / "data/example_image_dataset/nexus_gen").mkdir(parents=True)
    _image(7).save(tmp_path / "data/example_image_dataset/nexus_gen/image_1.png")
    return {"DiffSynth-Studio/Nexus-GenV2": nexus_dir, "black-forest-labs/FLUX.1-dev": flux_dir}


@pytest.mark.parametrize("script, output", [("model_inference/Nexus-Gen-Editing.py", "NexusGen-Edit.jpg"),
                                            ("model_inference/Nexus-Gen-Generation.py", "NexusGen-Generation.jpg"),
                                            ("model_inference_low_vram/Nexus-Gen-Editing.py",
                                             "NexusGen-Edit_low_vram.jpg"),
                                            ("model_inference_low_vram/Nexus-Gen-Generation.py",
                                             "NexusGen-Generation_low_vram.jpg")])
def test_inference_examples(script, output, tmp_path, monkeypatch, example_models):
    from example_harness import run_example
    run_example(script, tmp_path, monkeypatch, example_models)
    assert (tmp_path / output).is_file()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_validate_examples(kind, tmp_path, monkeypatch, example_models):
    from diffsynth.ops.files import save_safetensors
    from example_harness import run_example
    out = tmp_path / f"models/train/FLUX.1-NexusGen-Edit_{kind}"
    out.mkdir(parents=True)
    if kind == "full":
        save_safetensors(dit_from_bfl(tiny_dit_state_dict(2)), out / "epoch-0.safetensors")
    else:
        save_safetensors({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 32) * 0.01,
                          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 2) * 0.01},
                         out / "epoch-4.safetensors")
    run_example(f"model_training/validate_{kind}/Nexus-Gen.py", tmp_path, monkeypatch, example_models)
    assert (tmp_path / f"NexusGen-Edit_{kind}.jpg").is_file()


TRAINED = {"lora": ["--lora_base_model", "dit", "--lora_target_modules", "a_to_qkv,to_qkv_mlp", "--lora_rank", "4"],
           "full": ["--trainable_models", "dit"]}


@pytest.mark.parametrize("kind", TRAINED)
def test_training_step_with_the_reference_column(kind, nexus_dir, flux_dir, tmp_path):
    from diffsynth.training import build_parser, train
    data = tmp_path / "data"
    data.mkdir()
    _image(5).save(data / "edited.png")
    _image(6).save(data / "ref.png")
    (data / "metadata.csv").write_text("image,prompt,nexus_gen_reference_image\nedited.png,add glasses,ref.png\n")
    paths = [_shards(nexus_dir), str(nexus_dir / "edit_decoder.bin"), *[str(flux_dir / f) for f in FLUX_FILES]]
    args = build_parser().parse_args([
        "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
        "--data_file_keys", "image,nexus_gen_reference_image", "--extra_inputs", "nexus_gen_reference_image",
        "--height", "32", "--width", "32", "--model_paths", json.dumps(paths), "--t5_sequence_length", "16",
        "--output_path", str(tmp_path / "out"), *TRAINED[kind], "--remove_prefix_in_ckpt", "pipe.dit.",
        "--max_steps", "1", "--seed", "0", "--report_to", "none"])
    out = train(args)
    assert out["steps"] == 1 and math.isfinite(out["losses"][0]) and out["files"]
