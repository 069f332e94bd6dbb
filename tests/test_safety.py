"""Bad input fails early and clearly; nothing is silently wrong: corrupt files, absurd or non-finite
arguments, forged metadata, overwrites. Every case asserts the exact outcome."""
import ast
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth import FluxImagePipeline, ModelConfig
from diffsynth.cli import main
from diffsynth.generation import escape_line, png_metadata
from diffsynth.loading import download
from diffsynth.loading.lora import convert_lora, describe_lora
from diffsynth.ops.files import (CheckpointError, all_finite, load_state_dict, publish, remove_stale_temps, save_image,
                                 save_safetensors, scan, scan_file, temp_path)
from diffsynth.ops.images import convert_image
from diffsynth.pipelines.images import image_to_tensor
from diffsynth.pipelines.checks import MAX_PIXELS, check_call_args
from diffsynth.training.data import DatasetError, ImageDataset, image_size, load_samples

ARGS = ["--height", "64", "--width", "96", "--steps", "2", "--t5-sequence-length", "16", "--device", "cpu",
        "--dtype", "fp32"]


# ----------------------------------------------------------------------------- safetensors headers

def raw_safetensors(path, header, data: bytes = b"\0" * 8, prefix: bytes = b"") -> str:
    """A file with exactly this header (no library checks on the way)."""
    text = prefix + (header if isinstance(header, bytes) else json.dumps(header).encode())
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def entry(begin, end, shape=(2,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, match", [
    ({"a": entry(-8, 0)}, b"\0" * 8, "data_offsets must be"),                      # would read the JSON header
    ({"a": entry(0, 8), "b": entry(4, 12)}, b"\0" * 12, "overlaps another tensor"),
    ({"a": entry(0.0, 8.0)}, b"\0" * 8, "data_offsets must be"),
    ({"a": entry(0, 8), "b": entry(12, 20)}, b"\0" * 20, "leaves a gap"),
    ({"a": entry(0, 8)}, b"\0" * 16, "8 bytes after the last tensor"),
    ({"a": entry(0, 8)}, b"\0" * 4, "truncated"),
    ({"a": entry(0, 8, shape=(True, 2))}, b"\0" * 8, "shape must be a list of non-negative integers"),
    ({"a": entry(0, 8, dtype="F17")}, b"\0" * 8, "unsupported dtype 'F17'"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and data_offsets"),
    ({"a": entry(0, 8), "__metadata__": ["x"]}, b"\0" * 8, "__metadata__ must map names to strings"),
    ({"a": entry(0, 8), "__metadata__": {"k": 1}}, b"\0" * 8, "__metadata__ must map names to strings"),
    ([{"a": 1}], b"", "a JSON object was expected, got a list"),
])
def test_safetensors_header_is_validated_like_the_format_spec(tmp_path, header, data, match):
    path = raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        scan_file(path)


def test_safetensors_duplicated_names_are_refused(tmp_path):
    text = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' \
           b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    with pytest.raises(CheckpointError, match=r"duplicated names \['a'\]"):
        scan_file(raw_safetensors(tmp_path / "dup.safetensors", text))


def test_valid_edge_cases_still_load(tmp_path):
    """What the safetensors library accepts: empty tensors sharing an offset, header padding spaces."""
    path = raw_safetensors(tmp_path / "ok.safetensors", json.dumps(
        {"e": entry(0, 0, shape=(0,)), "a": entry(0, 8)}).encode() + b"   ", struct.pack("<2f", 1.5, -2.0))
    sd = load_state_dict(path)
    assert sd["e"].shape == (0,) and sd["a"].tolist() == [1.5, -2.0]


# ----------------------------------------------------------------------------- files that change or are odd

def test_loaded_weights_do_not_change_when_the_file_is_overwritten_in_place(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1024)}, path)
    loaded = load_state_dict(str(path))
    with open(path, "r+b") as f:  # overwrite the data section in place (same inode, same size)
        f.seek(os.path.getsize(path) - 4096)
        f.write(b"\xff" * 4096)
    assert torch.equal(loaded["w"], torch.ones(1024))


