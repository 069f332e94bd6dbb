"""Command-line arguments of `train.py` / `diffsynth train` (DiffSynth-Studio's FLUX training arguments plus
extensions), and the checks that run before anything is loaded."""
from __future__ import annotations

import argparse
import json
import math
import os
import re

from ..ops.names import COMPUTE_DTYPES
from ..ops.limits import MAX_PIXELS, MAX_SIDE, MAX_T5_SEQUENCE_LENGTH
from .names import FULL_FORMATS, LORA_FORMATS, LR_SCHEDULERS, TASKS, TIMESTEP_SAMPLINGS

DEFAULT_LORA_TARGETS = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
                        "norm1_a.linear,norm1_b.linear,to_qkv_mlp")


def csv_list(value: str | list[str] | None) -> list[str]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def add_training_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset_base_path", required=True, help="root folder of the dataset")
    d.add_argument("--dataset_metadata_path", help="metadata .csv / .json / .jsonl (default: <base>/metadata.*, "
                                                   "else image + .txt caption pairs)")
    d.add_argument("--max_pixels", type=int, default=1024 * 1024,
                   help="dynamic resolution: larger images are shrunk to at most this many pixels")
    d.add_argument("--height", type=int, help="fixed training height (with --width); empty: dynamic resolution")
    d.add_argument("--width", type=int, help="fixed training width (with --height)")
    d.add_argument("--data_file_keys", default="image", help="metadata columns holding image files, comma separated")
    d.add_argument("--dataset_repeat", type=int, default=1, help="times the dataset repeats per epoch")
    d.add_argument("--dataset_num_workers", type=int, default=0, help="DataLoader worker processes")
    d.add_argument("--batch_size", type=int, default=1,
                   help="images per step; >1 with dynamic resolution groups images into aspect-ratio buckets")
    d.add_argument("--bucket_step", type=int, default=64, help="bucket sides are multiples of this (batch_size > 1)")
    d.add_argument("--cache_dir", help="cache VAE latents and text embeddings here (computed once, reused)")

    m = p.add_argument_group("model")
    m.add_argument("--model_paths", help='local model files as a JSON list, e.g. \'["a.safetensors", "te2/"]\'')
    m.add_argument("--model_id_with_origin_paths",
                   help='"model_id:origin_pattern,..." e.g. black-forest-labs/FLUX.1-dev:flux1-dev.safetensors')
    m.add_argument("--tokenizer_1_path", help="CLIP tokenizer folder (default: tokenizer/ beside text_encoder/)")
    m.add_argument("--tokenizer_2_path", help="T5 tokenizer folder (default: tokenizer_2/ beside text_encoder_2/)")
    m.add_argument("--tokenizer_path", help="FLUX.2: the Qwen tokenizer, a folder or 'model_id:origin_pattern' "
                                            "(default: tokenizer/ beside text_encoder/)")
    m.add_argument("--torch_dtype", choices=COMPUTE_DTYPES, help="model dtype (default bf16 on GPU, fp32 on CPU)")
    m.add_argument("--fp8_models", help="models whose frozen weights are stored in fp8 (e4m3fn) and computed in "
                                        "--torch_dtype layer by layer: pipeline names (dit, vae, text_encoder...) or "
                                        "entries of --model_paths / --model_id_with_origin_paths, comma separated")
    m.add_argument("--offload_models", help="models kept in CPU RAM, each layer moved to the device when it runs "
                                            "(names as --fp8_models): the ones a split-training stage does not use")
    m.add_argument("--initialize_model_on_cpu", action="store_true",
                   help="load the models into CPU RAM; they move to the device when training starts")
    m.add_argument("--preset_lora_path", help="LoRA file merged into --preset_lora_model before training")
    m.add_argument("--preset_lora_model", help="the model --preset_lora_path is merged into (e.g. dit)")

    t = p.add_argument_group("training")
    t.add_argument("--task", default="sft",
                   help="sft: preprocess and train in one run; sft:data_process: run the encoders (text, VAE, "
                        "reference images) over the dataset and write their outputs to --output_path; sft:train: "
                        "train from such a folder given as --dataset_base_path (the encoders are not loaded)")
    t.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    t.add_argument("--customized_optimizer",
                   help="optimizer class 'module.Class' (e.g. torch.optim.Adam, bitsandbytes.optim.AdamW8bit), built "
                        "with (params, lr=--learning_rate, weight_decay=--weight_decay); default torch.optim.AdamW")
    t.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    t.add_argument("--num_epochs", type=int, default=1, help="passes over the (repeated) dataset")
    t.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (the LR schedule ends there)")
    t.add_argument("--output_path", default="./models", help="folder for epoch-N / step-N .safetensors and checkpoints")
    t.add_argument("--remove_prefix_in_ckpt", help="prefix stripped from saved keys (default: pipe.<model>. "
                                                   "when one model is trained, e.g. pipe.dit.)")
    t.add_argument("--save_steps", type=int, help="also save step-N.safetensors every N optimizer steps")
    t.add_argument("--save_dtype", choices=COMPUTE_DTYPES, help="dtype of saved weights (default: the model dtype)")
    t.add_argument("--seed", type=int, help="seed for data order, noise and timesteps (default: random, logged)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (torch.use_deterministic_algorithms; slower on CUDA): a run "
                        "resumed from a checkpoint on a GPU then ends with the same weights bit for bit (without it, "
                        "CUDA's atomic-add kernels make last-bit differences; on the CPU runs repeat exactly anyway)")
    t.add_argument("--guidance", type=float, default=1.0, help="FLUX.1-dev distilled guidance during training")
    t.add_argument("--t5_sequence_length", type=int, default=512, help="T5 tokens the prompts are padded/truncated to")
    t.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLINGS, default="shifted_uniform",
                   help="shifted_uniform: DiffSynth-Studio's 1000-step training grid of the model's family "
                        "(FLUX.1: shift 3; FLUX.2: exponential shift, mu 0.8) with its weights")
    t.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal / flux_shift mean")
    t.add_argument("--logit_std", type=float, default=1.0, help="logit_normal / flux_shift std")
    t.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                   help="learning-rate schedule after the warm-up")
    t.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    t.add_argument("--max_grad_norm", type=float, help="clip the gradient norm (default: no clipping)")
    t.add_argument("--ema_decay", type=float, help="keep an EMA of the trained weights (saved as *-ema.safetensors)")
    t.add_argument("--find_unused_parameters", action="store_true", help="DDP find_unused_parameters")

    r = p.add_argument_group("trainable modules")
    r.add_argument("--trainable_models", help="pipeline models trained in full, comma separated (e.g. dit)")
    r.add_argument("--lora_base_model", help="model that gets a LoRA (e.g. dit)")
    r.add_argument("--lora_target_modules", default=DEFAULT_LORA_TARGETS, help="layers that get LoRA, comma separated")
    r.add_argument("--lora_rank", type=int, default=32, help="rank of every LoRA layer (alpha = rank: scale 1)")
    r.add_argument("--lora_checkpoint", help="LoRA file to start from (any format pipe.load_lora reads)")
    r.add_argument("--extra_inputs", help="metadata columns passed to the pipeline units, comma separated")

    v = p.add_argument_group("memory")
    v.add_argument("--use_gradient_checkpointing", action="store_true",
                   help="recompute block activations in the backward pass (less memory)")
    v.add_argument("--use_gradient_checkpointing_offload", action="store_true",
                   help="checkpointing with the saved activations in CPU memory")
    v.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    v.add_argument("--enable_model_cpu_offload", action="store_true",
                   help="frozen weights stay in CPU RAM and each layer is streamed to the device for its forward "
                        "(and its recomputation in the backward pass: turns on gradient checkpointing); one process")
    v.add_argument("--enable_optimizer_cpu_offload", action="store_true",
                   help="with --enable_model_cpu_offload: the trained weights, their gradients and the optimizer "
                        "state stay in CPU RAM too (the optimizer steps on the CPU)")

    o = p.add_argument_group("outputs, resume, validation")
    o.add_argument("--align_to_opensource_format", action="store_true",
                   help="save LoRAs in kohya format (lora_unet_* + alpha): ComfyUI, diffusers (= --lora_format kohya)")
    o.add_argument("--lora_format", choices=LORA_FORMATS, default="diffsynth",
                   help="key names of saved LoRAs: diffsynth (as trained), kohya, diffusers")
    o.add_argument("--full_format", choices=FULL_FORMATS, default="diffsynth",
                   help="key names of full fine-tunes: diffsynth (pipe.dit.load_state_dict) or bfl (original FLUX)")
    o.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint folder (<output_path>/checkpoints/step-N)')
    o.add_argument("--checkpointing_steps", type=int,
                   help="save the resumable training state every N steps (default: whenever weights are saved)")
    o.add_argument("--checkpoints_total_limit", type=int, default=1, help="resumable states kept (newest)")
    o.add_argument("--validation_prompts", help='prompts to sample during training: "a,b" or a .txt file (one per line)')
    o.add_argument("--validation_steps", type=int, help="sample the validation prompts every N steps")
    o.add_argument("--validation_inference_steps", type=int, default=20,
                   help="denoising steps of the validation images")
    o.add_argument("--validation_guidance", type=float, default=3.5, help="embedded guidance of the validation images")
    o.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto",
                   help="auto: TensorBoard when it is installed")
    o.add_argument("--enable_tensorboard_log", action="store_true", help="= --report_to tensorboard")
    o.add_argument("--enable_csv_log", action="store_true",
                   help="append step, loss and learning rate to <output_path>/loss_log.csv")
    add_unsupported_args(p)
    return p


