"""Resumable training state in atomic checkpoint folders, plus a `latest` pointer.

`<output_path>/checkpoints/step-N/` holds the trainable weights (full names, native dtype), optimizer
and LR-scheduler state, EMA weights, one RNG file per process and `state.json` (step, epoch, position
in the epoch's batch list). A checkpoint is written into a hidden temp folder and renamed into place,
then `latest` (a one-line text file) is replaced atomically, so killing the process at any moment
leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
LATEST = "latest"
NAME = re.compile(r"step-(\d+)")


# ----------------------------------------------------------------------------- RNG

def capture_rng() -> dict:
    """Python, NumPy and torch (CPU + CUDA) generator states, in types `torch.load(weights_only=True)` reads."""
    _, py_state, py_gauss = random.getstate()
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": torch.tensor(py_state, dtype=torch.int64), "python_gauss": py_gauss,
             "numpy": torch.from_numpy(np_key.astype(np.int64)), "numpy_pos": int(np_pos),
             "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate((3, tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, root / LATEST)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.fullmatch(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(NAME.fullmatch(p.name).group(1)))


def resolve_resume(root: Path, spec: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: "latest" (None when there is none yet) or a folder."""
    if spec != LATEST:
        path = Path(spec)
        if not is_complete(path):
            raise ValueError(f"--resume_from_checkpoint {spec}: not a complete training checkpoint (no {STATE_FILE})")
        return path
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if is_complete(path):
            return path
        warnings.warn(f"{pointer} names {path}, which is missing or incomplete; using the newest complete one")
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int | None, protect: str) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never `protect`), and stale temp folders."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    found = [p for p in complete_checkpoints(root) if p.name != protect]
    for p in found[:max(0, len(found) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer,
                    scheduler, ema: dict[str, torch.Tensor] | None, state: dict, keep: int | None) -> Path:
    """Write the training state atomically (call on every process). Returns the checkpoint folder."""
    name = f"step-{step}"
    tmp, final = root / f".tmp-{name}", root / name
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    if deepspeed:  # the engine writes its own sharded model/optimizer files on every rank
        accelerator.save_state(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
    torch.save(capture_rng(), tmp / f"rng-{accelerator.process_index}.pt")
    if main:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        if not deepspeed:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if main:
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        old = None
        if final.exists():
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
        write_pointer(root, name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        prune(root, keep, protect=name)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, module: torch.nn.Module, optimizer, scheduler,
                    ema: dict[str, torch.Tensor] | None) -> dict:
    """Restore weights, optimizer, scheduler, EMA and this process's RNG from `path`; returns state.json."""
    state = json.loads((path / STATE_FILE).read_text())
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    tensors = load_file(path / "trainable.safetensors")
    if tensors.keys() != params.keys():
        diff = sorted(tensors.keys() ^ params.keys())
        raise ValueError(f"{path} was saved with other trainable parameters (different --trainable_models, "
                         f"--lora_base_model, --lora_target_modules?): e.g. {diff[:5]}")
    if accelerator.distributed_type == "DEEPSPEED":
        accelerator.load_state(str(path / "deepspeed"), load_module_strict=False)
    else:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path} has no EMA weights, but --ema_decay is set")
        for k, v in load_file(path / "ema.safetensors").items():
            ema[k].copy_(v)
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=True))
    else:
        warnings.warn(f"{path} has no RNG state for process {accelerator.process_index} "
                      "(saved with fewer processes): random draws will differ from an uninterrupted run")
    return state