def test_a_file_truncated_after_loading_does_not_crash(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4096)}, path)
    loaded = load_state_dict(str(path))
    os.truncate(path, 100)  # with a memory map this would be SIGBUS on the next access
    assert loaded["w"].sum().item() == 4096


def test_a_file_changed_between_scan_and_read_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4096)}, path)
    refs = scan(str(path))
    os.truncate(path, 100)
    with pytest.raises(CheckpointError, match="changed on disk since it was opened"):
        refs["w"].load()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_model_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        scan(str(fifo))


def test_an_index_naming_files_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match=r"names shards outside its folder: \['../../../etc/passwd'\]"):
        scan(str(folder))


@pytest.mark.parametrize("kw", [dict(model_id="../../../etc", origin_file_pattern="passwd"),
                                dict(model_id="a/b", origin_file_pattern="../../../etc/passwd"),
                                dict(model_id="/etc", origin_file_pattern="passwd"),
                                dict(model_id="a/b", origin_file_pattern="/etc/passwd")])
def test_model_ids_and_patterns_cannot_leave_the_models_folder(tmp_path, kw):
    with pytest.raises(ValueError, match=r"must be a relative path inside the models folder"):
        ModelConfig(local_model_path=str(tmp_path / "models"), skip_download=True, **kw)


def test_a_symlinked_folder_leading_out_of_the_models_folder_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "me").mkdir(parents=True)
    os.symlink(tmp_path / "outside", tmp_path / "models" / "me" / "evil")
    for model_id, pattern in (("me/evil", "secret.safetensors"), ("me", "evil/*.safetensors")):
        config = ModelConfig(model_id=model_id, origin_file_pattern=pattern, local_model_path=str(tmp_path / "models"),
                             skip_download=True)
        with pytest.raises(ValueError, match=r"outside local_model_path .* \(through a symlink\): refused"):
            config.resolve()


def test_download_customized_models_never_moves_a_file_from_outside_local_dir(tmp_path, monkeypatch):
    """The hub returns nothing: the file the path names must not be moved in (nor its folder removed)."""
    monkeypatch.setitem(download.SOURCES, "modelscope", lambda *a: None)
    victim = tmp_path / "victim" / "precious.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"mine")
    local = tmp_path / "local"
    with pytest.raises(ValueError, match=r"origin_file_path '../victim/precious.bin' must be a relative path"):
        download.download_customized_models("me/x", "../victim/precious.bin", str(local), ["ModelScope"])
    local.mkdir()
    os.symlink(tmp_path / "victim", local / "sub")
    with pytest.raises(ValueError, match=r"outside .*local \(through a symlink\): not moved"):
        download.download_customized_models("me/x", "sub/precious.bin", str(local), ["ModelScope"])
    assert victim.read_bytes() == b"mine" and os.listdir(local) == ["sub"]


def test_invalid_json_config_names_the_file(tiny_root, tmp_path):
    from diffsynth.loading.registry import detect
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_root / "text_encoder", folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON in this model config"):
        detect(str(folder))


def test_absurd_config_depth_is_refused_before_building(tiny_root, tmp_path):
    from diffsynth import FluxImagePipeline, ModelConfig
    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_root / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json says num_hidden_layers=1000000000 but the weights hold \d+"):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=str(folder))])


def test_legacy_format_torch_file_loads(tmp_path):
    path = tmp_path / "old.bin"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert load_state_dict(str(path))["w"].tolist() == [0.0, 1.0, 2.0]


# ----------------------------------------------------------------------------- atomic writers

