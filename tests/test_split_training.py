"""Split training (`--task sft:data_process` then `--task sft:train`) and the low-memory training flags
(`--fp8_models`, `--offload_models`, `--enable_model_cpu_offload`, `--enable_optimizer_cpu_offload`), on tiny FLUX.2
[klein] models: each equals the plain run it stands for (same seed: same LoRA weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.testing.tiny_flux2 import build_tiny_flux2

pytestmark = pytest.mark.usefixtures("fresh_accelerate")
TARGETS = "to_q,to_k,to_v,to_out.0,to_qkv_mlp_proj"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return build_tiny_flux2(tmp_path_factory.mktemp("split") / "klein", seed=3, distilled=False)


def write_data(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:96]
    for i in range(2):
        Image.fromarray(np.stack([(x * 4 + 60 * i) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)) \
            .save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("image,prompt\n0.png,a dog\n1.png,a red cat\n")


def words(root, data, out, *extra, models=("text_encoder", "transformer", "vae"), metadata=True) -> list[str]:
    w = ["--dataset_base_path", str(data), "--max_pixels", "4096", "--model_paths",
         json.dumps([str(root / m) for m in models]), "--output_path", str(out), "--lora_base_model", "dit",
         "--lora_target_modules", TARGETS, "--lora_rank", "4", "--dataset_repeat", "2", "--seed", "5",
         "--learning_rate", "1e-2", "--report_to", "none", *extra]
    return w + (["--dataset_metadata_path", str(data / "metadata.csv")] if metadata else [])


def run(w: list[str]) -> dict:
    from diffsynth.training import build_parser, train
    return train(build_parser().parse_args(w))


def lora(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "epoch-0.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_split_training_equals_one_cached_run(klein, tmp_path):
    """data_process (encoders and VAE only, no DiT) writes the rows; sft:train (the DiT only) trains from them:
    the LoRA equals a one-command --cache_dir run's bit for bit (same seed, rows, sizes, noise, initialisation)."""
    data = tmp_path / "data"
    write_data(data)
    run(words(klein, data, tmp_path / "one", "--cache_dir", str(tmp_path / "cache")))
    done = run(words(klein, data, tmp_path / "cache_rows", "--task", "sft:data_process",
                     models=("text_encoder", "vae")))
    assert done["rows"] == 2 and done["built"] == 2 and done["module"].pipe.dit is None
    result = run(words(klein, tmp_path / "cache_rows", tmp_path / "two", "--task", "sft:train",
                       models=("transformer",), metadata=False))
    pipe = result["module"].pipe
    assert pipe.vae_encoder is None and pipe.text_encoder_qwen3 is None and result["steps"] == 4
    assert_same(lora(tmp_path / "two"), lora(tmp_path / "one"))


def test_split_training_refuses_mismatches(klein, tmp_path):
    from diffsynth.training.data import DatasetError
    data = tmp_path / "data"
    write_data(data)
    with pytest.raises(DatasetError, match="holds no split_cache.json"):
        run(words(klein, data, tmp_path / "x", "--task", "sft:train", models=("transformer",), metadata=False))
    run(words(klein, data, tmp_path / "rows", "--task", "sft:data_process", models=("text_encoder", "vae")))
    with pytest.raises(DatasetError, match="--max_pixels"):
        run(words(klein, tmp_path / "rows", tmp_path / "y", "--task", "sft:train", "--max_pixels", "2048",
                  models=("transformer",), metadata=False))
    with pytest.raises(ValueError, match="in float32; this run trains a flux2 DiT in bfloat16"):
        run(words(klein, tmp_path / "rows", tmp_path / "z", "--task", "sft:train", "--torch_dtype", "bf16",
                  models=("transformer",), metadata=False))
    with pytest.raises(ValueError, match="supported: sft, sft:data_process, sft:train"):
        run(words(klein, data, tmp_path / "w", "--task", "direct_distill"))


def fp8_rounded_copy(root, dest):
    """The klein folder with the transformer's matrices rounded through fp8 (what fp8 storage keeps)."""
    (dest / "transformer").mkdir(parents=True)
    for sub in root.iterdir():
        if sub.name != "transformer":
            (dest / sub.name).symlink_to(sub, target_is_directory=sub.is_dir())
    for f in (root / "transformer").iterdir():
        if f.suffix == ".safetensors":
            sd = load_file(str(f))
            save_file({k: v.to(torch.float8_e4m3fn).to(v.dtype) if v.ndim >= 2 else v for k, v in sd.items()},
                      str(dest / "transformer" / f.name))
        else:
            (dest / "transformer" / f.name).symlink_to(f)
    return dest