# DiffSynth-Studio 2.0 training arguments this trainer does not implement: accepted by the parser so that a 2.0
# script fails with this message instead of "unrecognized arguments" (only when given a non-default value).
UNSUPPORTED = {
    "quant_options": "dynamic quantization is not supported: store weights in fp8 with --fp8_models, or load a "
                     "GGUF / fp8 checkpoint file",
    "template_model_id_or_path": "template models are not supported",
    "enable_lora_hot_loading": "LoRA hot-loading of template models is not supported",
    "cpu_offload_split_threshold": "not supported: --enable_model_cpu_offload always streams one layer at a time "
                                   "(2.0's default, the threshold unset)",
    "enable_swanlab_log": "SwanLab logging is not supported: use --enable_tensorboard_log or --enable_csv_log",
    "swanlab_project": "SwanLab logging is not supported: use --enable_tensorboard_log or --enable_csv_log",
    "enable_wandb_log": "wandb logging is not supported: use --enable_tensorboard_log or --enable_csv_log",
    "wandb_project": "wandb logging is not supported: use --enable_tensorboard_log or --enable_csv_log",
}


def add_unsupported_args(p: argparse.ArgumentParser) -> None:
    u = p.add_argument_group("DiffSynth-Studio 2.0 arguments that are refused (with the reason)")
    for name in UNSUPPORTED:
        if name.startswith("enable_"):
            u.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
        else:
            u.add_argument(f"--{name}", help=argparse.SUPPRESS)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train FLUX.1 (LoRA or full) with accelerate.", add_help=add_help)
    return add_training_args(p)