def test_no_file_with_nan_is_ever_written(tmp_path):
    with pytest.raises(ValueError, match=r"not written: 1 tensors hold NaN/Inf, e.g. \['b'\]"):
        save_safetensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_publish_without_overwrite_never_replaces_a_concurrent_file(tmp_path):
    target = tmp_path / "image.png"
    tmp = temp_path(str(target))
    open(tmp, "wb").write(b"mine")
    target.write_bytes(b"theirs")  # another process got there first
    with pytest.raises(FileExistsError, match="already exists"):
        publish(tmp, str(target), overwrite=False)
    assert target.read_bytes() == b"theirs"


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path, dead_pid):
    stale = [temp_path(str(tmp_path / "epoch-0.safetensors"), dead_pid), temp_path(str(tmp_path / "a.png"), dead_pid)]
    live = temp_path(str(tmp_path / "epoch-1.safetensors"))
    for p in (*stale, live):
        open(p, "wb").write(b"x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(live)]


@pytest.mark.parametrize("any_pid", [False, True])
def test_user_files_that_look_like_temp_files_are_never_removed(tmp_path, dead_pid, any_pid):
    """Only names carrying our marker are temp files: a photo named like one stays, even in a locked folder."""
    ours = os.path.basename(temp_path("x.png", dead_pid))
    forged = ours[:-1] + ("1" if ours.endswith("0") else "0")  # our pattern, a wrong marker
    names = ["holiday.tmp-2019.png", f"a.png.tmp-{dead_pid}.png", f"x.safetensors.tmp-{dead_pid}-0",
             f".latest.tmp-{dead_pid}", forged]
    for name in names:
        (tmp_path / name).write_bytes(b"user data")
    assert remove_stale_temps(tmp_path, any_pid=any_pid) == []
    assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_generate_keeps_user_files_named_like_temp_files(tiny_root, tmp_path, dead_pid):
    photos = [tmp_path / f"holiday.tmp-{dead_pid}.png", tmp_path / f"holiday.png.tmp-{dead_pid}-0"]
    for photo in photos:
        photo.write_bytes(b"a photo")
    assert main(quick_generate(tiny_root, tmp_path / "out.png")) == 0
    assert [p.read_bytes() for p in photos] == [b"a photo"] * 2


@pytest.mark.parametrize("name, magic", [("a.jpg", b"\xff\xd8"), ("a.jpeg", b"\xff\xd8"), ("a.png", b"\x89PNG"),
                                         ("a.webp", b"RIFF")])
def test_images_are_written_in_the_format_their_extension_names(tmp_path, name, magic):
    save_image(Image.new("RGB", (16, 16)), tmp_path / name, {"parameters": "a cat"})
    assert (tmp_path / name).read_bytes()[:len(magic)] == magic


def test_unknown_image_extension_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"x.gif: the extension must be one of .png, .jpg, .jpeg, .webp"):
        save_image(Image.new("RGB", (16, 16)), tmp_path / "x.gif")


# ----------------------------------------------------------------------------- generation arguments

CALL = dict(prompt="a cat", negative_prompt="", cfg_scale=1.0, embedded_guidance=3.5, t5_sequence_length=512,
            input_image=None, denoising_strength=1.0, height=None, width=None, seed=None, sigma_shift=None,
            num_inference_steps=30, tile_size=128, tile_stride=64, num_images=1, tea_cache_l1_thresh=None,
            fbcache_thresh=None)


