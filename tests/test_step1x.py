"""Step1X-Edit: Qwen2.5-VL loading and prompt encoding, the connector, the single file, the pipeline."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.loading.registry import build, detect
from diffsynth.models import step1x as s1
from diffsynth.models.qwen_vl import hidden_states, right_pad
from diffsynth.ops.files import CheckpointError
from diffsynth.testing.tiny import tiny_dit_state_dict
from diffsynth.testing.tiny_qwen import build_tiny_qwen_vl, build_tiny_step1x, tiny_connector_state_dict

SMALL_PIXELS = 28 * 28 * 4  # 4 vision tokens: the tests that run whole pipelines use this


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-7B-Instruct")


@pytest.fixture(scope="module")
def step1x_dir(tmp_path_factory):
    return build_tiny_step1x(tmp_path_factory.mktemp("step1x") / "Step1X-Edit")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    (det,) = detect(str(qwen_dir))
    return build(det, torch.float32, "cpu")["qwenvl"]


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()


@pytest.fixture
def small_images(monkeypatch):
    monkeypatch.setattr(s1, "MIN_PIXELS", SMALL_PIXELS)
    monkeypatch.setattr(s1, "MAX_PIXELS", SMALL_PIXELS)


def _pipe(qwen_dir, step1x_dir, **kw):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(qwen_dir), **kw), ModelConfig(path=str(step1x_dir / "step1x-edit-i1258.safetensors")),
        ModelConfig(path=str(step1x_dir / "vae.safetensors"))])


def _image(seed=0, size=(64, 64)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


# ----------------------------------------------------------------------------- Qwen2.5-VL

@pytest.mark.parametrize("layout", [4, 5])
def test_qwen_hidden_states_equal_transformers(tmp_path, hf_qwen, layout):
    folder = build_tiny_qwen_vl(tmp_path / "q", transformers_layout=layout)
    (det,) = detect(str(folder))
    assert (det.family, det.components) == ("qwen2.5-vl", ("qwenvl",))
    model = build(det, torch.float32, "cpu")["qwenvl"]
    proc = model.processor
    text = proc.chat([{"type": "image", "image": _image()}, {"type": "text", "text": "a red cat"}])
    vision = proc.images([_image()], SMALL_PIXELS, SMALL_PIXELS)
    ids, mask = right_pad([proc.ids(proc.expand_image_tokens(text, vision["image_grid_thw"]))], 0)
    ours = hidden_states(model, ids, mask, vision["pixel_values"], vision["image_grid_thw"], torch.device("cpu"))
    with torch.no_grad():
        ref = hf_qwen(input_ids=ids, attention_mask=mask, pixel_values=vision["pixel_values"],
                      image_grid_thw=vision["image_grid_thw"], mm_token_type_ids=(ids == hf_qwen.config.image_token_id).int(),
                      output_hidden_states=True).hidden_states[-1]
    assert ours.shape == ref.shape and ids.shape[1] > 20
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_qwen_folder_errors(tmp_path, qwen_dir):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(qwen_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        build(detect(str(bare))[0], torch.float32, "cpu")
    (bare / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        from diffsynth.models.qwen_vl import load_qwen_vl
        load_qwen_vl({}, None, "x")
    with pytest.raises(FileNotFoundError):
        ModelConfig(path=str(tmp_path / "missing")).resolve()


# ----------------------------------------------------------------------------- prompt tokens

def test_split_quoted_follows_the_rule():
    head = "x" * s1.QUOTE_SCAN_START
    assert s1.split_quoted('say "ab" ok') == ['say "ab" ok']  # before the scan start: plain text
    text = head + 'write “Hi” and \'yo\''
    assert s1.split_quoted(text) == [head + 'write "', "“H”", "“i”", '" and "', "“y”", "“o”", '"']


def test_quoted_ids_tokenise_each_character(qwen):
    proc = qwen.processor
    text = "x" * s1.QUOTE_SCAN_START + 'a "cat" b'
    expected = proc.ids("x" * s1.QUOTE_SCAN_START + 'a "') + [proc.ids(c)[0] for c in "cat"] + proc.ids('" b')
    assert s1.quoted_ids(proc, text) == expected
    assert proc.ids("“c”") == [proc.ids("“")[0], proc.ids("c")[0], proc.ids("”")[0]]


def test_step1x_inputs_join_plain_and_quoted_tokens(qwen, small_images):
    proc = qwen.processor
    x = s1.step1x_inputs(proc, 'paint "OK"', _image())
    end = proc.token_id("<|vision_end|>")
    pad = proc.token_id("<|image_pad|>")
    assert x.ids.count(pad) == int(x.grid_thw.prod()) // 4 == 4
    quoted = [proc.ids(c)[0] for c in "OK"]
    expected = proc.ids('<|vision_end|>paint "') + quoted + proc.ids('"<|im_end|>\n<|im_start|>assistant\n')
    assert x.ids[x.ids.index(end):] == expected


# ----------------------------------------------------------------------------- Qwen embeddings

def test_encode_prompts_is_transformers_hidden_states_after_the_prefix(qwen, hf_qwen, small_images, monkeypatch):
    monkeypatch.setattr(s1, "PREFIX_TOKENS", 200)
    prompts, image = ["a red cat", 'write "hi"'], _image(1)
    emb, mask = s1.encode_step1x_prompts(qwen, qwen.processor, prompts, image, torch.device("cpu"), torch.float32)
    assert emb.shape == (2, s1.MAX_TOKENS, 48) and mask.shape == (2, s1.MAX_TOKENS)
    for i, p in enumerate(prompts):  # one prompt at a time, through transformers' own model
        x = s1.step1x_inputs(qwen.processor, p, image)
        ids = torch.tensor([x.ids])
        with torch.no_grad():
            ref = hf_qwen(input_ids=ids, attention_mask=(ids > 0).long(), pixel_values=x.pixel_values,
                          image_grid_thw=x.grid_thw, mm_token_type_ids=(ids == hf_qwen.config.image_token_id).int(),
                          output_hidden_states=True).hidden_states[-1][0, 200:]
        n = ref.shape[0]
        assert int(mask[i].sum()) == n and not mask[i, n:].any()
        torch.testing.assert_close(emb[i, :n], ref, rtol=1e-5, atol=1e-5)
        assert not emb[i, n:].any()


def test_long_prompt_is_truncated_with_a_warning(qwen, small_images, monkeypatch):
    monkeypatch.setattr(s1, "MAX_TOKENS", 32)
    with pytest.warns(UserWarning, match="only the first 32"):
        emb, mask = s1.encode_step1x_prompts(qwen, qwen.processor, ["cat " * 400], _image(), torch.device("cpu"),
                                             torch.float32)
    assert emb.shape[1] == 32 and bool(mask.all())


# ----------------------------------------------------------------------------- connector

def _reference_connector(sd, x, t, mask, heads):
    """Straight from the formulas, with the file's tensors (no module of ours)."""
    lin = lambda v, n: v @ sd[n + ".weight"].T + sd[n + ".bias"]  # noqa: E731
    m = mask.float()[..., None]
    mean = (x * m).sum(1) / m.sum(1)
    pooled = lin(mean * (1 + sd["scale_factor"]), "global_proj_out")
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c = lin(F.silu(lin(temb, "S.t_embedder.mlp.0")), "S.t_embedder.mlp.2")
    c = c + lin(F.silu(lin(mean, "S.c_embedder.linear_1")), "S.c_embedder.linear_2")
    h = lin(x, "S.input_embedder")
    b, n, d = h.shape
    allowed = mask.bool()[:, None, :] & mask.bool()[:, :, None]
    allowed[:, :, 0] = True
    for i in range(2):
        p = f"S.individual_token_refiner.blocks.{i}"
        gate = lin(F.silu(c), p + ".adaLN_modulation.1")
        g1, g2 = gate[:, None, :d], gate[:, None, d:]
        y = F.layer_norm(h, (d,), sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], 1e-6)
        q, k, v = lin(y, p + ".self_attn_qkv").view(b, n, 3, heads, d // heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, d)
        h = h + lin(att, p + ".self_attn_proj") * g1
        y = F.layer_norm(h, (d,), sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], 1e-6)
        h = h + lin(F.silu(lin(y, p + ".mlp.fc1")), p + ".mlp.fc2") * g2
    return h, pooled