def parse_tokenizer(value: str | None):
    """--tokenizer_path: None, a local folder, or 'model_id:origin_pattern' (a ModelConfig, resolved when loading)."""
    from ..loading.model_config import ModelConfig
    if value is None or os.path.exists(value):
        return value
    model_id, sep, pattern = value.partition(":")
    if not sep or not model_id:
        raise ValueError(f"--tokenizer_path {value!r} is neither a folder nor 'model_id:origin_file_pattern'")
    return ModelConfig(model_id=model_id, origin_file_pattern=pattern)


def parse_model_sources(model_paths: str | None, id_with_origin_paths: str | None) -> list:
    """ModelConfigs from --model_paths (JSON list) and --model_id_with_origin_paths ("id:pattern,...")."""
    from ..loading.model_config import ModelConfig
    configs = []
    if model_paths:
        try:
            paths = json.loads(model_paths)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_paths must be a JSON list of paths: {e}") from None
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(x, (str, list)) for x in paths):
            raise ValueError("--model_paths must be a JSON list of paths (a path may be a list of shards)")
        missing = [x for x in paths for x in (x if isinstance(x, list) else [x]) if not os.path.exists(x)]
        if missing:
            raise ValueError(f"--model_paths: not found: {missing}")
        configs += [ModelConfig(path=x) for x in paths]
    for item in csv_list(id_with_origin_paths):
        model_id, sep, pattern = item.partition(":")
        if not sep or not model_id:
            raise ValueError(f"--model_id_with_origin_paths: {item!r} is not 'model_id:origin_file_pattern'")
        configs.append(ModelConfig(model_id=model_id, origin_file_pattern=pattern))
    if not configs:
        raise ValueError("no models: give --model_paths and/or --model_id_with_origin_paths")
    return configs