@pytest.mark.parametrize("kw, error, match", [
    (dict(num_images=True), TypeError, "num_images must be an integer, got True"),
    (dict(input_image="cat.png"), TypeError, r"input_image must be a PIL image \(open it first"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an integer, got 2.5"),
    (dict(cfg_scale="2"), TypeError, "cfg_scale must be a number, got '2'"),
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale must be finite, got nan"),
    (dict(embedded_guidance=float("inf")), ValueError, "embedded_guidance must be finite, got inf"),
    (dict(sigma_shift=0.0), ValueError, r"sigma_shift must be in \[0.001, 1000.0\], got 0.0"),
    (dict(sigma_shift=float("nan")), ValueError, "sigma_shift must be finite"),
    (dict(seed=2**64), ValueError, "seed must be an integer >= 0 and at most 18446744073709551615"),
    (dict(seed=2**64 - 1, num_images=2), ValueError, "seed must be an integer >= 0 and at most 18446744073709551614"),
    (dict(t5_sequence_length=-1), ValueError, "t5_sequence_length must be a positive integer and at most 512"),
    (dict(t5_sequence_length=100000), ValueError, "t5_sequence_length must be a positive integer and at most 512"),
    (dict(height=100000, width=64), ValueError, "height must be a positive integer and at most 16384, got 100000"),
    (dict(height=16384, width=16384), ValueError, f"above the {MAX_PIXELS:,}-pixel limit"),
    (dict(denoising_strength=0.0), ValueError, r"denoising_strength must be in \(0.0, 1.0\]"),
    (dict(prompt=None), TypeError, "prompt must be a string, got NoneType"),
])
def test_bad_generation_arguments_fail_before_any_work(kw, error, match):
    with pytest.raises(error, match=match):
        check_call_args({**CALL, **kw})


def truncated_jpeg(path):
    """A JPEG whose header is intact (it opens) but whose image data stops half way."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (128, 128, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_input_image_is_named(tmp_path):
    truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match="input_image cannot be decoded"):
        check_call_args({**CALL, "input_image": Image.open(tmp_path / "cut.jpg")})


def condition_calls(image):
    """Each image-conditioned variant's first look at its image argument, on a stand-in pipeline that has the
    variant's models (the image is checked before any of them is used): (argument name, call)."""
    from types import SimpleNamespace

    from diffsynth.pipelines.variants import controlnet, kontext, nexus_gen, redux, step1x
    pipe = SimpleNamespace(controlnet=[None], qwenvl=object(), image_encoder=object(), redux=object(),
                           nexus_gen=object())
    return [
        ("controlnet_inputs[0].image", lambda: controlnet._checked(pipe, controlnet.ControlNetInput(image=image), 0)),
        ("controlnet_inputs[0].inpaint_mask", lambda: controlnet._checked(
            pipe, controlnet.ControlNetInput(image=Image.new("RGB", (8, 8)), inpaint_mask=image), 0)),
        ("kontext_images[0]", lambda: kontext.encode_kontext_images.fn(pipe, None, kontext_images=[image])),
        ("step1x_reference_image", lambda: step1x._reference(pipe, image)),
        ("nexus_gen_reference_image", lambda: nexus_gen.encode_nexus_gen_prompt.fn(
            pipe, [{}], None, nexus_gen_reference_image=image)),
        ("flux_redux_image", lambda: redux.redux_tokens(pipe, image)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_truncated_condition_images_are_named(tmp_path, index):
    name, call = condition_calls(Image.open(truncated_jpeg(tmp_path / "cut.jpg")))[index]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} cannot be decoded \(OSError: image file is truncated"):
        call()


@pytest.mark.parametrize("index", range(6))
def test_a_path_given_as_a_condition_image_is_refused_with_the_hint(index):
    name, call = condition_calls("mask.png")[index]
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be a PIL image \(open it first: "
                                        r"PIL.Image.open\(path\)\), got str"):
        call()


def test_an_empty_redux_image_list_is_a_clear_error():
    from types import SimpleNamespace

    from diffsynth.pipelines.variants.redux import redux_tokens
    with pytest.raises(ValueError, match=r"flux_redux_image is an empty list: give a PIL image or a non-empty list"):
        redux_tokens(SimpleNamespace(image_encoder=object(), redux=object()), [])


def test_nan_in_dit_weights_raises_naming_the_weight_instead_of_a_black_image(tiny_pipe):
    """A weight made NaN after loading (the load check cannot see it): the output check names it. The weight
    feeds the residual stream, so the NaN reaches the latents whatever the attention kernel does with it."""
    weight = tiny_pipe.dit.blocks[0].ff_a[0].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match=r"latents hold NaN/Inf: caused by the DiT weight "
                                                     r"blocks.0.ff_a.0.weight"):
            tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, t5_sequence_length=8, seed=0,
                      progress_bar_cmd=lambda x: x)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
def test_non_finite_weight_is_refused_at_load_naming_file_and_tensor(tmp_path, dtype, bad):
    """Not left to the kernels: a NaN in an attention query can come out of CPU SDPA finite."""
    weights = torch.ones(4, 8)
    weights[2, 5] = bad
    path = tmp_path / "damaged.safetensors"
    save_file({"ok": torch.ones(3), "blocks.0.attn.a_to_qkv.weight": weights.to(dtype)}, path)
    with pytest.raises(CheckpointError, match=r"damaged.safetensors: tensor 'blocks.0.attn.a_to_qkv.weight' "
                                              r"holds NaN/Inf values"):
        load_state_dict(str(path))


def test_all_finite_is_exact_for_every_stored_dtype():
    """The fast path (a sum) must neither miss a NaN nor refuse a finite tensor whose sum overflows; fp8 is
    read from its byte codes (NaN of both signs; e5m2's Inf)."""
    big = torch.full((100_000,), 60000.0, dtype=torch.float16)
    assert torch.isinf(big.sum()) and all_finite(big)
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        finite = torch.linspace(-400, 400, 1001).to(dtype)
        assert all_finite(finite), dtype
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = finite.clone()
            t[-7] = bad
            saturated = dtype == torch.float8_e4m3fn and math.isinf(bad)
            assert all_finite(t) == saturated, (dtype, bad)  # e4m3fn has no Inf: torch stores its largest value
    codes = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for code in codes:
            one = code.reshape(1).view(dtype)
            assert all_finite(one) == bool(torch.isfinite(one.float())), (dtype, int(code))


# ----------------------------------------------------------------------------- LoRA files

KOHYA = "lora_unet_double_blocks_0_img_attn_qkv"


def kohya(rank=2, alpha=1.0, value=0.1):
    return {f"{KOHYA}.lora_down.weight": torch.full((rank, 32), value),
            f"{KOHYA}.lora_up.weight": torch.zeros(96, rank), f"{KOHYA}.alpha": torch.tensor(alpha)}


@pytest.mark.parametrize("sd, reason", [
    (kohya(rank=0), "rank 0 (no LoRA weights)"),
    (kohya(alpha=float("nan")), "alpha is nan"),
    (kohya(value=float("inf")), "NaN/Inf in its down weights"),
    ({k: v.to(torch.int8) for k, v in kohya(value=3).items()}, "integer weights (int8); a LoRA's weights are "
                                                               "floating point"),
])
def test_unusable_lora_layers_are_reported_not_applied(tmp_path, sd, reason):
    assert convert_lora(sd).unknown == {KOHYA: reason}
    save_file(sd, tmp_path / "l.safetensors")
    if reason.startswith(("rank 0", "integer")):
        assert describe_lora(str(tmp_path / "l.safetensors"))["unknown"] == {KOHYA: reason}
    else:  # a file holding NaN/Inf is refused as it is read, naming the tensor
        with pytest.raises(CheckpointError, match=rf"l.safetensors: tensor '{KOHYA}\.\w+(\.weight)?' holds NaN/Inf"):
            describe_lora(str(tmp_path / "l.safetensors"))


def test_non_finite_lora_strength_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="LoRA alpha \\(strength\\) must be a finite number, got nan"):
        tiny_pipe.load_lora(tiny_pipe.dit, kohya(), alpha=float("nan"))


