"""Command line: `diffsynth COMMAND` (the commands are listed by `diffsynth --help`).

torch and the models are imported only once a command runs: help and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .generation import (GENERATION_KEYS, apply_folder_defaults, build_pipeline, call_params, compute_target,
                         fill_defaults, loras, model_files_in, model_paths, offloading, png_metadata)
from .ops.names import ATTENTION_BACKENDS, COMPUTE_DTYPES, FP8_DTYPES, PARALLEL_MODES


def add_generation_args(p: argparse.ArgumentParser, require_prompt: bool = True, seed: int | None = None) -> None:
    """The generation options; `seed`: the default seed (None: a random one, printed)."""
    p.add_argument("--prompt", required=require_prompt, help="what to generate")
    p.add_argument("--negative-prompt", default="", help="what to avoid (used when --cfg-scale > 1)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="real classifier-free guidance; 1 = off (FLUX.1-dev uses --embedded-guidance)")
    p.add_argument("--embedded-guidance", type=float,
                   help="distilled guidance strength (FLUX.1-dev, FLUX.2-dev; default: the pipeline's, 3.5 for FLUX.1, "
                        "4.0 for FLUX.2)")
    p.add_argument("--t5-sequence-length", type=int, default=512, help="T5 tokens the prompt is padded/truncated to")
    p.add_argument("--input-image", help="image for image-to-image")
    p.add_argument("--edit-image", action="append", metavar="FILE",
                   help="FLUX.2: a reference image to edit or combine (repeatable, in order)")
    p.add_argument("--edit-image-auto-resize", action=argparse.BooleanOptionalAction, default=True,
                   help="FLUX.2: scale each --edit-image to about 1024x1024 (--no-edit-image-auto-resize: keep "
                        "its size, cropped to multiples of 16)")
    p.add_argument("--denoising-strength", type=float, default=1.0,
                   help="image-to-image: 1 = ignore the input image, lower keeps more of it")
    p.add_argument("--height", type=int,
                   help="pixels, rounded up to a multiple of 16 (default: the input image's, else 1024)")
    p.add_argument("--width", type=int,
                   help="pixels, rounded up to a multiple of 16 (default: the input image's, else 1024)")
    random_seed = "a random seed" if seed is None else str(seed)
    p.add_argument("--seed", type=int, default=seed,
                   help=f"image i of a batch uses seed + i (default: {random_seed}; the seed used is printed with "
                        "each saved file and stored in its PNG parameters)")
    p.add_argument("--rand-device", default="cpu",
                   help="where the noise is drawn: cpu (same noise on every machine) or cuda")
    p.add_argument("--sigma-shift", type=float, help="timestep shift of the schedule (default 3)")
    p.add_argument("--steps", type=int, default=30, dest="num_inference_steps", help="denoising steps")
    p.add_argument("--tiled", action="store_true", help="decode/encode the VAE in tiles (less memory)")
    p.add_argument("--tile-size", type=int, default=128,
                   help="VAE tile size in latent pixels (128 = 1024 image pixels)")
    p.add_argument("--tile-stride", type=int, default=64, help="VAE tile stride in latent pixels")
    p.add_argument("--num-images", type=int, default=1, help="images generated in one batch")
    p.add_argument("--tea-cache", type=float, dest="tea_cache_l1_thresh", metavar="THRESH",
                   help="TeaCache threshold (e.g. 0.4; larger skips more steps)")
    p.add_argument("--fbcache", type=float, dest="fbcache_thresh", metavar="THRESH",
                   help="First-Block-Cache threshold (e.g. 0.1)")


STORAGE_DTYPES = (*COMPUTE_DTYPES, *FP8_DTYPES)


def gigabytes(text: str) -> float:
    """--vram-limit / --vram-buffer: a finite number >= 0, refused by argparse before anything loads."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of GB >= 0, got {text!r}")
    return value


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fitting and speed")
    g.add_argument("--offload", action="store_true",
                   help="store weights in CPU RAM; layers stay on the device while under --vram-limit, the rest "
                        "stream per call (enable_vram_management)")
    g.add_argument("--offload-dtype", choices=STORAGE_DTYPES,
                   help="storage dtype of the DiT and T5 files (e.g. fp8_e4m3fn); implies --offload")
    g.add_argument("--vram-limit", type=gigabytes, metavar="GB",
                   help="GB the models may keep on the device (default: its free memory); implies --offload")
    g.add_argument("--vram-buffer", type=gigabytes, default=0.5, metavar="GB", help="GB kept free under --vram-limit")
    g.add_argument("--lora", action="append", default=[], metavar="FILE", help="a LoRA file (repeatable)")
    g.add_argument("--lora-alpha", action="append", type=float, default=[], metavar="A",
                   help="strength of each --lora, in order (default 1.0 each)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto", help="attention backend (process-wide)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (regional)")


