"""FLUX.1 training: LoRA and full fine-tuning with accelerate (see `diffsynth train --help`)."""
from .args import build_parser, check_args
from .data import DatasetError
from .module import FluxTrainingModule
from .trainer import main, train

__all__ = ["DatasetError", "FluxTrainingModule", "build_parser", "check_args", "main", "train"]