def test_a_lora_with_integer_weights_is_refused_not_applied(tiny_pipe):
    with pytest.raises(ValueError, match=r"(?s)1 LoRA entries match no layer.*integer weights \(int8\)"):
        tiny_pipe.load_lora(tiny_pipe.dit, {k: v.to(torch.int8) for k, v in kohya(value=3).items()})


def test_an_empty_lora_file_is_refused_naming_it(tiny_pipe, tmp_path):
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match=r"empty.safetensors holds no LoRA tensors"):
        tiny_pipe.load_lora(tiny_pipe.dit, str(tmp_path / "empty.safetensors"))


def test_an_fp8_lora_loads_as_its_exact_upcast(tiny_pipe, tmp_path):
    """fp8 LoRA files (e4m3fn and e5m2) are read and applied as their exact bf16 values, merged or hot-loaded."""
    layer = tiny_pipe.dit.blocks[0].attn.a_to_qkv
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn.a_to_qkv.lora_A.default.weight": torch.randn(2, layer.in_features, generator=g),
          "blocks.0.attn.a_to_qkv.lora_B.default.weight": torch.randn(layer.out_features, 2, generator=g) / 4}
    saved = {k: v.detach().clone() for k, v in tiny_pipe.dit.state_dict().items()}
    kw = dict(height=32, width=32, num_inference_steps=1, t5_sequence_length=8, seed=0, output_type="latent",
              progress_bar_cmd=lambda x: x)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        save_file({k: v.to(fp8) for k, v in sd.items()}, tmp_path / "fp8.safetensors")
        save_file({k: v.to(fp8).to(torch.bfloat16) for k, v in sd.items()}, tmp_path / "bf16.safetensors")
        for hotload in (True, False):
            outs = []
            for name in ("fp8", "bf16"):
                tiny_pipe.load_lora(tiny_pipe.dit, str(tmp_path / f"{name}.safetensors"), hotload=hotload)
                outs.append(tiny_pipe("a cat", **kw))
                tiny_pipe.clear_lora()
                tiny_pipe.dit.load_state_dict(saved)
            assert torch.equal(*outs), (fp8, hotload)


