"""`diffsynth generate | inspect` end to end on the tiny model (`demo`: tests/test_nano.py)."""
import json

import numpy as np
from PIL import Image

from diffsynth.cli import main
from diffsynth.testing import build_tiny_comfy_checkpoint

ARGS = ["--height", "64", "--width", "96", "--steps", "2", "--t5-sequence-length", "16", "--device", "cpu",
        "--dtype", "fp32"]


def test_generate_writes_png_with_parameters(tiny_root, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", "--model-dir", str(tiny_root), "--prompt", "a cat", "--negative-prompt", "dog",
                 "--cfg-scale", "2", "--seed", "42", "--output", str(out)] + ARGS) == 0
    assert f"saved {out}" in capsys.readouterr().out
    image = Image.open(out)
    assert image.size == (96, 64)
    text = image.text["parameters"]
    assert text.startswith("a cat\nNegative prompt: dog\nSteps: 2")
    assert "Seed: 42" in text and "CFG scale: 2.0" in text and "Size: 96x64" in text
    call = json.loads(image.text["diffsynth"])
    assert call["seed"] == 42 and call["num_inference_steps"] == 2
    assert call["embedded_guidance"] == 3.5 and "Guidance: 3.5" in text  # FluxImagePipeline's default
    assert call["t5_sequence_length"] == 16 and call["t5_sequence_length_used"] == 16


def test_generate_same_seed_reproduces_and_batch_numbers_files(tiny_root, tmp_path):
    common = ["generate", "--model-dir", str(tiny_root), "--prompt", "a cat", "--seed", "5"] + ARGS
    main(common + ["--output", str(tmp_path / "a.png")])
    main(common + ["--output", str(tmp_path / "b.png"), "--num-images", "2"])
    main(common + ["--output", str(tmp_path / "a2.png")])
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "a2.png").tobytes()
    # In a batch, CPU GEMMs may block the rows differently: the same image up to float rounding.
    single, batched = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("a.png", "b-0.png"))
    assert np.abs(single - batched).max() <= 2
    assert json.loads(Image.open(tmp_path / "b-1.png").text["diffsynth"])["seed"] == 6


