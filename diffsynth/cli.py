"""Command line: `diffsynth generate | inspect | demo`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .ops.files import DTYPE_NAMES


def model_files_in(folder: str) -> list[str]:
    """The checkpoint files of a model folder (FLUX.1-dev repo layout, diffusers layout (FLUX.2 [klein] too), or
    loose files)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    found = sorted(str(p) for p in root.iterdir() if p.suffix in (".safetensors", ".sft", ".gguf"))
    found += [str(root / sub) for sub in ("transformer", "vae", "text_encoder", "text_encoder_2")
              if (root / sub).is_dir()]
    if not found:
        raise FileNotFoundError(f"no checkpoint files in {folder}")
    return found


def add_generation_args(p: argparse.ArgumentParser, require_prompt: bool = True) -> None:
    p.add_argument("--prompt", required=require_prompt, help="what to generate")
    p.add_argument("--negative-prompt", default="", help="what to avoid (used when --cfg-scale > 1)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="real classifier-free guidance; 1 = off (FLUX.1-dev uses --embedded-guidance)")
    p.add_argument("--embedded-guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance strength")
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
    p.add_argument("--seed", type=int, help="image i of a batch uses seed + i (default: random, printed)")
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


GENERATION_KEYS = ("prompt", "negative_prompt", "cfg_scale", "embedded_guidance", "t5_sequence_length",
                   "denoising_strength", "height", "width", "seed", "rand_device", "sigma_shift",
                   "num_inference_steps", "tiled", "tile_size", "tile_stride", "num_images",
                   "tea_cache_l1_thresh", "fbcache_thresh", "edit_image_auto_resize")
STORAGE_DTYPES = {**DTYPE_NAMES, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    from .ops.attention import BACKENDS
    g = p.add_argument_group("fitting and speed")
    g.add_argument("--offload", action="store_true",
                   help="store weights in CPU RAM; layers stay on the device while under --vram-limit, the rest "
                        "stream per call (enable_vram_management)")
    g.add_argument("--offload-dtype", choices=STORAGE_DTYPES,
                   help="storage dtype of the DiT and T5 files (e.g. fp8_e4m3fn); implies --offload")
    g.add_argument("--vram-limit", type=float, metavar="GB",
                   help="GB the models may keep on the device (default: its free memory); implies --offload")
    g.add_argument("--vram-buffer", type=float, default=0.5, metavar="GB", help="GB kept free under --vram-limit")
    g.add_argument("--lora", action="append", default=[], metavar="FILE", help="a LoRA file (repeatable)")
    g.add_argument("--lora-alpha", action="append", type=float, default=[], metavar="A",
                   help="strength of each --lora, in order (default 1.0 each)")
    g.add_argument("--attention", choices=BACKENDS, default="auto", help="attention backend (process-wide)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (regional)")


def offloading(args) -> bool:
    """--offload, or an option that implies it."""
    return bool(args.offload or args.offload_dtype or args.vram_limit is not None)


def _model_config(path: str, args):
    """ModelConfig for one file or folder, with the storage --offload/--offload-dtype ask for."""
    from . import ModelConfig
    from .loading.components import FAMILY_BY_NAME
    from .loading.registry import detect
    if not offloading(args):
        return ModelConfig(path=path)
    dtype = None
    if args.offload_dtype:
        config = ModelConfig(path=path)
        families = {d.family for d in detect(config.resolve())}
        precise = sorted(f for f in families if not FAMILY_BY_NAME[f].low_precision_storage)
        if not precise:
            dtype = STORAGE_DTYPES[args.offload_dtype]
        else:
            print(f"note: {path} also holds {', '.join(precise)}; "
                  f"it is stored as is, not in {args.offload_dtype}", file=sys.stderr)
    return ModelConfig(path=path, offload_device="cpu", offload_dtype=dtype)


def model_paths(args) -> list[str]:
    models = list(args.model or [])
    if args.model_dir:
        models += model_files_in(args.model_dir)
    if not models:
        raise SystemExit("give --model FILE [FILE ...] or --model-dir DIR")
    return models


def loras(args) -> list[tuple[str, float]]:
    """(file, alpha) of every --lora."""
    if args.lora_alpha and len(args.lora_alpha) != len(args.lora):
        raise ValueError(f"{len(args.lora_alpha)} --lora-alpha values for {len(args.lora)} --lora files: "
                         "give one per file, or none for 1.0")
    return list(zip(args.lora, args.lora_alpha or [1.0] * len(args.lora)))


def pipeline_class(models: list[str]) -> type:
    """FluxImagePipeline or Flux2ImagePipeline, read from the files' families."""
    from . import Flux2ImagePipeline, FluxImagePipeline, ModelConfig
    from .loading.registry import pipeline_family
    family = pipeline_family([ModelConfig(path=m).resolve() for m in models])
    return Flux2ImagePipeline if family == "flux2" else FluxImagePipeline


def build_pipeline(args, models: list[str]):
    """The pipeline `generate` runs: files, storage, LoRAs, attention backend, compilation, VRAM management."""
    from . import Flux2ImagePipeline, FluxImagePipeline
    from .ops.quant import quant_type
    lora_files = loras(args)
    configs = [_model_config(m, args) for m in models]
    cls = pipeline_class(models)
    call_params(cls, {k: getattr(args, k) for k in GENERATION_KEYS})  # options it lacks fail before loading
    if cls is Flux2ImagePipeline:
        if args.tokenizer_2:
            raise ValueError("--tokenizer-2 is FLUX.1's T5 tokenizer; FLUX.2 has one tokenizer (--tokenizer-1)")
        pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=DTYPE_NAMES[args.dtype], device=args.device,
                                                  model_configs=configs, tokenizer_config=args.tokenizer_1)
    else:
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=DTYPE_NAMES[args.dtype], device=args.device,
                                                 model_configs=configs, tokenizer_1_path=args.tokenizer_1,
                                                 tokenizer_2_path=args.tokenizer_2)
    if lora_files and pipe.dit is None:
        raise ValueError("--lora needs a DiT among the models")
    # GGUF blocks cannot absorb a merged delta: there the LoRA is applied at run time instead.
    gguf = lora_files and any(quant_type(m) for m in pipe.dit.modules())
    for path, alpha in lora_files:
        pipe.load_lora(pipe.dit, path, alpha=alpha, hotload=gguf)
    pipe.set_attention_backend(args.attention)
    if args.compile:
        pipe.compile()
    if offloading(args):
        pipe.enable_vram_management(vram_limit=args.vram_limit, vram_buffer=args.vram_buffer)
    return pipe