def test_fp8_dit_equals_training_on_fp8_rounded_weights(klein, tmp_path):
    """--fp8_models dit: the DiT's matrices are stored in fp8 and computed in fp32 with the LoRA on top; the LoRA
    equals the one trained on a DiT whose file was rounded to fp8 (and the DiT really holds fp8 tensors)."""
    data = tmp_path / "data"
    write_data(data)
    result = run(words(klein, data, tmp_path / "fp8", "--fp8_models", "dit", "--max_steps", "2"))
    stored = {p.dtype for n, p in result["module"].pipe.dit.named_parameters() if "lora_" not in n}
    assert torch.float8_e4m3fn in stored
    rounded = fp8_rounded_copy(klein, tmp_path / "rounded")
    run(words(rounded, data, tmp_path / "ref", "--max_steps", "2"))
    assert_same(load_file(str(tmp_path / "fp8" / "step-2.safetensors")),
                load_file(str(tmp_path / "ref" / "step-2.safetensors")), atol=1e-6)


def test_model_cpu_offload_equals_the_plain_run(klein, tmp_path):
    """--enable_model_cpu_offload (and with --enable_optimizer_cpu_offload: the LoRA weights, their gradients and
    AdamW's state in CPU RAM, the LoRA layers streamed as well) trains the same LoRA as the plain run."""
    data = tmp_path / "data"
    write_data(data)
    run(words(klein, data, tmp_path / "plain", "--max_steps", "2", "--use_gradient_checkpointing"))
    result = run(words(klein, data, tmp_path / "offload", "--max_steps", "2", "--enable_model_cpu_offload"))
    assert result["module"].pipe.dit.gradient_checkpointing
    both = run(words(klein, data, tmp_path / "both", "--max_steps", "2", "--enable_model_cpu_offload",
                     "--enable_optimizer_cpu_offload"))
    from diffsynth.loading.vram import Cast
    lora_layers = [m for n, m in both["module"].pipe.dit.named_modules() if n.endswith(".lora_A.default")]
    assert lora_layers and all(isinstance(m, Cast) and m.weight.device.type == "cpu" for m in lora_layers)
    expected = load_file(str(tmp_path / "plain" / "step-2.safetensors"))
    for out in ("offload", "both"):
        assert_same(load_file(str(tmp_path / out / "step-2.safetensors")), expected, atol=1e-6)


def test_model_cpu_offload_streams_each_layer_and_keeps_no_block_weight_for_backward(klein, tmp_path, monkeypatch):
    """The mechanism, counted (a CPU has no second device to measure): under --enable_model_cpu_offload every
    frozen DiT block layer fetches its weights for the forward and again for the recomputation in the backward
    pass (2 fetches a step), and autograd keeps no block weight between forward and backward; the plain run
    fetches nothing and keeps the block weights (those the linear layers save for the input gradient: all but the
    first block's, whose input needs none)."""
    from diffsynth.loading import vram
    data = tmp_path / "data"
    write_data(data)
    fetched: dict[int, int] = {}
    original = vram.weight_for_compute

    def counting(module, device, dtype):
        fetched[id(module)] = fetched.get(id(module), 0) + 1
        return original(module, device, dtype)

    monkeypatch.setattr(vram, "weight_for_compute", counting)

    def one_step(out, *extra):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            result = run(words(klein, data, tmp_path / out, "--max_steps", "1", *extra))
        dit = result["module"].pipe.dit
        blocks = [m for n, m in dit.named_modules() if ("blocks." in n and n.endswith("base_layer"))]
        pointers = {m.weight.untyped_storage().data_ptr() for m in blocks}
        kept = [t for t in saved if t.untyped_storage().data_ptr() in pointers]
        return blocks, kept

    blocks, kept = one_step("plain")
    assert not fetched and len({t.untyped_storage().data_ptr() for t in kept}) >= len(blocks) // 2
    blocks, kept = one_step("offload", "--enable_model_cpu_offload")
    assert blocks and [fetched.get(id(m)) for m in blocks] == [2] * len(blocks) and not kept