def test_scaled_fp8_marker_without_scales_is_refused(tiny_root, tmp_path):
    from diffsynth.loading.registry import build, detect
    from safetensors.torch import load_file
    sd = {f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
          for k, v in load_file(tiny_root / "flux1-dev.safetensors").items()}
    sd["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, tmp_path / "fp8-scaled.safetensors")
    with pytest.raises(CheckpointError, match=r"fp8-scaled.safetensors: marked as ComfyUI scaled fp8 "
                                              r"\('scaled_fp8'\) but holds no scale tensors"):
        for det in detect(str(tmp_path / "fp8-scaled.safetensors")):
            build(det, torch.float32, "cpu")


def test_ipadapter_scale_without_images_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match=r"ipadapter_scale=0.5 is given without ipadapter_images"):
        tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, t5_sequence_length=8, ipadapter_scale=0.5,
                  progress_bar_cmd=lambda x: x)


@pytest.mark.parametrize("value", [-3, float("nan"), float("inf")])
def test_negative_or_non_finite_vram_limit_is_refused(tiny_pipe, value):
    with pytest.raises(ValueError, match=r"vram_limit must be a number of GB >= 0"):
        tiny_pipe.enable_vram_management(vram_limit=value)
    with pytest.raises(ValueError, match=r"vram_limit must be a number of GB >= 0"):
        FluxImagePipeline.from_pretrained(device="cpu", vram_limit=value, model_configs=[
            ModelConfig(path="never-read.safetensors")])