def escape_line(text: str) -> str:
    """One line of A1111 `parameters` text: a newline in a prompt could otherwise forge the
    "Negative prompt:" or settings lines that readers parse."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def png_metadata(params: dict, seed: int, size: tuple[int, int], models: list[str]) -> dict[str, str]:
    """A1111-style `parameters` text (what ComfyUI/A1111 users read) plus the exact call as JSON."""
    text = escape_line(params["prompt"])
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {escape_line(params['negative_prompt'])}"
    text += (f"\nSteps: {params['num_inference_steps']}, Sampler: Euler (flow matching), "
             f"CFG scale: {params['cfg_scale']}, Guidance: {params['embedded_guidance']}, Seed: {seed}, "
             f"Size: {size[0]}x{size[1]}, Shift: {params.get('sigma_shift') or 3.0}, "
             f"Model: {', '.join(os.path.basename(m.rstrip('/')) for m in models)}")
    return {"parameters": text, "diffsynth": json.dumps({**params, "seed": seed, "models": models})}


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


def check_device(name: str) -> None:
    """A device this machine has: otherwise torch fails deep inside model loading."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if device.type in available and not available[device.type]():
        raise ValueError(f"--device {name}: this machine/torch build has no {device.type.upper()} device "
                         "(use --device cpu)")


def apply_folder_defaults(args) -> None:
    """Sizes a model folder declares in generation_defaults.json (flux-nano: 64 px) replace the 1024 px
    default when --height/--width are not given."""
    path = Path(args.model_dir or "") / "generation_defaults.json"
    if args.model_dir and path.is_file():
        defaults = json.loads(path.read_text())
        for key in ("height", "width"):
            if getattr(args, key) is None and key in defaults:
                setattr(args, key, int(defaults[key]))


def cmd_generate(args) -> list[str]:
    apply_folder_defaults(args)
    paths, images = check_generation(args)
    models = model_paths(args)
    return write_images(args, build_pipeline(args, models), models, paths, images)


def check_generation(args) -> tuple[list[str], dict]:
    """Everything about a generation that can be wrong, checked before any model loads: the pipeline's
    argument checks, the input images, the output paths and the device. Returns (output paths, the image
    arguments: input_image and, when given, edit_image)."""
    from .pipelines.checks import check_call_args
    params = {k: getattr(args, k) for k in GENERATION_KEYS}
    images = {"input_image": open_input_image(args.input_image, "--input-image")}
    if getattr(args, "edit_image", None):
        images["edit_image"] = [open_input_image(p, "--edit-image") for p in args.edit_image]
    check_call_args({**params, **images})
    paths = output_paths(args.output, args.num_images)
    check_outputs(paths, getattr(args, "overwrite", True))  # `demo` has no --overwrite: it rewrites its image
    check_device(args.device)
    return paths, images


# Options one of the pipelines does not take, with the value that means "not used".
_UNUSED = {"t5_sequence_length": 512, "sigma_shift": None, "tea_cache_l1_thresh": None, "fbcache_thresh": None,
           "edit_image_auto_resize": True}


def call_params(pipeline_cls: type, params: dict) -> dict:
    """The generation arguments the pipeline class takes; an option it does not have, set by the user, is an
    error."""
    import inspect
    accepted = inspect.signature(pipeline_cls.__call__).parameters
    unusable = sorted(k for k in params if k not in accepted and params[k] != _UNUSED.get(k))
    if unusable:
        raise ValueError(f"{pipeline_cls.__name__} has no {', '.join('--' + k.replace('_', '-') for k in unusable)}")
    return {k: v for k, v in params.items() if k in accepted}


