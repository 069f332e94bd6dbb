"""Insert-Anything (DiffSynth-Studio 2.0): the diptych and the paste-back against a computation written out here
from DiffSynth-Studio's algorithm, the pipeline's wiring into FLUX.1-Fill + Redux, and the four example scripts
(inference, low-VRAM, one-step LoRA training, validation) on tiny models."""
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.ops.files import save_safetensors
from diffsynth.pipelines.variants import insert_anything as ia
from diffsynth.testing.tiny_image import build_tiny_redux, build_tiny_variant
from example_harness import EXAMPLES, link_model, run_example, train_script_one_step

cv2 = pytest.importorskip("cv2", reason="Insert-Anything needs OpenCV (pip install 'diffsynth-flux[insertanything]')")
pytestmark = pytest.mark.usefixtures("cpu_noise")
SIDE = 32  # the diptych halves in these tests (768 in real use)


# ----------------------------------------------------------------------------- the reference computation

def studio_box(mask):
    if mask.sum() < 10:
        return 0, mask.shape[0], 0, mask.shape[1]
    ys, xs = np.where(mask)
    return ys.min(), ys.max(), xs.min(), xs.max()


def studio_expand(shape, box):
    y1, y2, x1, x2 = box
    H, W = shape[:2]
    r1 = (y2 - y1 + 1) * (x2 - x1 + 1) / (H * W)
    r2 = 0.1 + 0.9 / 0.6 * r1 if r1 < 0.6 else 1
    ratio = math.sqrt(r2 / r1)
    xc, yc, h, w = 0.5 * (x1 + x2), 0.5 * (y1 + y2), ratio * (y2 - y1 + 1), ratio * (x2 - x1 + 1)
    return max(0, int(yc - h * 0.5)), min(H, int(yc + h * 0.5)), max(0, int(xc - w * 0.5)), min(W, int(xc + w * 0.5))


def studio_square(shape, box):
    y1, y2, x1, x2 = box
    cx, cy, h, w = (x1 + x2) // 2, (y1 + y2) // 2, y2 - y1, x2 - x1
    if h >= w:
        x1, x2 = cx - h // 2, cx + h // 2
    else:
        y1, y2 = cy - w // 2, cy + w // 2
    return max(0, y1), min(shape[0], y2), max(0, x1), min(shape[1], x2)


def studio_pad(a, value):
    H, W = a.shape[:2]
    if H == W:
        return a
    p1 = int(abs(H - W) / 2)
    p2 = abs(H - W) - p1
    pad = [(0, 0), (p1, p2)] if H > W else [(p1, p2), (0, 0)]
    return np.pad(a, pad + [(0, 0)] * (a.ndim - 2), "constant", constant_values=value)