def test_generate_refuses_a_negative_vram_limit_at_once(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model-dir", str(tmp_path), "--vram-limit", "-3"])
    assert e.value.code == 2
    assert "argument --vram-limit: must be a number of GB >= 0, got '-3'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- datasets

@pytest.mark.parametrize("name", ["metadata.csv", "metadata.json", "metadata.jsonl", "a.txt"])
def test_text_in_another_encoding_names_the_file_and_suggests_utf8(tmp_path, name):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rows = {"metadata.csv": "image,prompt\na.png,caf\xe9 au lait\n",
            "metadata.json": '[{"image": "a.png", "prompt": "caf\xe9"}]',
            "metadata.jsonl": '{"image": "a.png", "prompt": "caf\xe9"}\n', "a.txt": "caf\xe9 au lait"}
    (tmp_path / name).write_bytes(rows[name].encode("cp1252"))
    what = "caption file" if name.endswith(".txt") else "metadata file"
    with pytest.raises(DatasetError, match=rf"{re.escape(str(tmp_path / name))}: this {what} is not UTF-8 text "
                                           r"\(byte \d+: b'\\xe9'\); save it as UTF-8"):
        load_samples(str(tmp_path), None, ["image"])


def test_utf8_metadata_with_a_byte_order_mark_is_read(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "metadata.json").write_bytes('[{"image": "a.png", "prompt": "caf\xe9"}]'.encode("utf-8-sig"))
    assert load_samples(str(tmp_path), None, ["image"])[0].prompt == "caf\xe9"


def test_training_applies_the_exif_orientation(tmp_path):
    """A phone's portrait photo: landscape pixels (48x32) tagged "rotate 90 clockwise" (orientation 6)."""
    stored = Image.new("RGB", (48, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # a red corner at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    (tmp_path / "metadata.csv").write_text("image,prompt\nphone.png,a portrait\n")
    (sample,) = load_samples(str(tmp_path), None, ["image"])
    assert sample.size == (32, 48)  # portrait, for the target size and the buckets too
    image = ImageDataset([sample], [(32, 48)], [], 48, 32, 32 * 48)[0]["image"]
    assert image.size == (32, 48)
    assert image.getpixel((28, 4)) == (255, 0, 0) and image.getpixel((4, 4)) == (0, 0, 255)  # now top-right


def test_truncated_jpeg_fails_the_dataset_check(tmp_path):
    truncated_jpeg(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"a.jpg cannot be read as an image \(OSError: image file is truncated"):
        image_size(str(tmp_path / "a.jpg"))


# ----------------------------------------------------------------------------- wide images (16-bit, float)

GRADIENT = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


@pytest.mark.parametrize("wide", [
    Image.fromarray(GRADIENT.astype(np.uint16) * 257),                      # I;16, the full 16-bit range
    Image.fromarray(GRADIENT.astype(np.int32) * 257, "I"),                  # a 16-bit PNG as some readers give it
    Image.fromarray(GRADIENT.astype(np.float32) / 255, "F"),               # floats in 0..1
    Image.fromarray(GRADIENT.astype(np.float32) / 25.5 + 0.5, "F"),        # a depth map in metres: its min..max
], ids=["I;16", "I", "F 0..1", "F metres"])
def test_wide_images_are_converted_by_their_range_not_clipped(wide):
    assert np.array_equal(np.asarray(convert_image(wide, "L")), GRADIENT)
    assert np.array_equal(np.asarray(convert_image(wide)), np.repeat(GRADIENT[..., None], 3, -1))


def test_a_16_bit_png_is_read_as_its_8_bit_counterpart_by_the_pipeline_and_training(tmp_path):
    Image.fromarray(GRADIENT.astype(np.uint16) * 257).save(tmp_path / "depth16.png")
    Image.fromarray(GRADIENT).save(tmp_path / "depth8.png")
    with Image.open(tmp_path / "depth16.png") as wide, Image.open(tmp_path / "depth8.png") as narrow:
        assert wide.mode == "I;16"
        assert torch.equal(image_to_tensor(wide, 16, 16), image_to_tensor(narrow, 16, 16))
    dataset = ImageDataset([], [], [], 16, 16, 256)
    for mode in ("RGB", "L"):
        assert np.array_equal(np.asarray(dataset._image(str(tmp_path / "depth16.png"), (16, 16), mode)),
                              np.asarray(dataset._image(str(tmp_path / "depth8.png"), (16, 16), mode)))


def test_images_are_converted_in_one_place():
    """Every reader goes through ops.images.convert_image: a direct PIL .convert() would clip wide images."""
    package = Path(__file__).resolve().parents[1] / "diffsynth"
    direct = [f"{path.relative_to(package)}:{node.lineno}" for path in package.rglob("*.py")
              if path.name != "images.py" or path.parent.name != "ops"
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "convert"]
    assert direct == []


# ----------------------------------------------------------------------------- generate command line

def test_parameters_text_cannot_be_forged_through_the_prompt():
    text = png_metadata({"prompt": "a cat\nNegative prompt: evil\nSteps: 1", "negative_prompt": "",
                         "num_inference_steps": 2, "cfg_scale": 1.0, "embedded_guidance": 3.5}, 0, (64, 64),
                        ["m.safetensors"])["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a cat\\nNegative prompt: evil\\nSteps: 1" and len(lines) == 2
    assert escape_line("a\\nb") == "a\\\\nb"  # a literal backslash-n stays distinguishable


def test_generate_refuses_an_existing_output_before_loading_models(tmp_path, capsys):
    out = tmp_path / "cat.png"
    out.write_bytes(b"precious")
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                 "--output", str(out)] + ARGS) == 1
    assert "cat.png already exists: pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("output, match", [
    ("folder", "is a folder; give a file name"),
    ("x.gif", "the extension must be one of"),
    ("file.txt/x.png", "file.txt exists and is not a folder"),
])
def test_generate_checks_the_output_first(tmp_path, capsys, output, match):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                 "--output", str(tmp_path / output)] + ARGS) == 1
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--cfg-scale", "nan"], "cfg_scale must be finite, got nan"),
    (["--num-images", "0"], "num_images must be a positive integer"),
    (["--height", "100000"], "height must be a positive integer and at most 16384, got 100000"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
])
def test_generate_checks_generation_arguments_before_loading(tmp_path, capsys, extra, match):
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                 "--output", str(tmp_path / "o.png")] + ARGS + extra) == 1
    err = capsys.readouterr().err
    assert match in err and "missing.safetensors" not in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, match", [
    ("{not json", r"invalid JSON in this generation defaults file"),
    ('["height", 64]', r"this generation defaults file must hold a JSON object, got a list"),
    ('{"height": "64"}', r"height must be a positive integer, got '64'"),
    ('{"width": -64}', r"width must be a positive integer, got -64"),
])
def test_a_corrupt_generation_defaults_file_is_named(tiny_root, tmp_path, capsys, text, match):
    folder = tmp_path / "model"
    shutil.copytree(tiny_root, folder)
    (folder / "generation_defaults.json").write_text(text)
    assert main(quick_generate(folder, tmp_path / "x.png")) == 1
    err = capsys.readouterr().err
    assert re.search(re.escape(str(folder / "generation_defaults.json")) + ": " + match, err), err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_generate_reads_the_input_image_first(tmp_path, capsys):
    (tmp_path / "in.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x",
                 "--input-image", str(tmp_path / "in.png"), "--output", str(tmp_path / "o.png")] + ARGS) == 1
    assert f"--input-image {tmp_path / 'in.png'}: cannot be read as an image" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_generate_cuda_without_cuda_is_a_message(tmp_path, capsys):
    argv = ["generate", "--model", str(tmp_path / "m.safetensors"), "--prompt", "x", "--output",
            str(tmp_path / "o.png")] + ARGS[:-4] + ["--device", "cuda", "--dtype", "fp32"]
    assert main(argv) == 1
    assert "--device cuda: this machine/torch build has no CUDA device" in capsys.readouterr().err