def test_connector_matches_the_formulas():
    sd = tiny_connector_state_dict(seed=3)
    connector = s1.Step1XConnector(s1.infer_connector_config(sd))
    connector.load_state_dict(sd)
    x = torch.randn(2, 10, 48)
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    t = torch.tensor([0.9, 0.25])
    emb, pooled = connector(x, t, mask)
    ref_emb, ref_pooled = _reference_connector(sd, x, t, mask, heads=2)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    assert connector.config.heads == 2 and s1.infer_connector_config(
        {**sd, "S.input_embedder.weight": torch.empty(4096, 3584)}).heads == 32


# ----------------------------------------------------------------------------- the single file

def test_step1x_file_holds_dit_and_connector(step1x_dir, tmp_path):
    (det,) = detect(str(step1x_dir / "step1x-edit-i1258.safetensors"))
    assert (det.family, det.components) == ("step1x", ("dit", "step1x_connector"))
    models = build(det, torch.float32, "cpu")
    from diffsynth.ops.files import save_safetensors
    save_safetensors(tiny_dit_state_dict(0, guidance=False), tmp_path / "dit.safetensors")
    (plain,) = detect(str(tmp_path / "dit.safetensors"))
    dit = build(plain, torch.float32, "cpu")["dit"]
    for k, v in dit.state_dict().items():
        assert torch.equal(models["dit"].state_dict()[k], v), k
    sd = tiny_connector_state_dict(0)
    for k, v in models["step1x_connector"].state_dict().items():
        assert torch.equal(v, sd[k]), k