# DiffSynth-Studio 2.0's training arguments (diffusion/parsers.py add_general_config + image size, FLUX.2's
# train.py): each is parsed; the ones not implemented are refused by name when given.
STUDIO_FLAGS = {"--dataset_repeat": "1", "--dataset_num_workers": "0", "--data_file_keys": "image",
                "--model_paths": None, "--extra_inputs": None, "--fp8_models": "dit", "--offload_models": "dit",
                "--learning_rate": "1e-4", "--num_epochs": "1", "--trainable_models": None,
                "--find_unused_parameters": True, "--weight_decay": "0.01", "--task": "sft",
                "--customized_optimizer": "torch.optim.Adam", "--output_path": None, "--remove_prefix_in_ckpt": None,
                "--save_steps": "1", "--lora_base_model": "dit", "--lora_target_modules": TARGETS, "--lora_rank": "4",
                "--use_gradient_checkpointing": True, "--use_gradient_checkpointing_offload": True,
                "--gradient_accumulation_steps": "1", "--enable_model_cpu_offload": True,
                "--enable_optimizer_cpu_offload": True, "--enable_tensorboard_log": True, "--enable_csv_log": True,
                "--height": "64", "--width": "64", "--max_pixels": "4096", "--tokenizer_path": None,
                "--initialize_model_on_cpu": True}
REFUSED = {"--quant_options": "x:bitsandbytes_nf4", "--template_model_id_or_path": "a:b",
           "--enable_lora_hot_loading": True, "--cpu_offload_split_threshold": "100", "--enable_swanlab_log": True,
           "--swanlab_project": "p", "--enable_wandb_log": True, "--wandb_project": "p"}


def flag_words(flags: dict) -> list[str]:
    return [w for k, v in flags.items() if v is not None for w in ([k] if v is True else [k, v])]


def test_studio_training_arguments_parse_or_are_refused_by_name(klein, tmp_path):
    from diffsynth.training import build_parser, check_args
    base = ["--dataset_base_path", str(tmp_path), "--model_paths", json.dumps([str(klein / "transformer")])]
    args = check_args(build_parser().parse_args(base + flag_words(STUDIO_FLAGS)))
    assert args.fp8_models == ["dit"] and args.use_gradient_checkpointing and args.report_to == "tensorboard"
    with pytest.raises(ValueError) as e:
        check_args(build_parser().parse_args(base + ["--lora_base_model", "dit"] + flag_words(REFUSED)))
    assert all(f"{flag}: " in str(e.value) for flag in REFUSED), str(e.value)
    with pytest.raises(ValueError, match="--enable_optimizer_cpu_offload goes with --enable_model_cpu_offload"):
        check_args(build_parser().parse_args(base + ["--lora_base_model", "dit", "--enable_optimizer_cpu_offload"]))


def test_customized_optimizer_preset_lora_and_csv_log(klein, tmp_path):
    """--customized_optimizer builds the named class; --preset_lora_path merges a LoRA before training (the
    run differs from one without it); --enable_csv_log writes one line per step."""
    data = tmp_path / "data"
    write_data(data)
    first = run(words(klein, data, tmp_path / "a", "--max_steps", "2", "--customized_optimizer", "torch.optim.Adam",
                      "--enable_csv_log"))
    assert (tmp_path / "a" / "loss_log.csv").read_text().count("\n") == 3
    preset = tmp_path / "a" / "step-2.safetensors"
    second = run(words(klein, data, tmp_path / "b", "--max_steps", "2", "--customized_optimizer", "torch.optim.Adam",
                       "--preset_lora_path", str(preset), "--preset_lora_model", "dit"))
    assert second["losses"][0] != first["losses"][0]
    with pytest.raises(ValueError, match="is not an optimizer class"):
        run(words(klein, data, tmp_path / "c", "--customized_optimizer", "torch.nn.Linear"))
    with pytest.raises(ValueError, match=r"--fp8_models \['unet'\]: no such model"):
        run(words(klein, data, tmp_path / "d", "--fp8_models", "unet"))
    full = words(klein, data, tmp_path / "e", "--fp8_models", "dit", "--trainable_models", "dit")
    del full[full.index("--lora_base_model"):full.index("--lora_base_model") + 2]
    with pytest.raises(ValueError, match="fp8 is for frozen weights"):
        run(full)