def test_generate_from_explicit_files_and_img2img(tiny_root, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(init)
    files = [str(tiny_root / p) for p in ("flux1-dev.safetensors", "text_encoder/model.safetensors",
                                          "text_encoder_2", "ae.safetensors")]
    assert main(["generate", "--model", *files, "--prompt", "a cat", "--input-image", str(init),
                 "--denoising-strength", "0.5", "--output", str(tmp_path / "x.png")] + ARGS) == 0
    assert Image.open(tmp_path / "x.png").size == (96, 64)


def test_generate_reports_errors_cleanly(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x"] + ARGS) == 1
    assert "missing.safetensors" in capsys.readouterr().err


def test_inspect_reports_family_format_architecture(tiny_root, tmp_path, capsys):
    aio = build_tiny_comfy_checkpoint(tmp_path / "aio.safetensors")
    assert main(["inspect", "--json", str(tiny_root / "flux1-dev.safetensors")]) == 0
    dit = json.loads(capsys.readouterr().out)["models"][0]
    assert (dit["family"], dit["format"], dit["components"]) == ("flux-dit", "bfl", ["dit"])
    assert dit["architecture"]["double_blocks"] == 2 and dit["architecture"]["guidance_embedder"] is True
    assert dit["dtypes"] == {"float32": dit["dtypes"]["float32"]} and dit["parameters"] > 0
    main(["inspect", str(aio)])
    text = capsys.readouterr().out
    for family in ("flux-dit", "clip", "t5", "flux-vae"):
        assert family in text


def test_inspect_lora_reports_dialect_rank_alpha_targets(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
               "lora_unet_nonsense_layer.lora_down.weight": torch.randn(4, 32),
               "lora_unet_nonsense_layer.lora_up.weight": torch.randn(32, 4)}, tmp_path / "k.safetensors")
    assert main(["inspect", "--json", str(tmp_path / "k.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)["lora"]
    assert info["dialect"] == "kohya" and info["layers"] == ["blocks.0.attn.a_to_qkv"]
    assert info["ranks"] == {"4": 1}  # the unknown layer is listed, not counted
    assert info["alphas"] == {"2.0": 1}
    assert any("nonsense" in k for k in info["unknown"])


def test_inspect_lora_against_a_dit_lists_what_would_not_apply(tiny_root, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4),
               "lora_unet_double_blocks_18_img_attn_qkv.lora_down.weight": torch.randn(4, 32),
               "lora_unet_double_blocks_18_img_attn_qkv.lora_up.weight": torch.randn(96, 4)},
              tmp_path / "deep.safetensors")
    assert main(["inspect", "--json", str(tmp_path / "deep.safetensors"),
                 "--dit", str(tiny_root / "flux1-dev.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)["lora"]
    assert len(info["not_applied"]) == 1 and "blocks.18" in str(info["not_applied"])


def _parse(argv):
    from diffsynth.cli import build_parser
    return build_parser().parse_args(argv)


def write_tiny_lora(dit_file, path):
    """A rank-2 ComfyUI-style LoRA on the first double block's image qkv of the DiT in `dit_file`."""
    from diffsynth.ops.files import save_safetensors
    from diffsynth.loading.registry import detect
    import torch
    refs = detect(str(dit_file))[0].refs
    g = torch.Generator().manual_seed(0)
    out_f, in_f = refs["double_blocks.0.img_attn.qkv.weight"].shape
    save_safetensors({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, in_f, generator=g),
                      "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(out_f, 2, generator=g)},
                     path)
    return path


def test_generate_fit_and_speed_options(tiny_root, tmp_path, capsys):
    """--offload-dtype stores the DiT and T5 in fp8 (CLIP/VAE as they are) under VRAM management; caches,
    LoRAs and their strengths reach the pipeline and the PNG's call record."""
    import torch
    from diffsynth.cli import build_pipeline, model_paths
    from diffsynth.ops.attention import get_attention_backend, set_attention_backend
    lora = str(write_tiny_lora(tiny_root / "flux1-dev.safetensors", tmp_path / "lora.safetensors"))
    argv = ["generate", "--model-dir", str(tiny_root), "--prompt", "a cat", "--seed", "3"] + ARGS
    try:
        args = _parse(argv + ["--offload-dtype", "fp8_e4m3fn", "--attention", "math"])
        pipe = build_pipeline(args, model_paths(args))
        assert get_attention_backend() == "math"
    finally:
        set_attention_backend("auto")
    assert pipe.vram_management_enabled
    assert pipe.dit.blocks[0].attn.a_to_qkv.weight.dtype == torch.float8_e4m3fn
    t5_weights = {p.dtype for p in pipe.text_encoder_2.parameters() if p.dim() == 2}
    assert t5_weights == {torch.float8_e4m3fn}
    assert {p.dtype for p in pipe.vae_decoder.parameters()} == {torch.float32}
    assert {p.dtype for p in pipe.text_encoder_1.parameters()} == {torch.float32}

    base, fp8, weak, strong = (tmp_path / f"{n}.png" for n in ("base", "fp8", "weak", "strong"))
    assert main(argv + ["--output", str(base)]) == 0
    assert main(argv + ["--output", str(fp8), "--offload-dtype", "fp8_e4m3fn", "--tea-cache", "0.3"]) == 0
    assert main(argv + ["--output", str(weak), "--lora", lora, "--lora-alpha", "0"]) == 0
    assert main(argv + ["--output", str(strong), "--lora", lora, "--lora-alpha", "1.5"]) == 0
    pixels = {f.stem: np.asarray(Image.open(f), dtype=np.int16) for f in (base, fp8, weak, strong)}
    assert np.array_equal(pixels["weak"], pixels["base"])  # alpha 0 adds nothing
    assert np.abs(pixels["strong"] - pixels["base"]).max() > 10
    assert 0 < np.abs(pixels["fp8"] - pixels["base"]).mean() < 20  # fp8 storage: close, not equal
    call = json.loads(Image.open(fp8).text["diffsynth"])
    assert call["tea_cache_l1_thresh"] == 0.3 and call["loras"] == []
    assert json.loads(Image.open(strong).text["diffsynth"])["loras"] == [[lora, 1.5]]
    assert Image.open(strong).text["parameters"].startswith("a cat <lora:lora:1.5>\nSteps: 2")


def test_generate_option_errors_are_reported(tiny_root, tmp_path, capsys):
    argv = ["generate", "--model-dir", str(tiny_root), "--prompt", "a cat"] + ARGS
    lora = str(write_tiny_lora(tiny_root / "flux1-dev.safetensors", tmp_path / "lora.safetensors"))
    assert main(argv + ["--lora", lora, "--lora-alpha", "1", "--lora-alpha", "2"]) == 1
    assert "2 --lora-alpha values for 1 --lora files" in capsys.readouterr().err
    assert main(argv + ["--lora", str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    from diffsynth.ops.attention import available_backends
    if "flash" not in available_backends():
        assert main(argv + ["--attention", "flash"]) == 1
        assert "flash-attn" in capsys.readouterr().err


def test_generate_compile_flag_compiles(tiny_root, monkeypatch):
    from diffsynth import FluxImagePipeline
    from diffsynth.cli import build_pipeline, model_paths
    compiled = []
    monkeypatch.setattr(FluxImagePipeline, "compile", lambda self, **kw: compiled.append(self) or self)
    args = _parse(["generate", "--model-dir", str(tiny_root), "--prompt", "x", "--compile"] + ARGS)
    pipe = build_pipeline(args, model_paths(args))
    assert compiled == [pipe]


def _heavy_imports(*argv: str) -> tuple[int, set[str]]:
    """(exit status, heavy top-level packages imported) of `python -m diffsynth.cli ARGV` in a fresh process."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffsynth.cli", *argv],
                          capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.returncode, modules & {"torch", "transformers", "numpy", "safetensors", "accelerate"}


def test_help_and_argument_errors_do_not_import_torch():
    """`diffsynth --help` took 17-39 s on a busy machine: torch is imported only once a command runs."""
    for argv, status in ((["--help"], 0), (["generate", "--help"], 0), (["train", "--help"], 0),
                         (["demo", "--help"], 0), (["generate", "--model", "x"], 2), (["nonsense"], 2)):
        assert _heavy_imports(*argv) == (status, set()), argv


def test_help_describes_every_option_and_names_every_command():
    from diffsynth.cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert all(name in parser.format_help().split("options:")[0] for name in commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    demo_help = commands["demo"].format_help()
    assert "(default: demo_output/image.png)" in demo_help and "(default: fp32)" in demo_help
    assert "(default: 30)" in commands["generate"].format_help()  # --steps
    assert "printed" in commands["generate"]._option_string_actions["--seed"].help


def test_generate_prints_and_stores_the_random_seed(tiny_root, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert main(["generate", "--model-dir", str(tiny_root), "--prompt", "a cat", "--output", str(out)] + ARGS) == 0
    seed = json.loads(Image.open(out).text["diffsynth"])["seed"]
    assert f"saved {out} (seed {seed})" in capsys.readouterr().out


def test_inspect_a_model_folder_describes_each_file_as_generate_reads_it(tiny_root, tmp_path, capsys):
    assert main(["inspect", str(tiny_root)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{tiny_root}: 4 model file(s), as `generate --model-dir` reads them")
    for entry, family in (("ae.safetensors", "flux-vae"), ("flux1-dev.safetensors", "flux-dit"),
                          ("text_encoder", "clip"), ("text_encoder_2", "t5")):
        assert f"{tiny_root / entry}\n  {family} (" in text
    assert text.rstrip().endswith("tokenizer, tokenizer_2")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "ae.safetensors").symlink_to(tiny_root / "ae.safetensors")
    (folder / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert main(["inspect", "--json", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in report["files"]] == [str(folder / "ae.safetensors"), str(folder / "junk.safetensors")]
    assert report["files"][0]["models"][0]["family"] == "flux-vae" and "junk.safetensors" in report["files"][1]["error"]
    assert main(["inspect", str(tiny_root / "text_encoder_2")]) == 0  # one model's folder: one description
    assert capsys.readouterr().out.startswith(f"{tiny_root / 'text_encoder_2'}\n  t5 (hf layout)")