# ----------------------------------------------------------------------------- pipeline

def test_step_unit_appends_reference_tokens_on_the_target_grid(qwen_dir, step1x_dir):
    from diffsynth.models.flux_dit import image_ids, patchify
    from diffsynth.pipelines.denoise import DiTCall
    from diffsynth.pipelines.variants.step1x import step1x_step
    pipe = _pipe(qwen_dir, step1x_dir)
    latents, ref = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    call = DiTCall(latents, torch.tensor([0.5]), None, None, None, image_ids(8, 8, 1))
    emb, mask = torch.randn(1, 12, 48), torch.ones(1, 12, dtype=torch.long)
    step1x_step.fn(pipe.in_loop_models(), call, 0, step1x_llm_embedding=emb, step1x_mask=mask,
                   step1x_reference_latents=ref)
    want_emb, want_pooled = pipe.step1x_connector(emb, torch.tensor([0.5]), mask)
    torch.testing.assert_close(call.prompt_emb, want_emb)
    torch.testing.assert_close(call.pooled_prompt_emb, want_pooled)
    assert not call.text_ids.any() and call.text_ids.shape == (1, 12, 3)
    (tokens, ids), = call.ref
    assert torch.equal(tokens, patchify(ref)) and torch.equal(ids, call.image_ids) and not ids[..., 0].any()