def quick_generate(tiny_root, out) -> list[str]:
    return ["generate", "--model-dir", str(tiny_root), "--prompt", "a cat", "--seed", "1", "--output", str(out),
            "--height", "32", "--width", "32", "--steps", "1", "--t5-sequence-length", "8", "--device", "cpu"]


def test_generate_writes_jpeg_for_jpg(tiny_root, tmp_path):
    out = tmp_path / "cat.jpg"
    assert main(quick_generate(tiny_root, out)) == 0
    assert out.read_bytes()[:2] == b"\xff\xd8" and Image.open(out).format == "JPEG"
    assert os.listdir(tmp_path) == ["cat.jpg"]  # no temp file left


def test_generate_overwrites_only_when_asked(tiny_root, tmp_path):
    out = tmp_path / "cat.png"
    out.write_bytes(b"old")
    assert main(quick_generate(tiny_root, out)) == 1 and out.read_bytes() == b"old"
    assert main(quick_generate(tiny_root, out) + ["--overwrite"]) == 0 and Image.open(out).format == "PNG"


def test_train_entry_point_prints_the_message_not_a_traceback(tmp_path, capsys):
    """train.py calls diffsynth.training.main: a user error is one line on stderr and exit code 1."""
    from diffsynth.training import main as train_main
    assert train_main(["--dataset_base_path", str(tmp_path), "--learning_rate", "inf", "--guidance", "nan",
                       "--lora_base_model", "dit", "--model_paths", "[]"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: invalid arguments")
    assert "--learning_rate must be a finite number, got inf" in err and "--guidance must be a finite number" in err


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    """safetensors' writer creates its files 0600; a LoRA or checkpoint others in a shared folder cannot read
    is a surprise, so atomic writes give the mode a plain open() would."""
    import stat
    from diffsynth.ops.files import FILE_MODE, save_safetensors
    path = tmp_path / "lora.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o666 & ~mask
