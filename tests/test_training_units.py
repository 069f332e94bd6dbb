"""The small pure pieces of training: metadata, sizes, buckets, batch order, schedules, checkpoint pointers."""
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth.pipelines.flux2_image import Flux2ImagePipeline
from diffsynth.pipelines.flux_image import FluxImagePipeline
from diffsynth.schedulers.flow_match import training_weights
from diffsynth.training.checkpoint import capture_rng, prune, resolve_resume, restore_rng, write_pointer
from diffsynth.training.data import (DatasetError, bucket_sizes, crop_resize, dynamic_size, epoch_batches, find_rows,
                                     load_samples, nearest_bucket, read_metadata, shard_batches, target_size)
from diffsynth.training.schedule import flux_shift, logit_normal, lr_factor, make_sigma_sampler, shifted_uniform


# ----------------------------------------------------------------------------- metadata

def test_metadata_formats_read_the_same_rows(tmp_path):
    rows = [{"image": "a.png", "prompt": "a cat, sitting"}, {"image": "b.png", "prompt": 'say "hi"'}]
    (tmp_path / "m.csv").write_text('image,prompt\na.png,"a cat, sitting"\nb.png,"say ""hi"""\n')
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("m.csv", "m.json", "m.jsonl"):
        assert read_metadata(tmp_path / name) == rows
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DatasetError, match="must be .csv, .json or .jsonl"):
        read_metadata(tmp_path / "m.txt")
    (tmp_path / "nocaption.csv").write_text("image,text\na.png,hi\n")
    with pytest.raises(DatasetError, match="no 'prompt' column"):
        load_samples(str(tmp_path), str(tmp_path / "nocaption.csv"), ["image"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot be parsed"):
        read_metadata(tmp_path / "bad.json")


def test_folder_without_metadata_uses_txt_captions(tmp_path):
    Image.new("RGB", (40, 24)).save(tmp_path / "x.webp")
    (tmp_path / "x.txt").write_text("a small house\n")
    rows, source = find_rows(str(tmp_path), None)
    assert rows == [{"image": "x.webp", "prompt": "a small house"}] and "captions" in source
    (samples,) = load_samples(str(tmp_path), None, ["image"])
    assert samples.size == (40, 24) and samples.prompt == "a small house"


def test_list_valued_file_columns_and_extras(tmp_path):
    for n in ("a", "r1", "r2"):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{n}.png")
    rows = [{"image": "a.png", "prompt": "p", "refs": ["r1.png", "r2.png"], "scale": 0.5}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (s,) = load_samples(str(tmp_path), str(tmp_path / "m.json"), ["image", "refs"])
    assert s.files["refs"] == [str(tmp_path / "r1.png"), str(tmp_path / "r2.png")] and s.extras == {"scale": 0.5}


# ----------------------------------------------------------------------------- sizes

def test_dynamic_size_shrinks_to_max_pixels_and_floors_to_16():
    assert dynamic_size(1000, 700, 1024 * 1024) == (992, 688)  # small enough: only floored
    w, h = dynamic_size(4000, 3000, 1024 * 1024)
    assert w * h <= 1024 * 1024 and w % 16 == h % 16 == 0 and abs(w / h - 4 / 3) < 0.02
    assert dynamic_size(10, 5, 1024) == (16, 16)
    assert target_size((4000, 3000), 512, 768, 1024 * 1024, None) == (768, 512)


def test_crop_resize_covers_then_centre_crops():
    x = np.zeros((100, 300, 3), np.uint8)
    x[:, 100:200] = 255  # a white middle third
    out = np.asarray(crop_resize(Image.fromarray(x), 64, 64))
    assert out.shape == (64, 64, 3) and out.min() > 230  # only the white centre survives (Lanczos ringing aside)
    assert crop_resize(Image.new("L", (10, 20)), 32, 16).size == (32, 16)


def test_buckets_respect_area_and_ratio():
    buckets = bucket_sizes(1024 * 1024, 64)
    assert (1024, 1024) in buckets
    assert all(w * h <= 1024 * 1024 and w % 64 == h % 64 == 0 and max(w / h, h / w) <= 4 for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (1344, 768)
    assert nearest_bucket(500, 500, buckets) == (1024, 1024)


# ----------------------------------------------------------------------------- batch order

def test_epoch_batches_are_seeded_grouped_by_size_and_cover_every_repeat():
    sizes = [(64, 64), (64, 64), (80, 48), (64, 64), (80, 48)]
    batches = epoch_batches(sizes, repeat=3, batch_size=2, seed=7, epoch=0)
    assert batches == epoch_batches(sizes, 3, 2, 7, 0)
    assert batches != epoch_batches(sizes, 3, 2, 7, 1)
    assert sorted(i for b in batches for i in b) == sorted(list(range(5)) * 3)
    assert all(len({sizes[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)


def test_shards_are_equal_disjoint_and_a_multiple_of_accumulation():
    batches = [[i] for i in range(7)]
    shards = [shard_batches(batches, r, 2, multiple=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    seen = [b[0] for s in shards for b in s]
    assert set(seen) == set(range(7)) and len(seen) == 8  # everything once, plus one wrapped-around batch
    assert shard_batches(batches, 0, 1) == batches


# ----------------------------------------------------------------------------- schedules

def studio_grid(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSynth-Studio 2.0's training grid, computed as its FlowMatchScheduler does (fp32):
    set_timesteps(1000, training=True) with the FLUX.1 or FLUX.2 template, then set_training_weight."""
    if family == "flux":
        sigma_min = 0.003 / 1.002
        sigmas = torch.linspace(sigma_min + (1 - sigma_min), sigma_min, 1000)
        sigmas = 3 * sigmas / (1 + 2 * sigmas)
    else:  # set_timesteps_flux2 without dynamic_shift_len: sigma_min = 1/steps, mu = 0.8
        sigmas = torch.linspace(1 / 1000 + (1 - 1 / 1000), 1 / 1000, 1000)
        sigmas = math.exp(0.8) / (math.exp(0.8) + (1 / sigmas - 1))
    x = sigmas * 1000
    y = torch.exp(-2 * ((x - 500) / 1000) ** 2)
    y = y - y.min()
    return sigmas, y * (1000 / y.sum())


@pytest.mark.parametrize("pipeline", [FluxImagePipeline, Flux2ImagePipeline])
def test_shifted_uniform_draws_from_the_family_grid(pipeline):
    sigmas, weights = studio_grid(pipeline.family)
    ours = pipeline.training_sigmas()
    torch.testing.assert_close(ours, sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(training_weights(ours), weights, rtol=1e-5, atol=1e-6)
    sampler = make_sigma_sampler("shifted_uniform", grid=ours)
    s, w = sampler(4096, 16, torch.Generator().manual_seed(0))
    idx = torch.searchsorted(-ours, -s)  # sigmas decrease along the grid
    assert torch.equal(ours[idx], s) and torch.equal(training_weights(ours)[idx], w)
    assert len(set(idx.tolist())) > 900  # uniform over the 1000 indices
    assert abs(weights.mean().item() - 1) < 1e-4


def test_the_two_families_train_on_different_grids():
    flux, flux2 = FluxImagePipeline.training_sigmas(), Flux2ImagePipeline.training_sigmas()
    assert (flux - flux2).abs().max() > 0.05
    torch.manual_seed(0)
    assert torch.isin(shifted_uniform(8, 16)[0], flux).all()  # the default sampler is FLUX.1's


def test_logit_normal_and_flux_shift():
    g = torch.Generator().manual_seed(0)
    s, w = logit_normal(20000, 16, g)
    assert torch.all((s > 0) & (s < 1)) and torch.equal(w, torch.ones_like(w))
    assert abs(s.median().item() - 0.5) < 0.02
    small = flux_shift(20000, 256, torch.Generator().manual_seed(0))[0].median().item()
    large = flux_shift(20000, 4096, torch.Generator().manual_seed(0))[0].median().item()
    assert abs(small - 1 / (1 + math.exp(-0.5))) < 0.02 and large > small  # big images train noisier


def test_lr_factor_warmup_then_curves():
    assert [lr_factor(s, "constant", 0, 10) for s in range(3)] == [1.0, 1.0, 1.0]  # no hidden 1/3 factor
    assert [lr_factor(s, "constant", 3, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(2, "linear", 2, 12) == 1.0 and lr_factor(7, "linear", 2, 12) == 0.5
    assert lr_factor(12, "linear", 2, 12) == 0.0
    assert lr_factor(7, "cosine", 2, 12) == pytest.approx(0.5) and lr_factor(12, "cosine", 2, 12) == pytest.approx(0)


# ----------------------------------------------------------------------------- checkpoints

def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)
    state = capture_rng()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1))
    restore_rng(state)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1)) == expected


def test_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "state.json").write_text("{}")
    (tmp_path / "step-8").mkdir()  # incomplete (no state.json)
    (tmp_path / ".tmp-step-9").mkdir()
    write_pointer(tmp_path, "step-4")
    assert resolve_resume(tmp_path, "latest") == tmp_path / "step-4"
    write_pointer(tmp_path, "step-8")
    with pytest.warns(UserWarning, match="incomplete"):
        assert resolve_resume(tmp_path, "latest") == tmp_path / "step-6"
    prune(tmp_path, keep=2, protect="step-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-2", "step-6", "step-8"]
    assert resolve_resume(tmp_path / "nothing", "latest") is None
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "step-8"))