def test_pipeline_runs_batched_cfg_like_two_passes(qwen_dir, step1x_dir, small_images):
    pipe = _pipe(qwen_dir, step1x_dir)
    kw = dict(prompt='write "A"', step1x_reference_image=_image(2), height=32, width=32, cfg_scale=6,
              num_inference_steps=2, seed=0, output_type="latent", progress_bar_cmd=lambda x: x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer's prefix runs over the 640-token budget
        batched = pipe(**kw)
        two = pipe(**kw, batch_cfg=False)
        # one Euler step is linear in the velocity: CFG = neg + s * (pos - neg) of the single-prompt latents
        one = {**kw, "num_inference_steps": 1}
        guided, pos = pipe(**one), pipe(**{**one, "cfg_scale": 1.0})
        neg = pipe(**{**one, "prompt": "", "cfg_scale": 1.0})
    torch.testing.assert_close(batched, two, rtol=1e-4, atol=1e-4)
    assert batched.shape == (1, 16, 4, 4)
    torch.testing.assert_close(guided, neg + 6 * (pos - neg), rtol=1e-5, atol=1e-5)
    assert (pos - neg).abs().max() > 1e-4  # small on the tiny random Qwen, and 6x that in the CFG result


def test_pipeline_bad_inputs(qwen_dir, step1x_dir, small_images):
    pipe = _pipe(qwen_dir, step1x_dir)
    kw = dict(prompt="x", height=32, width=32, num_inference_steps=1, output_type="latent",
              progress_bar_cmd=lambda x: x)
    with pytest.raises(ValueError, match="step1x_reference_image"):
        pipe(**kw)
    with pytest.warns(UserWarning, match="resized to the target 32x32"):
        pipe(**kw, step1x_reference_image=_image(size=(48, 40)))
    pipe.qwenvl = None
    with pytest.raises(RuntimeError, match="Qwen2.5-VL"):
        pipe(**kw, step1x_reference_image=_image())


def test_qwen_in_fp8_storage_with_vram_management(qwen_dir, step1x_dir, small_images):
    ref = _pipe(qwen_dir, step1x_dir)
    pipe = _pipe(qwen_dir, step1x_dir, offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
    assert next(p for n, p in pipe.qwenvl.named_parameters() if "q_proj.weight" in n).dtype == torch.float8_e4m3fn
    pipe.enable_vram_management(vram_limit=0)
    image = _image(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, _ = s1.encode_step1x_prompts(ref.qwenvl, ref.qwenvl.processor, ["a cat"], image, torch.device("cpu"),
                                        torch.float32)
        b, _ = s1.encode_step1x_prompts(pipe.qwenvl, pipe.qwenvl.processor, ["a cat"], image,
                                        torch.device("cpu"), torch.float32)
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.98, cos
    assert any("qwenvl" in group for group in pipe.vram_plans)


# ----------------------------------------------------------------------------- training and examples

def _write_step1x_data(root):
    root.mkdir(parents=True, exist_ok=True)
    _image(5, (64, 64)).save(root / "edited.png")
    _image(6, (64, 64)).save(root / "2.jpg")
    (root / "metadata_step1x.csv").write_text('image,prompt,step1x_reference_image\nedited.png,"make it red",2.jpg\n')
    return root


TRAINED = {"lora": ["--lora_base_model", "dit", "--lora_target_modules", "a_to_qkv,to_qkv_mlp", "--lora_rank", "4"],
           "full": ["--trainable_models", "dit"]}


@pytest.mark.parametrize("kind", TRAINED)
def test_training_step_reads_the_reference_column(kind, qwen_dir, step1x_dir, tmp_path, small_images):
    from diffsynth.training import build_parser, train
    data = _write_step1x_data(tmp_path / "data")
    paths = [str(qwen_dir), str(step1x_dir / "step1x-edit-i1258.safetensors"), str(step1x_dir / "vae.safetensors")]
    args = build_parser().parse_args([
        "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata_step1x.csv"),
        "--data_file_keys", "image,step1x_reference_image", "--extra_inputs", "step1x_reference_image",
        "--height", "32", "--width", "32", "--model_paths", __import__("json").dumps(paths),
        "--output_path", str(tmp_path / "out"), *TRAINED[kind], "--remove_prefix_in_ckpt", "pipe.dit.",
        "--max_steps", "1", "--seed", "0", "--report_to", "none"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(args)
    assert out["steps"] == 1 and math.isfinite(out["losses"][0]) and out["files"]


@pytest.fixture
def example_models(qwen_dir, step1x_dir, monkeypatch, small_images):
    original = FluxImagePipeline.__call__

    def on_cpu(self, *args, **kwargs):  # the scripts draw their noise on "cuda"
        kwargs["rand_device"] = "cpu"
        return original(self, *args, **kwargs)
    monkeypatch.setattr(FluxImagePipeline, "__call__", on_cpu)
    warnings.simplefilter("ignore")
    return {"Qwen/Qwen2.5-VL-7B-Instruct": qwen_dir, "stepfun-ai/Step1X-Edit": step1x_dir}


@pytest.mark.parametrize("script", ["model_inference/Step1X-Edit.py", "model_inference_low_vram/Step1X-Edit.py"])
def test_inference_examples(script, tmp_path, monkeypatch, example_models):
    from example_harness import run_example
    run_example(script, tmp_path, monkeypatch, example_models)
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"image_1.jpg", "image_2.jpg"}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_validate_examples(kind, tmp_path, monkeypatch, example_models):
    from diffsynth.ops.files import save_safetensors
    from example_harness import run_example
    _write_step1x_data(tmp_path / "data/example_image_dataset")
    out = tmp_path / f"models/train/Step1X-Edit_{kind}"
    out.mkdir(parents=True)
    if kind == "full":
        from diffsynth.models.flux_dit import dit_from_bfl
        save_safetensors(dit_from_bfl(tiny_dit_state_dict(1, guidance=False)), out / "epoch-0.safetensors")
    else:
        a = torch.randn(2, 32) * 0.01
        save_safetensors({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
                          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 2) * 0.01},
                         out / "epoch-4.safetensors")
    run_example(f"model_training/validate_{kind}/Step1X-Edit.py", tmp_path, monkeypatch, example_models)
    assert (tmp_path / f"image_Step1X-Edit_{kind}.jpg").is_file()


def test_step1x_processor_config(qwen_dir, tmp_path):
    """`step1x_processor_config` (2.0's argument) names the Qwen2.5-VL processor's folder."""
    load = lambda where: FluxImagePipeline.from_pretrained(  # noqa: E731
        torch_dtype=torch.float32, device="cpu", model_configs=[ModelConfig(path=str(qwen_dir))],
        step1x_processor_config=where)
    from transformers import AutoTokenizer
    processor = load(ModelConfig(path=str(qwen_dir))).qwenvl.processor
    text = 'write "A" on a red sign'
    assert processor.ids(text) == AutoTokenizer.from_pretrained(str(qwen_dir))(text).input_ids
    with pytest.raises(FileNotFoundError, match="lacks its processor files"):
        load(str(tmp_path))
    with pytest.raises(TypeError, match="a folder or a ModelConfig"):
        load(3)


def test_the_processor_template_wins_over_the_tokenizers(qwen_dir, tmp_path):
    """As transformers' processors: chat_template.json (or .jinja) before tokenizer_config.json's template."""
    import json
    import shutil

    from diffsynth.models.qwen_vl import QwenVLProcessor
    folder = tmp_path / "q"
    shutil.copytree(qwen_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "tokenizer's template"}))
    content = [{"type": "image", "image": _image()}, {"type": "text", "text": "a cat"}]
    expected = QwenVLProcessor.from_folder(qwen_dir).chat(content)
    assert "<|vision_start|>" in expected and QwenVLProcessor.from_folder(folder).chat(content) == expected
    (folder / "chat_template.json").unlink()
    assert QwenVLProcessor.from_folder(folder).chat(content) == "tokenizer's template"
    (folder / "chat_template.jinja").write_text("jinja {{ messages[0].role }}")
    assert QwenVLProcessor.from_folder(folder).chat(content) == "jinja user"