def write_images(args, pipe, models: list[str], paths: list[str], image_args: dict) -> list[str]:
    """Run the pipeline with the generation arguments and save the image(s) to `paths`."""
    from .ops.files import save_image
    params = {k: getattr(args, k) for k in GENERATION_KEYS}
    overwrite = getattr(args, "overwrite", True)
    images = pipe(**call_params(type(pipe), {**params, **image_args}))
    images = images if isinstance(images, list) else [images]
    for i, (image, path) in enumerate(zip(images, paths)):
        save_image(image, path, png_metadata({**params, "input_image": args.input_image,
                                              "edit_image": getattr(args, "edit_image", None), "loras": loras(args)},
                                             pipe.last_seed + i, image.size, models), overwrite=overwrite)
        print(f"saved {path}")
    return paths


def cmd_inspect(args) -> None:
    from .ops.files import scan
    from .loading.lora import describe_lora
    from .loading.registry import describe, detect, dit_config, looks_like_lora
    for path in args.files:
        if looks_like_lora(scan(path)):
            model = dit_config(detect(args.dit)[0]) if args.dit else None
            report = {"file": path, "lora": describe_lora(path, model)}
            print(json.dumps(report, indent=2, default=str) if args.json else _pretty_lora(report))
            continue
        report = {"file": path, "models": [describe(d) for d in detect(path)]}
        print(json.dumps(report, indent=2) if args.json else _pretty(report))


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


def cmd_demo(args) -> None:
    """flux-nano, shipped in the package: --prompt writes that image; without it, the default prompt's
    image and a grid of several prompts (grid.png beside --output)."""
    from .nano import demo
    from .ops.files import save_image
    args.model, args.tokenizer_1, args.tokenizer_2 = None, None, None
    apply_folder_defaults(args)
    grid = args.prompt is None
    args.prompt = args.prompt or demo.DEFAULT_PROMPT
    paths, image_args = check_generation(args)
    models = model_paths(args)
    pipe = build_pipeline(args, models)
    write_images(args, pipe, models, paths, image_args)
    if grid:
        seed = 0 if args.seed is None else args.seed
        images = [pipe(p, seed=seed, height=args.height, width=args.width, t5_sequence_length=args.t5_sequence_length,
                       num_inference_steps=args.num_inference_steps, progress_bar_cmd=lambda x: x)
                  for p in demo.GRID_PROMPTS]
        path = Path(args.output).with_name("grid.png")
        save_image(demo.make_grid(images, list(demo.GRID_PROMPTS)), path)
        print(f"saved {path} ({', '.join(demo.GRID_PROMPTS)})")


def cmd_train(args) -> None:
    from .training import train
    train(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="text-to-image / image-to-image from checkpoint files")
    gen.add_argument("--model", nargs="+", help="checkpoint files or folders (DiT, VAE, CLIP, T5, or all-in-one)")
    gen.add_argument("--model-dir", help="a model folder in the FLUX.1-dev or a FLUX.2 [klein] (diffusers) layout")
    gen.add_argument("--tokenizer-1", help="CLIP (FLUX.2: Qwen) tokenizer folder (default: tokenizer/ beside "
                     "text_encoder/)")
    gen.add_argument("--tokenizer-2", help="T5 tokenizer folder (default: tokenizer_2/ beside text_encoder_2/)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="compute device")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16" if torch.cuda.is_available() else "fp32",
                     help="compute dtype")
    gen.add_argument("--output", default="image.png", help="image file; .png (with the parameters), .jpg or .webp "
                     "(numbered when --num-images > 1)")
    gen.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    add_generation_args(gen)
    add_runtime_args(gen)
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", help="what a checkpoint file is recognised as")
    ins.add_argument("files", nargs="+", help="model or LoRA files / folders")
    ins.add_argument("--json", action="store_true", help="print the description as JSON")
    ins.add_argument("--dit", help="for LoRA files: a DiT checkpoint to list the LoRA keys that would not apply to")
    ins.set_defaults(func=cmd_inspect)

    from .nano import SHIPPED
    demo = sub.add_parser("demo", help="generate with flux-nano, the small FLUX.1 model shipped with diffsynth")
    demo.add_argument("--model-dir", default=str(SHIPPED))
    demo.add_argument("--output", default="demo_output/image.png")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    add_generation_args(demo, require_prompt=False)
    add_runtime_args(demo)
    demo.set_defaults(func=cmd_demo, prompt=None, num_inference_steps=20, seed=0)

    from .training.args import add_training_args
    train = sub.add_parser("train", help="LoRA / full training of FLUX.1 (same arguments as "
                                         "examples/flux/model_training/train.py; multi-GPU: accelerate launch)")
    add_training_args(train)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, PermissionError, ImportError, ValueError, RuntimeError,
            FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