def validation_prompt_list(value: str | None) -> list[str]:
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if value.endswith(".txt") and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return csv_list(value)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived fields and reject inconsistent arguments with one message listing every problem."""
    problems = [f"--{k}: {why}" for k, why in UNSUPPORTED.items() if getattr(args, k, None) not in (None, False)]

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    need(args.task in TASKS, f"--task {args.task!r} is not supported (distillation tasks are not implemented); "
                             f"supported: {', '.join(TASKS)}")

    need((args.height is None) == (args.width is None), "--height and --width go together (or leave both empty)")
    for name in ("height", "width"):
        v = getattr(args, name)
        need(v is None or (0 < v <= MAX_SIDE and v % 16 == 0),
             f"--{name} must be a positive multiple of 16 up to {MAX_SIDE}, got {v}")
    need(16 * 16 <= args.max_pixels <= MAX_PIXELS, f"--max_pixels must be in [256, {MAX_PIXELS}], got {args.max_pixels}")
    for name in ("dataset_repeat", "num_epochs", "batch_size", "gradient_accumulation_steps", "lora_rank",
                 "bucket_step", "t5_sequence_length", "validation_inference_steps", "checkpoints_total_limit"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "save_steps", "checkpointing_steps", "validation_steps"):
        v = getattr(args, name)
        need(v is None or v >= 1, f"--{name} must be >= 1, got {v}")
    for name in ("learning_rate", "weight_decay", "guidance", "logit_mean", "logit_std", "max_grad_norm",
                 "ema_decay", "validation_guidance"):
        v = getattr(args, name)
        need(v is None or math.isfinite(v), f"--{name} must be a finite number, got {v}")
    need(args.t5_sequence_length <= MAX_T5_SEQUENCE_LENGTH,
         f"--t5_sequence_length must be <= {MAX_T5_SEQUENCE_LENGTH} (FLUX's T5 context), got {args.t5_sequence_length}")
    need(args.dataset_num_workers >= 0, "--dataset_num_workers must be >= 0")
    need(args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}")
    need(args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    need(args.lr_warmup_steps >= 0, "--lr_warmup_steps must be >= 0")
    need(args.logit_std > 0, "--logit_std must be > 0")
    need(args.max_grad_norm is None or args.max_grad_norm > 0, "--max_grad_norm must be > 0")
    need(args.ema_decay is None or 0 < args.ema_decay < 1, f"--ema_decay must be in (0, 1), got {args.ema_decay}")

    args.data_file_keys = csv_list(args.data_file_keys)
    if "image" not in args.data_file_keys:
        args.data_file_keys.insert(0, "image")
    args.trainable_models = csv_list(args.trainable_models)
    args.lora_target_modules = csv_list(args.lora_target_modules)
    args.extra_inputs = csv_list(args.extra_inputs)
    from ..pipelines.variants import IMAGE_INPUTS  # the variants' image inputs are image files in a dataset
    args.data_file_keys += [k for k in args.extra_inputs if k in IMAGE_INPUTS and k not in args.data_file_keys]
    need("image" not in args.extra_inputs and "prompt" not in args.extra_inputs,
         "--extra_inputs: image and prompt are always passed")
    args.fp8_models, args.offload_models = csv_list(args.fp8_models), csv_list(args.offload_models)
    if args.enable_model_cpu_offload:  # the backward pass fetches the streamed layers again instead of keeping them
        args.use_gradient_checkpointing = True
    if args.enable_tensorboard_log:
        need(args.report_to in ("auto", "tensorboard"), "--enable_tensorboard_log contradicts --report_to none")
        args.report_to = "tensorboard"
    need(not args.enable_optimizer_cpu_offload or args.enable_model_cpu_offload,
         "--enable_optimizer_cpu_offload goes with --enable_model_cpu_offload")
    need((args.preset_lora_path is None) == (args.preset_lora_model is None),
         "--preset_lora_path and --preset_lora_model go together")
    need(args.preset_lora_path is None or os.path.isfile(args.preset_lora_path),
         f"--preset_lora_path {args.preset_lora_path!r} is not a file")
    need(args.task == "sft:data_process" or bool(args.trainable_models or args.lora_base_model),
         "nothing to train: give --trainable_models (full training) and/or --lora_base_model (LoRA)")
    if args.task != "sft":
        need(args.cache_dir is None, f"--cache_dir is for --task sft (--task {args.task} writes or reads the "
                                     "preprocessed rows in its own folder)")
    if args.task == "sft:train":
        need(args.dataset_metadata_path is None, "--task sft:train reads the rows from the --dataset_base_path "
                                                 "folder written by --task sft:data_process: drop --dataset_metadata_path")
    if args.lora_base_model:
        need(bool(args.lora_target_modules), "--lora_target_modules is empty")
    if args.align_to_opensource_format:
        need(args.lora_format in ("diffsynth", "kohya"), "--align_to_opensource_format means --lora_format kohya")
        args.lora_format = "kohya"
    if args.lora_format != "diffsynth":
        need(args.lora_base_model in ("dit", None) and bool(args.lora_base_model),
             f"--lora_format {args.lora_format} (--align_to_opensource_format) is for LoRA training of the DiT "
             "(--lora_base_model dit)")
    trained = sorted({*args.trainable_models, *([args.lora_base_model] if args.lora_base_model else [])})
    if args.remove_prefix_in_ckpt is None:
        args.remove_prefix_in_ckpt = f"pipe.{trained[0]}." if len(trained) == 1 else "pipe."
    # DiffSynth-Studio's scripts name the first ControlNet `pipe.controlnet.models.0.`; ours is `pipe.controlnet.0.`
    args.remove_prefix_in_ckpt = re.sub(r"^pipe\.(\w+)\.models\.(\d+)\.", r"pipe.\1.\2.", args.remove_prefix_in_ckpt)
    dit_only_prefix = trained == ["dit"] and args.remove_prefix_in_ckpt == "pipe.dit."
    if args.lora_format != "diffsynth":
        need(dit_only_prefix, f"--lora_format {args.lora_format} needs --remove_prefix_in_ckpt pipe.dit.")
    if args.full_format == "bfl":
        need(args.trainable_models == ["dit"] and dit_only_prefix,
             "--full_format bfl is for full training of the DiT only (--trainable_models dit "
             "--remove_prefix_in_ckpt pipe.dit.)")
    args.validation_prompts = validation_prompt_list(args.validation_prompts)
    need(args.validation_steps is None or bool(args.validation_prompts),
         "--validation_steps needs --validation_prompts")
    if args.validation_prompts and args.validation_steps is None:
        problems.append("--validation_prompts needs --validation_steps")
    if args.resume_from_checkpoint not in (None, "latest"):
        need(os.path.isdir(args.resume_from_checkpoint),
             f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder (or use 'latest'); a LoRA "
             "file to start from (DiffSynth-Studio 2.0's meaning) is --lora_checkpoint")
    need(args.lora_checkpoint is None or os.path.isfile(args.lora_checkpoint),
         f"--lora_checkpoint {args.lora_checkpoint!r} is not a file")
    need(args.lora_checkpoint is None or bool(args.lora_base_model), "--lora_checkpoint needs --lora_base_model")
    need(bool(args.model_paths or args.model_id_with_origin_paths),
         "no models: give --model_paths and/or --model_id_with_origin_paths")
    if problems:
        raise ValueError("invalid arguments:\n  " + "\n  ".join(problems))
    return args
