"""The Train tab's work: `diffsynth train` (LoRA on the DiT) in a subprocess, so the page stays responsive;
its progress line is read for the loss plot, its output folder for the checkpoints."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..training.data import METADATA_NAMES

# the trainer's tqdm line: "train:  40%|####| 4/10 [00:01<00:02, loss=0.1234, lr=2.00e-03]"
PROGRESS = re.compile(r"(\d+)/(\d+) \[[^\]]*?loss=([-+0-9.eE]+|nan|inf)")
LOG_LINES = 200  # lines of the trainer's output kept for the page


@dataclass
class TrainSettings:
    data: Path  # a folder with metadata.csv/json/jsonl (image, prompt)
    output: Path  # the run's folder (LoRA checkpoints step-N.safetensors)
    rank: int = 8
    steps: int = 150
    learning_rate: float = 2e-3
    batch_size: int = 4
    height: int = 64
    width: int = 64
    seed: int = 0

    def check(self) -> None:
        """Bad numbers named before a process starts."""
        for name in ("rank", "steps", "batch_size", "height", "width"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"training {name.replace('_', ' ')} must be a positive whole number, got {value}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.learning_rate}")
        if not any((self.data / name).is_file() for name in METADATA_NAMES):
            raise ValueError(f"training images: {self.data} has no metadata.csv (columns image, prompt)")


def train_argv(settings: TrainSettings, models: list[str]) -> list[str]:
    """The `diffsynth train` arguments of a DiT LoRA (the flux-nano colour recipe with the defaults)."""
    s = settings
    return ["--dataset_base_path", str(s.data), "--height", str(s.height), "--width", str(s.width),
            "--model_paths", json.dumps(models), "--lora_base_model", "dit", "--lora_rank", str(int(s.rank)),
            "--learning_rate", str(s.learning_rate), "--batch_size", str(int(s.batch_size)),
            "--dataset_repeat", "1000", "--num_epochs", "1", "--max_steps", str(int(s.steps)),
            "--cache_dir", str(s.output / "cache"), "--output_path", str(s.output), "--seed", str(s.seed),
            "--report_to", "none"]


class TrainingRun:
    """One `diffsynth train` process; its output is read on a thread into losses and log lines."""

    def __init__(self, settings: TrainSettings, models: list[str]):
        settings.check()
        if settings.output.exists():
            raise FileExistsError(f"training run {settings.output.name} already exists: choose another name")
        settings.output.mkdir(parents=True)
        self.settings = settings
        self.command = [sys.executable, "-m", "diffsynth.cli", "train", *train_argv(settings, models)]
        self.losses: list[tuple[int, float]] = []
        self.lines: list[str] = []
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.settings.output / "train.log", "wb") as log:
            partial = b""
            for chunk in iter(lambda: self.process.stdout.read1(4096), b""):
                log.write(chunk)
                *lines, partial = re.split(rb"[\r\n]", partial + chunk)
                for line in lines:
                    self._line(line.decode(errors="replace").strip())
            self._line(partial.decode(errors="replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        m = PROGRESS.search(line)
        if m:
            step, loss = int(m.group(1)), float(m.group(3))
            if not self.losses or step > self.losses[-1][0]:
                self.losses.append((step, loss))
            return
        self.lines = [*self.lines[-LOG_LINES + 1:], line]

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def checkpoints(self) -> list[Path]:
        return sorted(self.settings.output.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)

    def error(self) -> str | None:
        """The trainer's error message once it failed, else None."""
        code = self.process.poll()
        if code in (None, 0):
            return None
        self.reader.join(timeout=5)
        errors = [line for line in self.lines if line.startswith("error:")]
        return (errors or self.lines or [f"exit status {code}"])[-1]

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            self.process.wait(timeout=30)
