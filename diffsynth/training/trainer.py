"""The training loop: accelerate (single process, DDP, FSDP2, DeepSpeed), resumable, with outputs saved by rank 0.

A step is one optimizer update (`--gradient_accumulation_steps` batches per process). `--save_steps`,
`--checkpointing_steps`, `--validation_steps` and `--max_steps` count steps. The noise and noise levels
of a batch are drawn from a generator seeded by (seed, epoch, batch index in the epoch), so a run gives the
same updates whether its steps' batches come from one process (gradient accumulation) or several.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..ops.files import DTYPE_NAMES, DiskFull, all_finite, expand_paths, save_image
from ..ops.quant import FP8_DTYPES
from .args import build_parser, check_args, parse_model_sources, parse_tokenizer
from .cache import build_cache, cache_paths, models_tag
from .checkpoint import (SavedState, complete_checkpoints, gather_optimizer_state, load_checkpoint, read_newest_readable,
                         resume_candidates, save_checkpoint, whole)
from .data import ImageDataset, epoch_batches, load_samples, shard_batches
from .export import save_output, training_info
from .module import FluxTrainingModule, model_name, pipeline_model
from .offload import place_trained, storage_configs
from .run_dir import OutputLocked, claim_output
from .schedule import lr_factor, make_sigma_sampler
from .split import SplitCache, read_split_cache, rows_folder, sample_sizes, write_manifest

StepCallback = Callable[[int, float], None]  # (optimizer step, loss); may raise to stop training
# What a checkpoint must share with the run resuming it (the trainable tensors depend on them) ...
RESUME_FIXED = ("trainable_models", "lora_base_model", "lora_rank", "lora_target_modules")
# ... and what may change, the command line winning (said when it does).
RESUME_CHANGEABLE = ("learning_rate", "dataset_repeat")


class NonFiniteLoss(ValueError):
    """The loss became NaN/Inf: training stops before the bad update is saved anywhere."""


# ----------------------------------------------------------------------------- setup helpers

def load_pipeline(args: argparse.Namespace, device: torch.device | str, dtype: torch.dtype):
    """The pipeline of the models given, stored as --fp8_models / --offload_models / --enable_model_cpu_offload
    say, with --preset_lora_path merged. The DiT is needed unless the run only preprocesses (sft:data_process);
    the encoders unless their outputs come from a cache (--cache_dir, sft:train)."""
    from ..loading.registry import pipeline_family
    from ..pipelines.flux_image import FluxImagePipeline
    configs = storage_configs(parse_model_sources(args.model_paths, args.model_id_with_origin_paths), args)
    if pipeline_family([c.resolve() for c in configs]) == "flux2":
        pipe = load_flux2_pipeline(args, configs, device, dtype)
    else:
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=configs,
                                                 tokenizer_1_path=args.tokenizer_1_path,
                                                 tokenizer_2_path=args.tokenizer_2_path)
        from ..pipelines.units import active_units
        # CLIP/T5 only where they encode the prompt (a variant's own encoder may replace them, e.g. Step1X's Qwen)
        clip_t5 = any(u.name == "encode_prompt" for u in active_units(pipe, pipe.units))
        if needs_encoders(args) and (pipe.vae_encoder is None or
                                     (clip_t5 and None in (pipe.text_encoder_1, pipe.text_encoder_2))):
            raise ValueError("training needs the VAE (ae.safetensors) and both text encoders "
                             "(text_encoder/model.safetensors, text_encoder_2/)")
    if pipe.dit is None and args.task != "sft:data_process":
        raise ValueError("no DiT among the models: add its checkpoint (FLUX.1: flux1-dev.safetensors or another "
                         "FLUX transformer; FLUX.2: transformer/*.safetensors)")
    if args.preset_lora_path:
        pipe.load_lora(pipeline_model(pipe, args.preset_lora_model), args.preset_lora_path)
    return pipe


def needs_encoders(args: argparse.Namespace) -> bool:
    return not args.cache_dir and args.task != "sft:train"


def load_flux2_pipeline(args: argparse.Namespace, configs: list, device: torch.device | str, dtype: torch.dtype):
    from ..pipelines.flux2_image import TEXT_ENCODERS, Flux2ImagePipeline
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=configs,
                                              tokenizer_config=parse_tokenizer(args.tokenizer_path))
    no_encoder = all(getattr(pipe, e.attribute) is None for e in TEXT_ENCODERS)
    if needs_encoders(args) and (pipe.vae_encoder is None or no_encoder):
        raise ValueError("training FLUX.2 needs the VAE (vae/diffusion_pytorch_model.safetensors) and the text "
                         "encoder (text_encoder/*.safetensors)")
    return pipe


def use_tensorboard(report_to: str) -> bool:
    available = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
    if report_to == "tensorboard" and not available:
        raise ValueError("--report_to tensorboard: install tensorboard (pip install tensorboard)")
    return report_to != "none" and available


def make_accelerator(args: argparse.Namespace, tensorboard: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,  # several processes without CUDA: DDP over gloo on CPU
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
        log_with="tensorboard" if tensorboard else None, project_dir=args.output_path)
    if fsdp_requested():
        use_fsdp2(accelerator, multi_cpu)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise ValueError(f"the accelerate config sets gradient accumulation to {accelerator.gradient_accumulation_steps}"
                         f" but --gradient_accumulation_steps is {args.gradient_accumulation_steps}: remove it from "
                         "the accelerate config (train.py's argument decides)")
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" \
            and "MASTER_ADDR" in os.environ:
        accelerator.print("note: `accelerate launch --cpu --num_processes N` starts one process unless MPI is set up; "
                          "for N CPU processes (DDP over gloo) use `accelerate launch --multi_gpu --num_processes N` "
                          "or `torchrun --nproc_per_node N` on a machine without CUDA")
    if zero_stage(accelerator) == 3 and args.ema_decay is not None:
        raise ValueError("--ema_decay is not supported with DeepSpeed ZeRO-3 (parameters are sharded)")
    if zero_stage(accelerator):
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    return accelerator


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp2(accelerator, multi_cpu: bool) -> None:
    """Check the FSDP setting of `accelerate launch`: version 2 only (FSDP1 flattens the frozen and the
    trained weights together). accelerate sets FSDP up only for accelerator devices; on several CPU processes
    (gloo) the same FSDP2 state is set here, so that CPU runs shard the model as GPU runs do."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is None and multi_cpu:
        from accelerate.state import PartialState
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets
        accelerator.state.fsdp_plugin, accelerator.state.distributed_type = plugin, DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs
    if plugin is not None and plugin.fsdp_version != 2:
        raise ValueError(f"the accelerate config uses FSDP version {plugin.fsdp_version}: training supports "
                         "fsdp_version: 2 (see examples/flux2/model_training/full/accelerate_config_fsdp2.yaml)")


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else 0


