"""One validation module (pipelines.checks): inference and training refuse the same values with the same words."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from diffsynth.pipelines import checks
from diffsynth.pipelines.common_units import check_shape
from diffsynth.training.data import DatasetError, load_samples


def test_size_checks_are_the_same_in_the_call_check_and_the_unit_training_runs():
    for height, width in ((0, 64), (64, 2.5), (True, 64)):
        args = dict(height=height, width=width)
        with pytest.raises((TypeError, ValueError)) as call:
            checks.check_size(**args)
        with pytest.raises((TypeError, ValueError)) as unit:
            check_shape.fn(None, **args)
        assert type(call.value) is type(unit.value) and str(call.value) == str(unit.value)
    with pytest.warns(UserWarning, match="72x64 rounded up to 80x64"):
        assert check_shape.fn(None, height=72, width=64) == {"height": 80, "width": 64}


def test_a_prompt_the_pipeline_refuses_is_refused_in_the_dataset_with_its_words(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    bad = "caf\udce9"  # bytes that were not UTF-8
    (tmp_path / "metadata.json").write_text(json.dumps([{"image": "a.png", "prompt": 5},
                                                        {"image": "a.png", "prompt": "fine"}]))
    with pytest.raises(TypeError) as call:
        checks.check_text("prompt", 5)
    with pytest.raises(DatasetError) as data:
        load_samples(str(tmp_path), None, ["image"])
    assert f"row 1: {call.value}" in str(data.value) and "row 2" not in str(data.value)
    with pytest.raises(ValueError, match=r"lone surrogate U\+DCE9"):
        checks.check_text("prompt", bad)


def test_unknown_inputs_are_one_error_for_calls_and_extra_inputs():
    with pytest.raises(checks.UnknownInputError) as e:
        checks.check_known_inputs(["kontxt_images", "kontext_images"], {"kontext_images", "flux_fill_image"},
                                  "unknown argument(s)")
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("unknown argument(s) ['kontxt_images'] are not inputs of any unit")
    checks.check_known_inputs([], {"x"}, "--extra_inputs")  # nothing given, nothing wrong


def test_output_arguments_are_checked_with_the_call():
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline
    pipe = Flux2ImagePipeline(device="cpu")
    with pytest.raises(ValueError, match="output_type must be 'pil', 'pt' or 'latent', got 'png'"):
        pipe("a", output_type="png")
    with pytest.raises(ValueError, match=r"tile_stride \(80\) must be in \(0, tile_size=64\]"):
        pipe("a", tiled=True, tile_size=64, tile_stride=80)
