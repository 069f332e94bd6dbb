"""Qwen2.5-VL's vision tower and image processor (diffsynth/models/qwen25_vision.py) against transformers (the
oracle, imported inside the tests) on random weights and random images; config parsing, errors, and that neither
needs transformers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.models.qwen25_vision import QwenImageProcessor, VisionConfig, VisionTower, smart_resize
from diffsynth.testing.tiny_qwen import tiny_qwen_config

PATCH_DIM = 3 * 2 * 14 * 14
TINY_PREPROCESSOR = {  # the tiny builder's preprocessor_config.json, with a small max_pixels to keep images small
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136, "max_pixels": 28 * 28 * 48, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


def whole_config(**vision) -> dict:
    """The tiny Qwen2.5-VL config.json (window 56 px = 2 merged tokens), vision_config keys overridden."""
    config = tiny_qwen_config()
    config["vision_config"].update(vision)
    return config


def towers(config: dict, seed: int = 0):
    """transformers' vision tower with every tensor random (it initialises norms to one, biases to zero) and ours
    holding the same tensors."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(seed)
    reference = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLConfig.from_dict(config).vision_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + ("norm" in name or "ln_q" in name))
    ours = VisionTower(VisionConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def merged_output(reference, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """transformers 5 returns the merged embeddings as `pooler_output`, transformers 4 as the tensor itself."""
    out = reference(pixels, grid_thw=grid)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def inputs(grid: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(grid)
    return torch.randn(int(grid.prod(1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(seed)), grid


# ----------------------------------------------------------------------------- tower

TOWER_CASES = {
    "one image": ({}, [[1, 8, 12]]),  # 4 x 6 tokens: 2 x 3 whole windows
    "uneven windows": ({"window_size": 112}, [[1, 6, 10]]),  # 3 x 5 tokens, windows of 4: cut at the edges
    "several images": ({"depth": 3, "fullatt_block_indexes": [1]}, [[1, 4, 4], [1, 6, 10], [1, 10, 6], [1, 2, 2]]),
    "no full attention": ({"depth": 3, "fullatt_block_indexes": []}, [[1, 6, 10], [1, 4, 8]]),
    "only full attention": ({"fullatt_block_indexes": [0, 1]}, [[1, 6, 10], [1, 4, 4]]),
    "frames": ({"fullatt_block_indexes": [0]}, [[2, 4, 6], [1, 2, 4]]),
    "merge 1, window floored": ({"spatial_merge_size": 1, "window_size": 50}, [[1, 5, 7], [1, 3, 3]]),
}


@pytest.mark.parametrize("case", TOWER_CASES)
def test_tower_matches_transformers_fp32(case):
    vision, grid = TOWER_CASES[case]
    reference, ours = towers(whole_config(**vision))
    pixels, grid = inputs(grid)
    with torch.no_grad():
        expected = merged_output(reference, pixels, grid)
        got = ours(pixels, grid)
    assert got.shape == expected.shape == (len(pixels) // vision.get("spatial_merge_size", 2) ** 2, 48)
    assert rel(got, expected) <= 1e-5


def test_tower_window_order_matters():
    """The windowed blocks see other neighbours than full attention would: a tower told that every block
    attends over the whole image must not match (the comparisons above are not blind to the windows)."""
    reference, _ = towers(whole_config(fullatt_block_indexes=[]))
    _, full = towers(whole_config(fullatt_block_indexes=[0, 1]))
    pixels, grid = inputs([[1, 8, 12]])
    with torch.no_grad():
        assert rel(full(pixels, grid), merged_output(reference, pixels, grid)) > 1e-2


def test_tower_bf16_close_to_transformers():
    reference, ours = towers(whole_config(depth=3, fullatt_block_indexes=[1]))
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    pixels, grid = inputs([[1, 6, 10], [1, 4, 4]])
    with torch.no_grad():
        expected = merged_output(reference, pixels, grid)
        got = ours(pixels, grid)
    assert got.dtype == torch.bfloat16
    assert rel(got, expected) <= 2e-2


RELEASE_7B_VISION = {  # Qwen/Qwen2.5-VL-7B-Instruct's config.json
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}


@pytest.mark.parametrize("release", [False, True], ids=["tiny", "7B on meta"])
def test_state_dict_keys_and_shapes_are_transformers_visual(release):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    config = tiny_qwen_config()
    if release:
        config["vision_config"] = RELEASE_7B_VISION
    with torch.device("meta" if release else "cpu"):
        visual = Qwen2_5_VLModel(Qwen2_5_VLConfig.from_dict(config)).visual
        got = {k: v.shape for k, v in VisionTower(VisionConfig.from_dict(config)).state_dict().items()}
    expected = {k: v.shape for k, v in visual.state_dict().items()}
    assert set(got) == set(expected)
    assert got == expected
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.bias", "merger.ln_q.weight", "merger.mlp.2.bias"} <= set(got)


def test_vision_config_reads_transformers_values_and_defaults():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig

    def same(ours: VisionConfig, theirs):
        for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "in_channels", "hidden_act"):
            assert getattr(ours, name) == getattr(theirs, name), name
        assert ours.fullatt_block_indexes == tuple(theirs.fullatt_block_indexes)
        assert ours.rope_theta == theirs.rope_parameters["rope_theta"]

    config = tiny_qwen_config()
    theirs = Qwen2_5_VLConfig.from_dict(config)
    same(VisionConfig.from_dict(config), theirs.vision_config)
    # what transformers 5 writes back (with rope_parameters) reads the same
    same(VisionConfig.from_dict({"vision_config": theirs.vision_config.to_dict()}), theirs.vision_config)
    same(VisionConfig.from_dict({"vision_config": {}}), Qwen2_5_VLVisionConfig())


@pytest.mark.parametrize("vision, match", [
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not supported"),
    ({"depth": None}, "depth must be a positive integer, got None"),
    ({"patch_size": [14, 14]}, "patch_size must be a positive integer"),
    ({"num_heads": 3}, "hidden_size 32 must split into 3 heads"),
    ({"fullatt_block_indexes": [2]}, r"fullatt_block_indexes must list block indexes in \[0, 2\)"),
    ({"window_size": 14}, "window_size 14 is smaller than one merged token"),
    ({"rope_parameters": {"rope_type": "default"}}, "rope_type 'default' is not supported"),
])
def test_vision_config_errors(vision, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig.from_dict(whole_config(**vision))


def test_vision_config_needs_vision_config():
    with pytest.raises(ValueError, match="'vision_config' must be a mapping"):
        VisionConfig.from_dict({"model_type": "qwen2_5_vl"})


def test_tower_input_errors():
    tower = VisionTower(VisionConfig.from_dict(tiny_qwen_config()))
    pixels, grid = inputs([[1, 4, 4]])
    with pytest.raises(ValueError, match=r"pixel_values must be \(16, 1176\)"):
        tower(pixels[:-1], grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        tower(torch.zeros(15, PATCH_DIM), torch.tensor([[1, 3, 5]]))
    with pytest.raises(ValueError, match=r"grid_thw must be \(n_images, 3\)"):
        tower(pixels, torch.tensor([4, 4]))


# ----------------------------------------------------------------------------- image processor

def transformers_processor(folder):
    try:  # transformers 5: the PIL backend (the default one needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers 4: the slow (PIL/numpy) processor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as cls
    return cls.from_pretrained(str(folder), local_files_only=True)


def transformers_smart_resize():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def noise_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P":  # a palette image with a transparent colour: composited onto white like RGBA
        image = image.quantize(16)
        image.info["transparency"] = 3
    return image


IMAGES = [(50, 70, "RGB"), (300, 200, "RGB"), (33, 500, "RGBA"), (129, 97, "L"), (28, 28, "RGB"), (13, 900, "RGB"),
          (1000, 700, "RGB"), (61, 45, "P")]

FOLDER_STYLES = {
    "transformers 4 (min/max_pixels)": TINY_PREPROCESSOR,
    "transformers 5 (size)": {**{k: v for k, v in TINY_PREPROCESSOR.items() if not k.endswith("_pixels")},
                              "size": {"shortest_edge": 28 * 28 * 6, "longest_edge": 28 * 28 * 30}},
    "size and min/max_pixels": {**TINY_PREPROCESSOR, "size": {"shortest_edge": 1, "longest_edge": 2}},
    "partial size and max_pixels": {**{k: v for k, v in TINY_PREPROCESSOR.items() if k != "min_pixels"},
                                    "size": {"shortest_edge": 28 * 28 * 9}},
    "release (defaults)": {"min_pixels": 3136, "max_pixels": 28 * 28 * 64, "patch_size": 14, "temporal_patch_size": 2,
                           "merge_size": 2, "image_mean": TINY_PREPROCESSOR["image_mean"],
                           "image_std": TINY_PREPROCESSOR["image_std"]},
    "other settings": {**TINY_PREPROCESSOR, "do_normalize": False, "rescale_factor": 1 / 127.5, "resample": 2,
                       "patch_size": 7, "merge_size": 3},
}


def write_preprocessor(folder, config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("style", FOLDER_STYLES)
def test_processor_matches_transformers(tmp_path, style):
    write_preprocessor(tmp_path, FOLDER_STYLES[style])
    ours, theirs = QwenImageProcessor.from_folder(tmp_path), transformers_processor(tmp_path)
    assert ours.merge_size == theirs.merge_size
    images = [noise_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES)]
    got = ours(images)
    expected = theirs(images=images, return_tensors="pt")
    assert got["image_grid_thw"].dtype == torch.long and got["pixel_values"].dtype == torch.float32
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert (got["pixel_values"] - expected["pixel_values"]).abs().max() <= 1e-6


@pytest.mark.parametrize("min_pixels, max_pixels", [(28 * 28 * 20, None), (None, 28 * 28 * 8),
                                                    (56 * 56 * 4, 28 * 28 * 16), (28 * 28, 28 * 28 * 100)])
def test_processor_pixel_overrides_match_transformers(tmp_path, min_pixels, max_pixels):
    write_preprocessor(tmp_path, TINY_PREPROCESSOR)
    ours, theirs = QwenImageProcessor.from_folder(tmp_path), transformers_processor(tmp_path)
    images = [noise_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES[:5])]
    size = {"shortest_edge": min_pixels or TINY_PREPROCESSOR["min_pixels"],
            "longest_edge": max_pixels or TINY_PREPROCESSOR["max_pixels"]}
    got = ours(images, min_pixels=min_pixels, max_pixels=max_pixels)
    expected = theirs(images=images, size=size, return_tensors="pt")
    assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert (got["pixel_values"] - expected["pixel_values"]).abs().max() <= 1e-6
    assert not torch.equal(got["image_grid_thw"], ours(images)["image_grid_thw"])  # the override took effect


def test_processor_and_tower_end_to_end(tmp_path):
    """Our processor then our tower against transformers' processor then transformers' tower."""
    write_preprocessor(tmp_path, TINY_PREPROCESSOR)
    reference, ours = towers(whole_config(depth=3, fullatt_block_indexes=[2]))
    images = [noise_image(120, 90, "RGB", 0), noise_image(40, 130, "RGBA", 1)]
    mine = QwenImageProcessor.from_folder(tmp_path)(images)
    theirs = transformers_processor(tmp_path)(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = merged_output(reference, theirs["pixel_values"], theirs["image_grid_thw"])
        got = ours(mine["pixel_values"], mine["image_grid_thw"])
    assert rel(got, expected) <= 1e-5


def test_smart_resize_matches_transformers():
    reference = transformers_smart_resize()
    sides = [1, 5, 27, 28, 29, 42, 70, 97, 500, 1000, 3001]
    for factor in (28, 56):
        for limits in ((3136, 28 * 28 * 1280), (56 * 56 * 10, 28 * 28 * 64), (28 * 28 * 200, 28 * 28 * 300)):
            for h in sides:
                for w in sides:
                    if max(h, w) / min(h, w) > 200:
                        continue
                    expected = reference(h, w, factor, *limits)
                    assert smart_resize(h, w, factor, *limits) == expected, (h, w, factor, limits)
    assert smart_resize(1, 200) == reference(1, 200)  # a ratio of exactly 200 is allowed


@pytest.mark.parametrize("height, width", [(1, 201), (201, 1), (10, 2020)])
def test_smart_resize_refuses_extreme_aspect_ratios_like_transformers(height, width):
    reference = transformers_smart_resize()
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        reference(height, width)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        smart_resize(height, width)


def test_processor_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json: not found"):
        QwenImageProcessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"patch_size": 14,')
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        QwenImageProcessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="preprocessor_config.json: expected a JSON object, got list"):
        QwenImageProcessor.from_folder(tmp_path)


@pytest.mark.parametrize("config, match", [
    ({"patch_size": "14"}, "'patch_size' must be a positive integer, got '14'"),
    ({"size": {"shortest_edge": 3136}},
     r"'size' must hold 'shortest_edge' and 'longest_edge' \(or give 'max_pixels'\)"),
    ({"image_mean": [0.5, 0.5]}, "'image_mean' must be 3 numbers"),
    ({"do_normalize": "yes"}, "'do_normalize' must be true or false"),
    ({"resample": 9}, "'resample' must be a PIL resampling filter number"),
])
def test_processor_value_errors(tmp_path, config, match):
    write_preprocessor(tmp_path, config)
    with pytest.raises(ValueError, match="preprocessor_config.json: " + match):
        QwenImageProcessor.from_folder(tmp_path)


def test_processor_input_errors():
    processor = QwenImageProcessor()
    with pytest.raises(TypeError, match="images must be PIL images, got str"):
        processor(["cat.png"])
    with pytest.raises(ValueError, match="no images"):
        processor([])
    with pytest.raises(ValueError, match="do_convert_rgb is off"):
        QwenImageProcessor(do_convert_rgb=False)([noise_image(40, 40, "L", 0)])


def test_no_transformers_import(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_qwen_config()))
    write_preprocessor(tmp_path, TINY_PREPROCESSOR)
    code = (
        "import json, sys, torch\n"
        "from PIL import Image\n"
        "from diffsynth.models.qwen25_vision import QwenImageProcessor, VisionConfig, VisionTower\n"
        "folder = sys.argv[1]\n"
        "tower = VisionTower(VisionConfig.from_dict(json.load(open(folder + '/config.json'))))\n"
        "batch = QwenImageProcessor.from_folder(folder)([Image.new('RGB', (90, 60), 'red')])\n"
        "with torch.no_grad():\n"
        "    out = tower(batch['pixel_values'], batch['image_grid_thw'])\n"
        "assert out.shape == (int(batch['image_grid_thw'].prod()) // 4, 48), out.shape\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torchvision')))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