def make_optimizer(params: list[torch.nn.Parameter], args: argparse.Namespace, accelerator) -> torch.optim.Optimizer:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}) if plugin else {}
    if offload.get("device", "none") != "none":
        if args.customized_optimizer:
            raise ValueError("--customized_optimizer does not combine with DeepSpeed's optimizer offload (it needs "
                             "DeepSpeed's CPU Adam)")
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO optimizer offload needs DeepSpeed's CPU Adam
        return DeepSpeedCPUAdam(params, lr=args.learning_rate, weight_decay=args.weight_decay, adamw_mode=True)
    return optimizer_class(args.customized_optimizer)(params, lr=args.learning_rate, weight_decay=args.weight_decay)


def optimizer_class(name: str | None) -> type:
    """--customized_optimizer 'module.Class' (default torch.optim.AdamW)."""
    if not name:
        return torch.optim.AdamW
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError as e:
        raise ImportError(f"--customized_optimizer {name}: cannot import {module_name} ({e})") from None
    except AttributeError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--customized_optimizer {name!r} is not an optimizer class ('module.Class', e.g. "
                         "torch.optim.Adam or bitsandbytes.optim.AdamW8bit)")
    return cls


def pick_seed(args: argparse.Namespace, resume: SavedState | None, accelerator) -> int:
    """The run's seed: the checkpoint's when resuming, else --seed, else a random one shared by all processes."""
    if resume is not None:
        saved = resume.state["seed"]
        if args.seed is not None and args.seed != saved:
            accelerator.print(f"warning: --seed {args.seed} differs from the checkpoint's {saved}; using {saved}")
        return saved
    if args.seed is not None:
        return args.seed
    from accelerate.utils import broadcast_object_list
    seed = [random.SystemRandom().randrange(2**31)]
    broadcast_object_list(seed)
    return seed[0]


def check_resume_config(saved: SavedState, args: argparse.Namespace) -> list[str]:
    """Refuse a checkpoint whose trainable tensors cannot fit this run; notes on what changed and what wins."""
    config = saved.state.get("config", {})
    differ = [f"--{k} {config[k]!r} (checkpoint) vs {getattr(args, k)!r} (now)" for k in RESUME_FIXED
              if k in config and config[k] != getattr(args, k)]
    if differ:
        raise ValueError(f"cannot resume from {saved.path}: it trains other tensors: {'; '.join(differ)}. Resume "
                         "with the checkpoint's values, or start a new --output_path (--lora_checkpoint warm-starts)")
    return [f"--{k} is {getattr(args, k)!r}, the checkpoint was saved with {config[k]!r}: {getattr(args, k)!r} "
            "is used from now on" for k in RESUME_CHANGEABLE if k in config and config[k] != getattr(args, k)]