def test_step1x_generation_does_not_import_transformers(qwen_dir, step1x_dir):
    """The Qwen2.5-VL model, tokenizer and image processor are this project's: a fresh process loads the Step1X-Edit
    models, edits an image and never imports transformers (about 2 s of its start-up) or torch._dynamo."""
    import subprocess
    import sys
    code = f"""
import sys, torch
from PIL import Image
from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.models import step1x
step1x.MIN_PIXELS = step1x.MAX_PIXELS = {SMALL_PIXELS}
pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
    ModelConfig(path={str(qwen_dir)!r}), ModelConfig(path={str(step1x_dir / "step1x-edit-i1258.safetensors")!r}),
    ModelConfig(path={str(step1x_dir / "vae.safetensors")!r})])
image = pipe("a cat", step1x_reference_image=Image.new("RGB", (64, 64), (200, 30, 30)), height=32, width=32,
             num_inference_steps=1, seed=0, progress_bar_cmd=lambda x: x)
assert image.size == (32, 32)
bad = [m for m in ("transformers", "torch._dynamo") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, timeout=120)


def test_qwen_config_and_input_errors(qwen):
    import json

    from diffsynth.models.qwen_vl import QwenVLConfig
    from diffsynth.testing.tiny_qwen import tiny_qwen_config
    config = tiny_qwen_config()
    assert QwenVLConfig.from_dict(json.loads(json.dumps(config)), "q").text.mrope_section == tuple(
        config["rope_scaling"]["mrope_section"])
    with pytest.raises(CheckpointError, match="no mrope_section"):
        QwenVLConfig.from_dict({**config, "rope_scaling": None}, "q")
    with pytest.raises(CheckpointError, match="q: config.json: .*hidden_act 'gelu'"):
        QwenVLConfig.from_dict({**config, "vision_config": {**config["vision_config"], "hidden_act": "gelu"}}, "q")
    proc = qwen.processor
    vision = proc.images([_image()], SMALL_PIXELS, SMALL_PIXELS)
    text = proc.chat([{"type": "image", "image": _image()}, {"type": "text", "text": "a cat"}])
    ids = torch.tensor([proc.ids(text)])  # one placeholder, not the 4 the image's grid gives
    with pytest.raises(ValueError, match="1 image placeholder tokens for 4 image embeddings"):
        qwen(ids, None, vision["pixel_values"], vision["image_grid_thw"])
