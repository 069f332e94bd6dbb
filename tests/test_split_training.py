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