def claim_output_everywhere(accelerator, folder: Path, resuming: bool):
    """`claim_output` on the main process; its verdict is shared so that every process stops together."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock, notes = claim_output(folder, resuming)
            for note in notes:
                accelerator.print(f"note: {note}")
        except (ValueError, OSError, OutputLocked) as e:
            problem = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        message = [str(problem) if problem else None]
        broadcast_object_list(message)
        if message[0] and problem is None:
            raise ValueError(message[0])
    if problem is not None:
        raise problem
    return lock


def validation_size(args: argparse.Namespace) -> tuple[int, int]:
    if args.height is not None:
        return args.width, args.height
    side = max(16, int(math.sqrt(args.max_pixels)) // 16 * 16)
    return side, side


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """Everything one run needs; `run()` trains. Build it with `train(args)`."""

    def __init__(self, args: argparse.Namespace, step_callback: StepCallback | None = None):
        self.args = args = check_args(args)
        if args.task == "sft:data_process":
            raise ValueError("--task sft:data_process preprocesses, it does not train: call train(args), which "
                             "runs process_data(args)")
        self.step_callback = step_callback
        self.kernels_before = torch.are_deterministic_algorithms_enabled(), \
            torch.is_deterministic_algorithms_warn_only_enabled()
        if args.deterministic:  # (process-wide; close() restores the previous setting)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
            torch.use_deterministic_algorithms(True)
        self.split: SplitCache | None = read_split_cache(args) if args.task == "sft:train" else None
        self.samples = self.split.samples if self.split else load_samples(
            args.dataset_base_path, args.dataset_metadata_path, args.data_file_keys)
        missing = [k for k in args.extra_inputs if k not in args.data_file_keys
                   and any(k not in s.extras for s in self.samples)]
        if missing:
            raise ValueError(f"--extra_inputs {missing}: column missing in some metadata rows")

        self.tensorboard = use_tensorboard(args.report_to)
        self.accelerator = acc = make_accelerator(args, self.tensorboard)
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        if args.enable_model_cpu_offload and (self.world > 1 or zero_stage(acc) or acc.is_fsdp2):
            raise ValueError("--enable_model_cpu_offload trains in one process (the frozen weights stream from this "
                             "process's CPU RAM); on several GPUs shard the model with the FSDP2 / ZeRO-3 configs")
        self.output = Path(args.output_path)
        self.ckpt_root = self.output / "checkpoints"
        self.lock = claim_output_everywhere(acc, self.output, bool(args.resume_from_checkpoint))
        try:
            self._build(step_callback)
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, failed: bool = False) -> None:
        """Release the output folder (the lock also goes when the process dies); a run that failed before
        writing anything leaves no empty folder behind."""
        enabled, warn_only = self.kernels_before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if self.lock is not None:
            self.lock.close(discard=failed)
            self.lock = None

    def _build(self, step_callback: StepCallback | None) -> None:
        from accelerate.utils import set_seed
        args, acc = self.args, self.accelerator
        self.saved = read_newest_readable(resume_candidates(self.ckpt_root, args.resume_from_checkpoint),
                                          self.rank, acc.distributed_type == "DEEPSPEED") \
            if args.resume_from_checkpoint else None
        self.resume = self.saved.path if self.saved else None
        if args.resume_from_checkpoint and self.resume is None:
            acc.print(f"no checkpoint in {self.ckpt_root} yet: starting a new run")
        self.resume_notes = check_resume_config(self.saved, args) if self.saved else []
        self.seed = pick_seed(args, self.saved, acc)
        set_seed(self.seed)  # identical model initialisation on every process

        self.dtype = DTYPE_NAMES[args.torch_dtype] if args.torch_dtype else (
            torch.bfloat16 if acc.device.type == "cuda" else torch.float32)
        sharded = zero_stage(acc) == 3 or acc.is_fsdp2  # whole models stay on the CPU until sharded
        on_cpu = (sharded or args.initialize_model_on_cpu) and not args.enable_model_cpu_offload  # (it computes there)
        pipe = load_pipeline(args, "cpu" if on_cpu else acc.device, self.dtype)
        pipe.device = acc.device
        self._check_split_models(pipe)
        self.module = FluxTrainingModule(
            pipe, trainable_models=args.trainable_models, lora_base_model=args.lora_base_model,
            lora_target_modules=args.lora_target_modules, lora_rank=args.lora_rank,
            lora_checkpoint=args.lora_checkpoint, use_gradient_checkpointing=args.use_gradient_checkpointing,
            use_gradient_checkpointing_offload=args.use_gradient_checkpointing_offload,
            extra_inputs=args.extra_inputs, guidance=args.guidance, t5_sequence_length=args.t5_sequence_length,
            sigma_sampler=make_sigma_sampler(args.timestep_sampling, args.logit_mean, args.logit_std,
                                             pipe.training_sigmas()))
        fp8 = [n for n, p in self.module.named_parameters() if p.requires_grad and p.dtype in FP8_DTYPES]
        if fp8:
            raise ValueError(f"--fp8_models stores trained weights in fp8 ({fp8[0]}, ...): fp8 is for frozen weights; "
                             "train a LoRA on the fp8 model, or leave the trained model out of --fp8_models")
        if args.enable_model_cpu_offload:
            place_trained(self.module, acc.device, on_cpu=args.enable_optimizer_cpu_offload)
        names = list(self.module.trainable_state_dict())
        if not any(k.startswith(args.remove_prefix_in_ckpt) for k in names):
            raise ValueError(f"--remove_prefix_in_ckpt {args.remove_prefix_in_ckpt!r} matches no trainable "
                             f"parameter (they start like {names[0]!r})")
        self.dataset = self._dataset()

        self.steps_per_epoch = len(self.rank_batches(0)) // args.gradient_accumulation_steps
        self.total_steps = args.num_epochs * self.steps_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, args, acc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, args.lr_scheduler, args.lr_warmup_steps, self.total_steps))
        # streamed weights stay where they are stored (accelerate would move the whole model to the device)
        placement = [not args.enable_model_cpu_offload, True]
        self.model, self.optimizer = acc.prepare(self.module, optimizer, device_placement=placement)
        self.unwrapped = acc.unwrap_model(self.model)
        self.trainable = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        self.ema = {n: p.detach().float().clone() for n, p in self.trainable.items()} if args.ema_decay else None

        set_seed(self.seed, device_specific=True)  # each process draws its own noise and timesteps
        self.state = {"step": 0, "epoch": 0, "batch": 0}
        if self.saved is not None:  # restores the RNG states too
            self.state = load_checkpoint(acc, self.saved, self.unwrapped, self.optimizer, self.scheduler, self.ema)
            self.saved = None  # the tensors are in the model now
            exact = self._place_in_epoch()
            self._apply_resume_changes()
            self._warn_if_layout_changed(exact)
        self.files: list[str] = []
        self.losses: list[float] = []

    def _check_split_models(self, pipe) -> None:
        """sft:train: the cached rows fit this DiT (family, dtype); validation images need the encoders too."""
        if self.split is None:
            return
        dtype = str(self.dtype).removeprefix("torch.")
        if (self.split.family, self.split.dtype) != (pipe.family, dtype):
            raise ValueError(f"{self.split.folder} holds {self.split.family} inputs in {self.split.dtype}; this run "
                             f"trains a {pipe.family} DiT in {dtype}: give the DiT and --torch_dtype of the model "
                             "the data_process run encoded for")
        if self.args.validation_prompts and pipe.vae_decoder is None:
            raise ValueError("--validation_prompts under --task sft:train need the text encoders and the VAE: add "
                             "them to the models, or validate after training")

    def _dataset(self) -> ImageDataset:
        """Target sizes (fixed, dynamic or bucketed), and the latent/text cache when asked for."""
        args, acc = self.args, self.accelerator
        self.sizes = sample_sizes(self.samples, args)
        make = lambda paths=None: ImageDataset(self.samples, self.sizes, args.extra_inputs, args.height,  # noqa: E731
                                               args.width, args.max_pixels, paths)
        if self.split is not None:
            return make(self.split.paths)
        if not args.cache_dir:
            return make()
        if self.module.preprocessing_is_trained(cached_only=True):
            raise ValueError("--cache_dir cannot be used while a text encoder or the VAE encoder is trained")
        configs = parse_model_sources(args.model_paths, args.model_id_with_origin_paths)
        tag = models_tag([f for c in configs for f in expand_paths(c.resolve())], self.dtype)  # resolved: on disk
        paths = cache_paths(self.samples, self.sizes, args.cache_dir, args.t5_sequence_length, tag, args.extra_inputs)
        built = build_cache(self.module, make(), paths, self.rank, self.world, show_progress=self.main)
        acc.wait_for_everyone()
        acc.print(f"latent/text cache: {len(paths)} rows in {args.cache_dir} ({built} new on rank 0)")
        if not args.validation_prompts:  # the cached units' encoders (and the VAE decoder) are no longer needed
            pipe = self.module.pipe
            for name in self.module.models_unused_with_cache():
                pipe.release_model(name)
            if acc.device.type == "cuda":
                torch.cuda.empty_cache()
        return make(paths)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`: a function of the seed only, so a resumed run sees the same."""
        args = self.args
        return shard_batches(epoch_batches(self.sizes, args.dataset_repeat, args.batch_size, self.seed, epoch),
                             self.rank, self.world, args.gradient_accumulation_steps)

    def _apply_resume_changes(self) -> None:
        """The command line wins over the checkpoint for the learning rate and the dataset; say so."""
        args, state = self.args, self.state
        for note in self.resume_notes:
            self.accelerator.print(f"warning: {note}")
        if self.scheduler.base_lrs != [args.learning_rate] * len(self.scheduler.base_lrs):
            self.scheduler.base_lrs = [args.learning_rate] * len(self.scheduler.base_lrs)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = args.learning_rate
                group["lr"] = args.learning_rate * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        saved_repeat = state.get("config", {}).get("dataset_repeat", args.dataset_repeat)
        changed = [f"{what} {before} -> {now}" for what, before, now in (
            ("rows", state.get("num_rows", len(self.samples)), len(self.samples)),
            ("--dataset_repeat", saved_repeat, args.dataset_repeat)) if before != now]
        if changed or state["batch"] > len(self.rank_batches(state["epoch"])):
            what = ", ".join(changed) or "batches"
            self.accelerator.print(f"warning: the data changed since the checkpoint ({what}): epoch {state['epoch']} "
                                   "restarts from its first batch")
            state["batch"] = 0
        if state["step"] < self.total_steps:
            return
        # at the end already: a re-run of the same command (a requeued job) succeeds, finishing what is owed
        owed = self.owed_at_end()
        if owed:
            self.accelerator.print(f"note: {self.resume} is the last step of this run, which stopped before its "
                                   f"end-of-run files were written: writing {', '.join(owed)} in {self.output}")
        else:
            self.accelerator.print(f"note: {self.resume} is at step {state['step']}, the end of this run "
                                   f"({self.total_steps} steps: --num_epochs {args.num_epochs} x {self.steps_per_epoch} "
                                   "steps/epoch, --max_steps), and every file of it is written: nothing to train "
                                   "(raise --num_epochs or --max_steps to train further)")

    def owed_at_end(self) -> list[str]:
        """What a run whose last step is done still has to write (it was stopped before): the epoch-end export
        and final checkpoint, or the export of a run that --max_steps ended inside an epoch."""
        state = self.state
        if state["epoch"] >= self.args.num_epochs or state["batch"] == 0:
            return []  # the epoch-end checkpoint is saved last, after the export
        suffixes = ("", "-ema") if self.ema is not None else ("",)
        if state["batch"] >= len(self.rank_batches(state["epoch"])):
            return [f"epoch-{state['epoch']}{s}.safetensors" for s in suffixes] + ["the final checkpoint"]
        names = [f"step-{state['step']}{s}.safetensors" for s in suffixes]
        return [n for n in names if not (self.output / n).is_file()]

    def _place_in_epoch(self) -> bool:
        """The checkpoint's place in its epoch for this process count: the saving run had trained `batch` of its
        own batches on each of its processes, the first batch x world_size of the epoch's list. False when that
        does not split evenly over the processes now (the position is rounded down)."""
        state, saved_world = self.state, self.state.get("world_size", self.world)
        done = state["batch"] * saved_world
        state["batch"] = done // self.world
        return done % self.world == 0

    def _warn_if_layout_changed(self, exact: bool) -> None:
        """Batches are the same for the same --batch_size, and so are the steps for the same number of batches
        per step (processes x accumulation); anything else changes the run."""
        args, state = self.args, self.state
        per_step = lambda world, accumulation: world * accumulation  # noqa: E731
        before = {"batch_size": state.get("batch_size", args.batch_size),
                  "batches per step (processes x accumulation)": per_step(
                      state.get("world_size", self.world),
                      state.get("gradient_accumulation_steps", args.gradient_accumulation_steps))}
        now = {"batch_size": args.batch_size, "batches per step (processes x accumulation)":
               per_step(self.world, args.gradient_accumulation_steps)}
        for key, value in now.items():
            if before[key] != value:
                self.accelerator.print(f"warning: {key} was {before[key]} when {self.resume} was saved, now "
                                       f"{value}: the data order differs from an uninterrupted run")
        if not exact:
            self.accelerator.print(f"warning: {self.resume} stopped at a batch that does not split over {self.world} "
                                   f"processes: epoch {state['epoch']} goes on from batch {state['batch'] * self.world}")
        self.accelerator.print(f"resumed from {self.resume} at step {self.state['step']} "
                               f"(epoch {self.state['epoch']}, batch {self.state['batch']})")

    # -- saving ------------------------------------------------------------------------------------
    def gather_trainable(self) -> dict[str, torch.Tensor]:
        if zero_stage(self.accelerator) == 3:  # a collective: every process calls it
            full = self.accelerator.get_state_dict(self.model)
            return {k: v for k, v in full.items() if k in self.trainable}
        return {k: whole(p.detach()) for k, p in self.trainable.items()}  # FSDP2: gathered (a collective)

    def gather_ema(self) -> dict[str, torch.Tensor] | None:
        return None if self.ema is None else {k: whole(v) for k, v in self.ema.items()}

    def optimizer_state(self) -> dict | None:
        """What optimizer.pt holds: a single process's layout whatever the process count (None: DeepSpeed
        writes its own)."""
        if self.accelerator.distributed_type == "DEEPSPEED":
            return None
        if self.accelerator.is_fsdp2:
            return gather_optimizer_state(self.model, self.optimizer)  # a collective
        return self.optimizer.state_dict()

    def save_weights(self, name: str) -> None:
        """`<output_path>/<name>.safetensors` (and `-ema`), written by the main process only."""
        args = self.args
        sd, ema = self.gather_trainable(), self.gather_ema()
        if self.main:
            dtype = DTYPE_NAMES[args.save_dtype] if args.save_dtype else self.dtype
            info = training_info(args)
            for suffix, tensors in (("", sd), ("-ema", ema)):
                if tensors is not None:
                    path = str(self.output / f"{name}{suffix}.safetensors")
                    save_output(tensors, path, args.remove_prefix_in_ckpt, args.lora_format, args.full_format,
                                dtype, info, self.module.pipe.family)
                    self.files.append(path)
                    tqdm.write(f"saved {path}")
        self.accelerator.wait_for_everyone()

    def save_state(self) -> None:
        record = {**self.state, "seed": self.seed, "world_size": self.world, "batch_size": self.args.batch_size,
                  "gradient_accumulation_steps": self.args.gradient_accumulation_steps, "num_rows": len(self.samples),
                  "config": {k: getattr(self.args, k) for k in (*RESUME_FIXED, *RESUME_CHANGEABLE)}}
        save_checkpoint(self.accelerator, self.ckpt_root, self.state["step"], self.gather_trainable(),
                        self.optimizer_state(), self.scheduler, self.gather_ema(), record,
                        self.args.checkpoints_total_limit)
        self.state_saved_at = self.state["step"]

    def validate(self, step: int) -> None:
        """Sample the validation prompts into `<output_path>/validation/step-N-i.png` (no training RNG used)."""
        args, folder = self.args, self.output / "validation"
        width, height = validation_size(args)
        with self.whole_weights():
            self._sample_validation(folder, step, width, height)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def whole_weights(self):
        """FSDP2: every sharded module holds its whole weights inside (the pipeline's models are then called
        outside the training module's forward); other setups as they are."""
        from torch.distributed.fsdp import FSDPModule
        sharded = [m for m in self.model.modules() if isinstance(m, FSDPModule)] if self.accelerator.is_fsdp2 else []
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()

    def _sample_validation(self, folder: Path, step: int, width: int, height: int) -> None:
        args = self.args
        for i, prompt in enumerate(args.validation_prompts):  # every process runs it (ZeRO-3 gathers weights)
            pipe = self.unwrapped.pipe
            takes_t5 = "t5_sequence_length" in inspect.signature(type(pipe).__call__).parameters  # FLUX.1's only
            t5 = {"t5_sequence_length": args.t5_sequence_length} if takes_t5 else {}
            guidance = {"embedded_guidance": args.validation_guidance} if pipe.uses_embedded_guidance else {}
            image = pipe(prompt, height=height, width=width, seed=self.seed + i,
                         num_inference_steps=args.validation_inference_steps, progress_bar_cmd=lambda x: x,
                         **guidance, **t5)
            if self.main:
                folder.mkdir(parents=True, exist_ok=True)
                save_image(image, folder / f"step-{step}-{i}.png")

    # -- the loop ----------------------------------------------------------------------------------
    def batch_generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator of the noise and noise levels of batch `index` of `epoch` (its place in the epoch's
        list of all processes' batches): the same whichever process trains it."""
        words = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def optimizer_step(self, batches, generator: torch.Generator) -> float | None:
        """Forward/backward one batch; returns the mean loss when an optimizer step completed, else None."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss = self.model(batches, generator)
            mean_loss = self._check_loss(loss, batches)
            acc.backward(loss)
            if acc.sync_gradients and self.args.max_grad_norm:
                acc.clip_grad_norm_(self.params, self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._micro_losses.append(mean_loss)
        if not acc.sync_gradients:
            return None
        self.scheduler.step()
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    self.ema[n].lerp_(p.detach().float(), 1 - self.args.ema_decay)
        value = sum(self._micro_losses) / len(self._micro_losses)
        self._micro_losses = []
        return value

    def _check_loss(self, loss: torch.Tensor, batch: list[dict]) -> float:
        """Before the backward pass, on every process together (one small all-gather per batch), so that a
        non-finite loss never updates the weights and no process is left waiting for a stopped one. Returns the
        mean over the processes (the logged loss, the same as one process accumulating their batches)."""
        losses = self.accelerator.gather(loss.detach().float().reshape(1))
        if torch.isfinite(losses).all():
            return losses.mean().item()
        value = loss.item()
        if math.isfinite(value):
            value, where = losses[~torch.isfinite(losses)][0].item(), "on another process"
        else:
            where = f"metadata rows {sorted({self.samples[item['index']].row for item in batch})}"
        raise self._nonfinite_loss(value, where)

    def _nonfinite_loss(self, value: float, where: str) -> NonFiniteLoss:
        bad = [n for n, p in self.trainable.items() if not all_finite(p.to_local() if hasattr(p, "to_local") else p)]
        cause = (f"the trained weights are already non-finite ({bad[:3]}): NaN/Inf in the model or "
                 "--lora_checkpoint files, or an earlier update diverged") if bad else \
            ("likely causes: --learning_rate too high, NaN/Inf in the model weights or the image, "
             "fp16 overflow (use bf16 or fp32)")
        saved = f"the newest checkpoint is step-{self.state_saved_at} in {self.ckpt_root}" \
            if self.state_saved_at >= 0 else "no checkpoint was saved"
        return NonFiniteLoss(f"training stopped: the loss is {value} at step {self.state['step'] + 1} ({where}); "
                             f"{cause}. The weights were not updated with it; {saved}")

    def after_step(self, step: int, loss: float, progress: tqdm) -> None:
        args = self.args
        self.losses.append(loss)
        lr = self.scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}", lr=f"{lr:.2e}")
        if self.tensorboard:
            self.accelerator.log({"loss": loss, "lr": lr}, step=step)
        if args.enable_csv_log and self.main:
            self.log_csv(step, loss, lr)
        saved = bool(args.save_steps) and step % args.save_steps == 0
        if saved:
            self.save_weights(f"step-{step}")
        if (step % args.checkpointing_steps == 0) if args.checkpointing_steps else saved:
            self.save_state()
        if args.validation_steps and step % args.validation_steps == 0:
            self.validate(step)
        if self.step_callback is not None:
            self.step_callback(step, loss)

    def log_csv(self, step: int, loss: float, lr: float) -> None:
        """--enable_csv_log: one line per optimizer step in <output_path>/loss_log.csv (appended: a resumed run
        continues the file)."""
        path = self.output / "loss_log.csv"
        new = not path.is_file()
        with open(path, "a", encoding="utf-8") as f:
            f.write(("step,loss,lr\n" if new else "") + f"{step},{loss!r},{lr!r}\n")

    def train_epoch(self, epoch: int, batches: list[list[int]], start: int, progress: tqdm) -> None:
        """Batches `start:` of `epoch`, until the epoch or the run ends."""
        state = self.state
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches[start:], collate_fn=list,
                                             num_workers=self.args.dataset_num_workers, generator=torch.Generator())
        for i, batch in enumerate(loader, start=start):
            loss = self.optimizer_step(batch, self.batch_generator(epoch, i * self.world + self.rank))
            if loss is None:
                continue
            state.update(step=state["step"] + 1, epoch=epoch, batch=i + 1)
            self.after_step(state["step"], loss, progress)
            if state["step"] >= self.total_steps:
                break

    def run_epochs(self, progress: tqdm) -> None:
        """From the current position to the end of the run, with the end-of-epoch and end-of-run saves."""
        args, state = self.args, self.state
        for epoch in range(state["epoch"], args.num_epochs):
            batches = self.rank_batches(epoch)
            start = state["batch"] if epoch == state["epoch"] else 0
            if state["step"] >= self.total_steps and start == 0:
                break
            if state["step"] < self.total_steps:  # else: a resumed run only writes what its end owes (below)
                self.train_epoch(epoch, batches, start, progress)
            if state["batch"] < len(batches):  # --max_steps ended training inside the epoch
                if not (args.save_steps and state["step"] % args.save_steps == 0):
                    self.save_weights(f"step-{state['step']}")
                if self.state_saved_at != state["step"]:
                    self.save_state()
                break
            self.save_weights(f"epoch-{epoch}")
            state.update(epoch=epoch + 1, batch=0)
            self.save_state()

    def run(self) -> dict:
        args, acc, state = self.args, self.accelerator, self.state
        if self.tensorboard:
            acc.init_trackers("logs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                              for k, v in vars(args).items()})
        acc.print(f"training {sum(p.numel() for p in self.params):,} parameters of "
                  f"{', '.join(self.module.trained_models())}: {len(self.samples)} rows x {args.dataset_repeat}, "
                  f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, {self.world} process(es)"
                  f"{' sharded with FSDP2' if acc.is_fsdp2 else ''}, "
                  f"seed {self.seed}")
        progress = tqdm(total=self.total_steps, initial=state["step"], disable=not self.main, desc="train",
                        dynamic_ncols=True)
        started, self._micro_losses = time.time(), []
        self.state_saved_at = state["step"] if self.resume is not None else -1
        self.model.train()
        try:  # the bar is closed before any error is printed: the message stays the last line
            self.run_epochs(progress)
        finally:
            progress.close()
        acc.end_training()
        elapsed = time.time() - started
        acc.print(f"done: {state['step']} steps in {elapsed:.1f}s")
        return {"steps": state["step"], "losses": self.losses, "files": self.files, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch, "seconds": elapsed, "module": self.unwrapped}


class TrainingStopped(RuntimeError):
    """Training stopped early (Ctrl-C, a full disk); the message says where the newest checkpoint is."""

    def __init__(self, message: str, interrupted: bool):
        super().__init__(message)
        self.interrupted = interrupted


def newest_checkpoint(root: Path) -> str:
    """Where a resume would start, in words."""
    found = complete_checkpoints(root)
    if not found:
        return "no checkpoint was saved"
    return f"the newest checkpoint is {found[-1].name} (resume with --resume_from_checkpoint latest)"


def process_data(args: argparse.Namespace) -> dict:
    """--task sft:data_process: the preprocessing units over the dataset, their outputs written to --output_path
    (see training/split.py), rows split over the processes. Returns {"rows", "built", "manifest", "module"}."""
    args = check_args(args)
    samples = load_samples(args.dataset_base_path, args.dataset_metadata_path, args.data_file_keys)
    acc = make_accelerator(args, tensorboard=False)
    output = Path(args.output_path)
    lock = claim_output_everywhere(acc, output, resuming=False)
    try:
        dtype = DTYPE_NAMES[args.torch_dtype] if args.torch_dtype else (
            torch.bfloat16 if acc.device.type == "cuda" else torch.float32)
        pipe = load_pipeline(args, acc.device, dtype)
        trained = [m for m in args.trainable_models if getattr(pipe, model_name(m), None) is not None]
        module = FluxTrainingModule(pipe, trainable_models=trained, extra_inputs=args.extra_inputs,
                                    guidance=args.guidance, t5_sequence_length=args.t5_sequence_length)
        if module.preprocessing_is_trained(cached_only=True):
            raise ValueError("--task sft:data_process cannot encode for a run that trains a text encoder or the VAE "
                             "encoder: use --task sft")
        sizes = sample_sizes(samples, args)
        configs = parse_model_sources(args.model_paths, args.model_id_with_origin_paths)
        tag = models_tag([f for c in configs for f in expand_paths(c.resolve())], dtype)
        paths = cache_paths(samples, sizes, str(rows_folder(output)), args.t5_sequence_length, tag, args.extra_inputs)
        rows_folder(output).mkdir(parents=True, exist_ok=True)
        dataset = ImageDataset(samples, sizes, args.extra_inputs, args.height, args.width, args.max_pixels)
        built = build_cache(module, dataset, paths, acc.process_index, acc.num_processes, acc.is_main_process)
        acc.wait_for_everyone()
        manifest = write_manifest(output, args, pipe.family, dtype, samples, sizes, paths) \
            if acc.is_main_process else output / "split_cache.json"
        acc.wait_for_everyone()
        acc.print(f"preprocessed {len(samples)} rows into {output} ({built} new on rank 0); train with --task "
                  f"sft:train --dataset_base_path {output}")
    except BaseException:
        if lock is not None:
            lock.close(discard=True)
        raise
    if lock is not None:
        lock.close()
    return {"rows": len(samples), "built": built, "manifest": manifest, "module": module}


def train(args: argparse.Namespace, step_callback: StepCallback | None = None) -> dict:
    """Train as described by `args` (from `build_parser().parse_args`). Returns a summary: steps, per-step
    losses, files written, seed, and the trained module (`module.pipe` is the pipeline). Ctrl-C and a full
    disk raise TrainingStopped naming the newest checkpoint (a save in progress is not finished: a
    checkpoint made of a half-done step would not be one). `--task sft:data_process` runs `process_data`."""
    if args.task == "sft:data_process":
        return process_data(args)
    trainer = Trainer(args, step_callback)
    try:
        return trainer.run()
    except KeyboardInterrupt:
        raise TrainingStopped(f"interrupted at step {trainer.state['step']}: "
                              f"{newest_checkpoint(trainer.ckpt_root)}", interrupted=True) from None
    except DiskFull as e:
        raise TrainingStopped(f"{e}; {newest_checkpoint(trainer.ckpt_root)}", interrupted=False) from None
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    """train.py's entry point: a user error, Ctrl-C or a full disk prints one line (no traceback) and exits
    with 1 (130 for Ctrl-C, as shells do)."""
    import sys
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except TrainingStopped as e:
        print(f"{'stopped' if e.interrupted else 'error'}: {e}", file=sys.stderr)
        return 130 if e.interrupted else 1
    except KeyboardInterrupt:
        print("stopped: interrupted before training started", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, OutputLocked, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