def studio_prepare(source, source_mask, ref, ref_mask, size):
    ref, tar = np.array(ref.convert("RGB")), np.array(source.convert("RGB"))
    rm = (np.array(ref_mask.convert("L")) > 128).astype(np.uint8)
    tm = (np.array(source_mask.convert("L")) > 128).astype(np.uint8)
    tm = cv2.resize(tm, (tar.shape[1], tar.shape[0]))
    y1, y2, x1, x2 = studio_box(rm)
    m3 = np.stack([rm] * 3, -1)
    masked = (ref * m3 + np.ones_like(ref) * 255 * (1 - m3))[y1:y2, x1:x2]
    h, w = masked.shape[:2]
    H, W = int(h * 1.3), int(w * 1.3)
    masked = np.pad(masked, (((H - h) // 2, H - h - (H - h) // 2), ((W - w) // 2, W - w - (W - w) // 2), (0, 0)),
                    "constant", constant_values=255)
    masked = cv2.resize(studio_pad(masked, 255).astype(np.uint8), (size, size))
    tm = cv2.dilate(tm, np.ones((7, 7), np.uint8), iterations=2)
    box = studio_square(tar.shape, studio_expand(tar.shape, studio_expand(tm.shape, studio_box(tm))))
    y1, y2, x1, x2 = box
    crop = studio_pad(tar[y1:y2, x1:x2], 255)
    tm = cv2.resize(studio_pad(tm[y1:y2, x1:x2], 0), (size, size))
    diptych = np.concatenate([masked, cv2.resize(crop, (size, size))], 1)
    mask = np.concatenate([np.zeros((size, size, 3), np.uint8), np.stack([tm] * 3, -1)], 1)
    mask[mask == 1] = 255
    return diptych, mask, masked, box, (y2 - y1, x2 - x1, crop.shape[0], crop.shape[1]), tar


def studio_paste(image, tar, box, sizes):
    W, H = image.size
    pred = cv2.resize(np.array(image.crop((W // 2, 0, W, H))), (sizes[3], sizes[2]))
    H1, W1, H2, W2 = sizes
    y1, y2, x1, x2 = box
    if W1 < W2:
        p1 = int((W2 - W1) / 2)
        pred = pred[:, p1:-(W2 - W1 - p1)]
    elif H1 < H2:
        p1 = int((H2 - H1) / 2)
        pred = pred[p1:-(H2 - H1 - p1)]
    out = tar.copy()
    out[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = pred[2:-2, 2:-2]
    return out


def photo(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def box_mask(w, h, box):
    m = Image.new("L", (w, h))
    m.paste(255, box)
    return m


CASES = {  # source size, target box, reference size, object box
    "inner": ((120, 90), (50, 30, 80, 60), (70, 50), (10, 5, 40, 45)),
    "at the edge": ((100, 140), (0, 100, 30, 140), (40, 60), (5, 10, 35, 30)),
    "tiny object": ((96, 96), (40, 40, 44, 43), (64, 64), (0, 0, 2, 2)),
}


@pytest.mark.parametrize("case", CASES)
def test_diptych_and_paste_equal_the_written_out_computation(case):
    (sw, sh), tbox, (rw, rh), rbox = CASES[case]
    args = (photo(sw, sh, 1), box_mask(sw, sh, tbox), photo(rw, rh, 2), box_mask(rw, rh, rbox))
    d = ia.make_diptych(*args, side=48)
    diptych, mask, left, box, sizes, tar = studio_prepare(*args, 48)
    assert np.array_equal(np.asarray(d.image), diptych) and np.array_equal(np.asarray(d.reference), left)
    assert np.array_equal(np.stack([np.asarray(d.mask)] * 3, -1), mask) and mask.any()
    assert d.box == tuple(int(v) for v in box)
    generated = photo(96, 48, 3)
    assert np.array_equal(np.asarray(d.paste(generated)), studio_paste(generated, tar, box, sizes))


# ----------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def hub(tiny_root, tmp_path_factory):
    """{model_id: tiny folder}: FLUX.1-Fill-dev with its own text encoders and VAE (as 2.0's scripts read them),
    FLUX.1-Redux-dev, and HuanJue/Insert-Anything's LoRA (diffusers names)."""
    root = tmp_path_factory.mktemp("insert_anything")
    fill = build_tiny_variant(root / "FLUX.1-Fill-dev", "fill")
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "ae.safetensors"):
        (fill / name).symlink_to(tiny_root / name)
    lora_dir = root / "Insert-Anything"
    lora_dir.mkdir()
    g = torch.Generator().manual_seed(0)
    lora = {f"transformer.transformer_blocks.0.attn.{n}.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.1
            for n in ("to_q", "to_v") for ab, shape in (("A", (4, 32)), ("B", (32, 4)))}
    save_safetensors(lora, lora_dir / "20250321_steps5000_pytorch_lora_weights.safetensors")
    return {"black-forest-labs/FLUX.1-Fill-dev": fill, "black-forest-labs/FLUX.1-Redux-dev": build_tiny_redux(
        root / "FLUX.1-Redux-dev"), "HuanJue/Insert-Anything": lora_dir}


@pytest.fixture
def small_side(monkeypatch):
    monkeypatch.setattr(ia, "SIDE", SIDE)


def inputs(seed=0):
    return dict(insert_anything_source_image=photo(80, 64, seed), insert_anything_source_mask=box_mask(80, 64, (30, 20, 50, 40)),
                insert_anything_ref_image=photo(48, 48, seed + 1), insert_anything_ref_mask=box_mask(48, 48, (8, 8, 40, 36)))


@pytest.fixture(scope="module")
def pipe(hub):
    fill, redux = hub["black-forest-labs/FLUX.1-Fill-dev"], hub["black-forest-labs/FLUX.1-Redux-dev"]
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(fill / p)) for p in ("flux1-fill-dev.safetensors", "text_encoder/model.safetensors",
                                                   "text_encoder_2", "ae.safetensors")] + [
        ModelConfig(path=str(redux / p)) for p in ("image_encoder", "flux1-redux-dev.safetensors")])


def test_pipeline_is_fill_and_redux_on_the_diptych_then_the_paste(pipe, small_side):
    kw = dict(seed=3, num_inference_steps=2, t5_sequence_length=16, embedded_guidance=30.0, progress_bar_cmd=lambda x: x)
    got = pipe(**inputs(), height=512, width=512, **kw)  # the size is the diptych's
    d = ia.make_diptych(*inputs().values(), side=SIDE)
    plain = pipe(flux_fill_image=d.image, flux_fill_mask=d.mask, flux_redux_image=d.reference, height=SIDE,
                 width=2 * SIDE, redux_replaces_prompt=True, **kw)
    assert got.size == (80, 64) and np.array_equal(np.asarray(got), np.asarray(d.paste(plain)))
    outside = np.ones((64, 80), bool)
    y1, y2, x1, x2 = d.box
    outside[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = False
    assert np.array_equal(np.asarray(got)[outside], np.asarray(inputs()["insert_anything_source_image"])[outside])


@pytest.mark.parametrize("kw, match", [
    (dict(insert_anything_source_image=photo(8, 8, 0)), "missing: insert_anything_source_mask"),
    ({**inputs(), "flux_fill_mask": box_mask(8, 8, (0, 0, 4, 4))}, "flux_fill_mask itself"),
    ({**inputs(), "insert_anything_ref_mask": box_mask(20, 20, (0, 0, 4, 4))}, "ref_mask is 20x20"),
])
def test_bad_inputs(pipe, small_side, kw, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kw, num_inference_steps=1, output_type="latent")


def test_needs_the_fill_dit(tiny_pipe, small_side):
    with pytest.raises(ValueError, match="needs the FLUX.1-Fill DiT"):
        tiny_pipe(**inputs(), num_inference_steps=1, output_type="latent")


# ----------------------------------------------------------------------------- the example scripts

def photos(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in inputs().items():
        value.save(folder / f"{name.split('insert_anything_')[1]}.png")


@pytest.mark.parametrize("folder", ["model_inference", "model_inference_low_vram"])
def test_inference_examples(folder, hub, tmp_path, monkeypatch, small_side):
    photos(tmp_path / "Insert-Anything")
    glb = run_example(f"{folder}/Insert-Anything.py", tmp_path, monkeypatch, hub)
    suffix = "" if folder == "model_inference" else "_low_vram"
    assert Image.open(tmp_path / f"image_Insert-Anything{suffix}.jpg").size == (80, 64)
    assert glb["pipe"].redux is not None and glb["pipe"].dit.config.in_channels == 384


def test_lora_training_and_validation(hub, tmp_path, monkeypatch, small_side, fresh_accelerate):
    monkeypatch.chdir(tmp_path)
    for model_id, folder in hub.items():
        link_model(tmp_path, model_id, folder)
    data = tmp_path / "data/diffsynth_example_dataset/flux/Insert-Anything"
    photos(data)
    photo(64, 64, 9).save(data / "image.jpg")
    (data / "metadata.csv").write_text(
        "image,prompt,insert_anything_source_image,insert_anything_source_mask,insert_anything_ref_image,"
        "insert_anything_ref_mask\nimage.jpg,,source_image.png,source_mask.png,ref_image.png,ref_mask.png\n")
    script = EXAMPLES / "model_training/lora/Insert-Anything.sh"
    args, result, saved = train_script_one_step(script)
    assert result["steps"] == 1 and saved.is_file() and args.lora_format == "kohya"
    shutil.rmtree(tmp_path / "models/HuanJue")
    run_example("model_training/validate_lora/Insert-Anything.py", tmp_path, monkeypatch, hub)
    assert (tmp_path / "image_Insert-Anything_lora.jpg").is_file()


def test_redux_conditioning_is_diffsynth_studios(pipe, small_side):
    """DiffSynth-Studio's Redux unit, which its Insert-Anything runs through: on both CFG branches the T5
    embedding is zeros of the prompt's length followed by the Redux tokens, the pooled embedding zeros."""
    from diffsynth.pipelines.units import active_units, run_units
    from diffsynth.pipelines.variants.redux import redux_tokens
    shared = {**inputs(), "seed": 0, "t5_sequence_length": 16, "sigmas": torch.ones(1), "cfg_scale": 2.0}
    posi, nega = {"prompt": "a cup"}, {"prompt": "blurry"}
    run_units(pipe, active_units(pipe, pipe.units), shared, posi, nega, True)
    tokens = redux_tokens(pipe, shared["flux_redux_image"])
    for branch in (posi, nega):
        assert torch.equal(branch["prompt_emb"], torch.cat([torch.zeros(1, 16, tokens.shape[-1]), tokens], 1))
        assert not branch["pooled_prompt_emb"].any() and not branch["text_ids"].any()