def check_loras(args) -> None:
    """Before any model loads: --lora-alpha counts and ranges, --lora files that exist and are no models."""
    from .loading.lora.apply import check_strength
    from .loading.lora.formats import refuse_model_checkpoint
    loras(args)  # the count of --lora-alpha values
    for alpha in args.lora_alpha:
        check_strength(alpha, "--lora-alpha")
    for path in args.lora:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {path}: no such file")
        refuse_model_checkpoint(path)


def output_paths(output: str, num_images: int) -> list[str]:
    out = Path(output)
    return [str(out)] if num_images == 1 else [str(out.with_name(f"{out.stem}-{i}{out.suffix}"))
                                               for i in range(num_images)]


def check_outputs(paths: list[str], overwrite: bool) -> None:
    """Before any model loads: a known image extension, a writable folder, and no file silently replaced."""
    from .ops.files import check_writable, image_format, remove_stale_temps
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"--output {path} is a folder; give a file name such as {path}/image.png")
        image_format(path)
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"--output {path} already exists: pass --overwrite to replace it")
    folder = Path(paths[0]).parent.resolve()
    check_writable(folder, "the folder of --output")
    remove_stale_temps(folder)  # half-written images of killed runs (only those whose process is gone)


def open_input_image(path: str | None, option: str = "--input-image"):
    """The decoded image of `option` (decoded now: a damaged file fails before the models load)."""
    if path is None:
        return None
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{option} {path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def cmd_generate(args) -> list[str]:
    from .ops import parallel
    apply_folder_defaults(args)
    paths, images = check_generation(args)
    print(f"will write {', '.join(paths)}")
    models = model_paths(args)
    done = False
    try:
        written = write_images(args, build_pipeline(args, models), models, paths, images)
        done = True
        return written
    finally:
        if args.parallel:
            parallel.shutdown(wait_for_peers=done)  # after an error the other ranks may never reach the barrier


def check_generation(args, more_outputs: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """Everything about a generation that can be wrong, checked before any model loads: the pipeline's
    argument checks, the input images, the output paths (with `more_outputs`, files written besides the
    images) and the device. Returns (image paths, the image arguments: input_image and, when given,
    edit_image)."""
    from .ops.devices import check_device
    from .pipelines.checks import check_call_args
    from . import FluxImagePipeline
    # no file is read yet, so the family is unknown: an unset option is checked with FLUX.1's default (both
    # families' defaults are valid); the call itself gets its own pipeline's (write_images)
    params = fill_defaults(FluxImagePipeline, {k: getattr(args, k) for k in GENERATION_KEYS})
    images = {"input_image": open_input_image(args.input_image, "--input-image")}
    if getattr(args, "edit_image", None):
        images["edit_image"] = [open_input_image(p, "--edit-image") for p in args.edit_image]
    check_call_args({**params, **images})
    if args.parallel:
        from .ops.parallel import check_mode
        check_mode(args.parallel)
        if args.parallel == "tensor" and (args.lora or args.compile or offloading(args)):
            raise ValueError("--parallel tensor does not combine with --lora, --compile or offloading yet")
    check_loras(args)
    paths = output_paths(args.output, args.num_images)
    check_outputs([*paths, *more_outputs], args.overwrite)
    check_device(compute_target(args)[0], "--device")
    return paths, images


def call_record(args, pipe, params: dict) -> dict:
    """What the saved files record of a call besides its arguments: the input image's file, the LoRAs, and
    the T5 length actually used (a tokenizer caps it: flux-nano's at 8)."""
    from .models.flux_text_encoders import t5_length
    tokenizer = getattr(pipe, "tokenizer_2", None)  # (FLUX.2 has no T5)
    used = t5_length(tokenizer, params["t5_sequence_length"]) if tokenizer is not None else None
    return {**params, "input_image": args.input_image, "edit_image": getattr(args, "edit_image", None),
            "loras": loras(args), "t5_sequence_length_used": used}


def write_images(args, pipe, models: list[str], paths: list[str], image_args: dict) -> list[str]:
    """Run the pipeline with the generation arguments and save the image(s) to `paths` (in a parallel run,
    every process generates and rank 0 writes)."""
    from .ops.files import save_image
    from .ops.parallel import is_main_process
    params = fill_defaults(type(pipe), {k: getattr(args, k) for k in GENERATION_KEYS})
    images = pipe(**call_params(type(pipe), {**params, **image_args}))
    if not is_main_process():
        return paths
    images = images if isinstance(images, list) else [images]
    for image, path in zip(images, paths):
        seed = image.info["seed"]
        save_image(image, path, png_metadata(call_record(args, pipe, params), seed, image.size, models),
                   overwrite=args.overwrite)
        print(f"saved {path} (seed {seed})")
    return paths


def is_model_folder(path: str) -> bool:
    """A folder of several checkpoints (what --model-dir takes), not one model's folder (config.json, shards)."""
    root = Path(path)
    one_model = (root / "config.json").is_file() or any(root.glob("*.index.json"))
    return root.is_dir() and not one_model


def describe_file(path: str, dit: str | None) -> dict:
    """What `inspect` reports for one file (or one model's folder): the models it holds, or the LoRA it is."""
    from .ops.files import scan
    from .loading.lora import describe_lora
    from .loading.registry import describe, detect, dit_config, looks_like_lora
    if looks_like_lora(scan(path)):
        return {"file": path, "lora": describe_lora(path, dit_config(detect(dit)[0]) if dit else None)}
    return {"file": path, "models": [describe(d) for d in detect(path)]}


def cmd_inspect(args) -> None:
    for path in args.files:
        if not is_model_folder(path):
            report = describe_file(path, args.dit)
            print(json.dumps(report, indent=2, default=str) if args.json else _pretty_any(report))
            continue
        reports = []
        for entry in model_files_in(path):  # each file as `generate --model-dir` reads it
            try:
                reports.append(describe_file(entry, args.dit))
            except ValueError as e:  # (CheckpointError too) one unreadable file does not hide the others
                reports.append({"file": entry, "error": str(e)})
        others = sorted(p.name for p in Path(path).iterdir() if str(p) not in {r["file"] for r in reports})
        folder = {"folder": path, "files": reports, "not_read_as_models": others}
        print(json.dumps(folder, indent=2, default=str) if args.json else _pretty_folder(folder))


def _pretty_any(report: dict) -> str:
    if "error" in report:
        return f"{report['file']}\n  not recognised: {report['error']}"
    return _pretty_lora(report) if "lora" in report else _pretty(report)


def _pretty_folder(folder: dict) -> str:
    lines = [f"{folder['folder']}: {len(folder['files'])} model file(s), as `generate --model-dir` reads them"]
    lines += [_pretty_any(r) for r in folder["files"]]
    if folder["not_read_as_models"]:
        lines.append(f"not read as models (tokenizers are read beside their encoder, generation_defaults.json "
                     f"sets default sizes): {', '.join(folder['not_read_as_models'])}")
    return "\n".join(lines)


def _pretty_lora(report: dict) -> str:
    info = report["lora"]
    lines = [report["file"], "  LoRA"]
    lines += [f"    {k}: {v}" for k, v in info.items() if not isinstance(v, (list, dict)) or len(str(v)) < 200]
    lines += [f"    {k}: {len(v)} entries" for k, v in info.items() if isinstance(v, (list, dict)) and len(str(v)) >= 200]
    return "\n".join(lines)


def _pretty(report: dict) -> str:
    lines = [report["file"]]
    for m in report["models"]:
        lines.append(f"  {m['family']} ({m['format']} layout) -> {', '.join(m['components'])}")
        lines.append(f"    parameters: {m['parameters']:,}   dtypes: {m['dtypes']}")
        for k, v in m.get("architecture", {}).items():
            lines.append(f"    {k}: {v}")
        if "quant_types" in m:
            lines.append(f"    quant types: {m['quant_types']}")
    return "\n".join(lines)


def grid_path(output: str) -> str:
    """Where `demo` puts its grid: beside --output and named after it (image.png -> image-grid.png)."""
    out = Path(output)
    return str(out.with_name(f"{out.stem}-grid.png"))


def cmd_demo(args) -> None:
    """flux-nano, shipped in the package: --prompt writes that image; without it, the default prompt's
    image and a grid of several prompts (<output>-grid.png beside --output)."""
    from .nano import demo
    args.model, args.tokenizer_1, args.tokenizer_2 = None, None, None
    apply_folder_defaults(args)
    grid = grid_path(args.output) if args.prompt is None else None
    args.prompt = demo.DEFAULT_PROMPT if args.prompt is None else args.prompt
    paths, image_args = check_generation(args, more_outputs=(grid,) if grid else ())
    print(f"will write {', '.join([*paths, *([grid] if grid else [])])}")
    models = model_paths(args)
    pipe = build_pipeline(args, models)
    write_images(args, pipe, models, paths, image_args)
    if grid:
        write_grid(args, pipe, models, grid, image_args)


def write_grid(args, pipe, models: list[str], path: str, image_args: dict) -> None:
    """The demo's grid: every generation argument applies to each cell (one image per prompt)."""
    from .nano import demo
    from .ops.files import save_image
    params = {**fill_defaults(type(pipe), {k: getattr(args, k) for k in GENERATION_KEYS}), "num_images": 1}
    images = [pipe(**call_params(type(pipe), {**params, **image_args, "prompt": p}), progress_bar_cmd=lambda x: x)
              for p in demo.GRID_PROMPTS]
    record = call_record(args, pipe, {**params, "prompt": " | ".join(demo.GRID_PROMPTS)})
    text = png_metadata({**record, "grid": list(demo.GRID_PROMPTS)}, images[0].info["seed"], images[0].size, models)
    save_image(demo.make_grid(images, list(demo.GRID_PROMPTS)), path, text, overwrite=args.overwrite)
    print(f"saved {path} ({', '.join(demo.GRID_PROMPTS)})")


def cmd_train(args) -> None:
    from .training import train
    train(args)


def cmd_ui(args) -> None:
    from .ui.launch import serve
    serve(args)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help already states it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, "", [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="text-to-image / image-to-image from checkpoint files",
                         formatter_class=HelpFormatter)
    gen.add_argument("--model", nargs="+", help="checkpoint files or folders (DiT, VAE, CLIP, T5, or all-in-one)")
    gen.add_argument("--model-dir", help="a model folder in the FLUX.1-dev or a FLUX.2 [klein] (diffusers) layout")
    gen.add_argument("--tokenizer-1", help="CLIP (FLUX.2: Qwen) tokenizer folder (default: tokenizer/ beside "
                     "text_encoder/)")
    gen.add_argument("--tokenizer-2", help="T5 tokenizer folder (default: tokenizer_2/ beside text_encoder_2/)")
    gen.add_argument("--device", help="compute device: cuda, cuda:1, mps, cpu (default: cuda when this machine "
                                      "has it, else cpu)")
    gen.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: bf16 on cuda, else fp32)")
    gen.add_argument("--output", default="image.png", help="image file; .png (with the parameters), .jpg or .webp "
                     "(numbered when --num-images > 1)")
    gen.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    gen.add_argument("--parallel", choices=PARALLEL_MODES,
                     help="multi-device inference, under `torchrun --nproc-per-node N --no-python diffsynth "
                     "generate ...`: 'context' splits the DiT's tokens over the processes, 'tensor' its heads "
                     "and MLP channels")
    add_generation_args(gen)
    add_runtime_args(gen)
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", help="what a checkpoint file is recognised as", formatter_class=HelpFormatter)
    ins.add_argument("files", nargs="+", help="model or LoRA files, one model's folder, or a model folder "
                                              "(as --model-dir: each of its files is described)")
    ins.add_argument("--json", action="store_true", help="print the description as JSON")
    ins.add_argument("--dit", help="for LoRA files: a DiT checkpoint to list the LoRA keys that would not apply to")
    ins.set_defaults(func=cmd_inspect)

    from .nano import SHIPPED
    demo = sub.add_parser("demo", help="generate with flux-nano, the small FLUX.1 model shipped with diffsynth",
                          formatter_class=HelpFormatter)
    demo.add_argument("--model-dir", default=str(SHIPPED), help="the flux-nano folder")
    demo.add_argument("--output", default="demo_output/image.png",
                      help="image file; without --prompt, <name>-grid.png is also written beside it")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the files it writes if they exist (default: refuse)")
    demo.add_argument("--device", default="cpu", help="compute device (flux-nano is fast on cpu)")
    demo.add_argument("--dtype", choices=COMPUTE_DTYPES, default="fp32", help="compute dtype")
    add_generation_args(demo, require_prompt=False, seed=0)
    add_runtime_args(demo)
    demo.set_defaults(func=cmd_demo, prompt=None, num_inference_steps=20, parallel=None)

    from .training.args import add_training_args
    train = sub.add_parser("train", help="LoRA / full training of FLUX.1 (same arguments as "
                                         "examples/flux/model_training/train.py; multi-GPU: accelerate launch)",
                           formatter_class=HelpFormatter)
    add_training_args(train)
    train.set_defaults(func=cmd_train)

    ui = sub.add_parser("ui", formatter_class=HelpFormatter,
                        help="the web UI (generation, editing, LoRA training) in the browser; "
                             "pip install 'diffsynth-flux[ui]'; flux-nano without model options")
    ui.add_argument("--model", nargs="+", help="checkpoint files or folders, as for generate")
    ui.add_argument("--model-dir", help="a model folder in the FLUX.1-dev layout (default: flux-nano)")
    ui.add_argument("--tokenizer-1", help="CLIP tokenizer folder (default: tokenizer/ beside text_encoder/)")
    ui.add_argument("--tokenizer-2", help="T5 tokenizer folder (default: tokenizer_2/ beside text_encoder_2/)")
    ui.add_argument("--device", help="compute device (default: cuda when this machine has it, else cpu)")
    ui.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: bf16 on cuda, else fp32)")
    from .ui.launch import add_ui_args
    add_ui_args(ui)
    add_runtime_args(ui)
    ui.set_defaults(func=cmd_ui, parallel=None, prompt=None)  # the page checks its prompts itself

    parser.description = (f"FLUX image generation and training. Commands: {', '.join(sub.choices)} "
                           "(`diffsynth COMMAND --help` lists each one's options).")
    return parser


def error_line(e: Exception) -> str:
    """The error in the command line's words (the library's speak of from_pretrained's arguments)."""
    checks = sys.modules.get("diffsynth.pipelines.checks")  # not imported yet: the error cannot be one of its
    if checks is not None and isinstance(e, checks.MissingModelError):
        return f"{e.what()} not among the models given: add {'its file' if len(e.missing) == 1 else 'their files'} " \
               "to --model (or give a complete --model-dir)"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, PermissionError, ImportError, ValueError, RuntimeError,
            FloatingPointError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
