"""Resumable training state in atomic checkpoint folders, plus a `latest` pointer.

`<output_path>/checkpoints/step-N/` holds the trainable weights (full names, native dtype), optimizer
and LR-scheduler state, EMA weights, one RNG file per process and `state.json` (step, epoch, position
in the epoch's batch list). A checkpoint is written into a hidden temp folder (state.json last, atomically)
and renamed into place, then `latest` (a one-line text file) is replaced atomically. A kill at any
moment leaves a complete checkpoint on disk: at worst in the temp folder or in the folder being
replaced, which `recover` (run before every resume) renames back into place.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..ops.files import (CheckpointError, disk_full, fsync_path, is_disk_full, load_state_dict, nonfinite_keys,
                         remove_stale_temps, save_text)

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

def write_pointer(root: Path, name: str) -> None:
    save_text(name + "\n", root / LATEST)


def is_complete(path: Path) -> bool:
    """state.json is written last, atomically, after every other file is on disk."""
    return (path / STATE_FILE).is_file()


def step_of(path: Path) -> int:
    return int(NAME.fullmatch(path.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if NAME.fullmatch(p.name) and is_complete(p)), key=step_of)


def _leftover_target(folder: Path) -> str | None:
    """The `step-N` a `.tmp-step-N` / `.old-step-N-PID` folder belongs to."""
    m = re.fullmatch(r"\.(?:tmp-(step-\d+)|old-(step-\d+)-\d+)", folder.name)
    return (m.group(1) or m.group(2)) if m else None


def recover(root: Path) -> list[str]:
    """Repair what a killed save left behind; call before resolving a resume or pruning, with the output folder
    locked. A missing `step-N` is restored from its complete temp folder (the newer state) or else from the
    complete previous version being replaced; then every leftover folder and temp file goes. Returns notes."""
    if not root.is_dir():
        return []
    notes, leftovers = [], sorted(p for p in root.iterdir() if p.is_dir() and _leftover_target(p))
    # temp folders before old ones: a complete temp folder is the newer state of that step
    for folder in sorted(leftovers, key=lambda p: not p.name.startswith(".tmp-")):
        final = root / _leftover_target(folder)
        if not final.exists() and is_complete(folder):
            os.rename(folder, final)
            notes.append(f"restored {final.name} from {folder.name} (a save was interrupted)")
    for folder in leftovers:
        if folder.exists():
            shutil.rmtree(folder)
    notes += [f"removed temp file {os.path.basename(f)}" for f in remove_stale_temps(root, any_pid=True)]
    if notes:
        fsync_path(root)
    return notes


def resume_candidates(root: Path, spec: str) -> list[Path]:
    """Checkpoints `--resume_from_checkpoint` may use, preferred first: the folder it names, or for
    "latest" the one `latest` names and then every other complete one, newest first."""
    if spec != LATEST:
        path = Path(spec)
        if not is_complete(path):
            raise ValueError(f"--resume_from_checkpoint {spec}: not a complete training checkpoint (no {STATE_FILE})")
        return [path]
    found = complete_checkpoints(root)[::-1]
    pointer = root / LATEST
    if not pointer.is_file():
        return found
    name = pointer.read_text().strip()
    if not NAME.fullmatch(name):  # only a step-N folder of this checkpoints/ may be named
        raise ValueError(f"{pointer} names {name!r}, not a step-N folder of {root}: refusing to follow it "
                         "(repair or delete the file, or pass --resume_from_checkpoint <folder>)")
    if not is_complete(root / name):
        warnings.warn(f"{pointer} names {name}, which is missing or incomplete; using the newest complete one")
        return found
    return [root / name] + [p for p in found if p.name != name]


def resolve_resume(root: Path, spec: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: "latest" (None when there is none yet) or a folder."""
    found = resume_candidates(root, spec)
    return found[0] if found else None


def prune(root: Path, keep: int | None, protect: str) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never `protect`). Leftovers of killed saves go
    through `recover` first, so a complete state in them becomes a checkpoint instead of being deleted."""
    recover(root)
    if keep is None:
        return
    found = [p for p in complete_checkpoints(root) if p.name != protect]
    for p in found[:max(0, len(found) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _replace_folder(root: Path, tmp: Path, name: str) -> None:
    """Rename the complete `tmp` to `name`. An existing `name` is first moved aside; a kill between the two
    renames leaves both complete folders, which `recover` turns back into `name`."""
    final, old = root / name, None
    if final.exists():
        old = root / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(root)
    write_pointer(root, name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_files(accelerator, tmp: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict | None,
                 scheduler, ema: dict[str, torch.Tensor] | None) -> None:
    """Every file of a checkpoint but state.json, fsynced (each process writes its own)."""
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    if deepspeed:  # the engine writes its own sharded model/optimizer files on every rank
        accelerator.save_state(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
    torch.save(capture_rng(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        if not deepspeed:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)


def save_checkpoint(accelerator, root: Path, step: int, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict | None, scheduler, ema: dict[str, torch.Tensor] | None, state: dict,
                    keep: int | None) -> Path:
    """Write the training state atomically (call on every process). `trainable`, `optimizer_state` (the layout
    of a single process's `optimizer.state_dict()`; None under DeepSpeed) and `ema` are whole tensors, which
    the main process writes. Returns the checkpoint folder."""
    name = f"step-{step}"
    tmp = root / f".tmp-{name}"
    main = accelerator.is_main_process
    if main:
        bad = nonfinite_keys(trainable) + nonfinite_keys(ema or {})
        if bad:  # checked before any file is touched: the last good checkpoint stays the newest
            raise ValueError(f"checkpoint {name} not written: NaN/Inf in {bad[:3]}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_files(accelerator, tmp, trainable, optimizer_state, scheduler, ema)
        if main:
            save_text(json.dumps(state, indent=2), tmp / STATE_FILE)  # last: its presence means complete
            fsync_path(tmp)
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # half a checkpoint: useless, and it holds the space
        raise disk_full(root, f"checkpoint {name}") from None
    if main:
        _replace_folder(root, tmp, name)
        prune(root, keep, protect=name)
    accelerator.wait_for_everyone()
    return root / name


# ----------------------------------------------------------------------------- FSDP2 (sharded tensors)

def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), else `t`."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every process) split as `like` is when `like` is an FSDP2 shard, else `full`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _param_names(model: torch.nn.Module, optimizer) -> list[str]:
    """The model's name of each optimizer parameter, in `optimizer.state_dict()`'s index order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """An FSDP2 optimizer's sharded state as whole tensors, in a single process's `optimizer.state_dict()`
    layout (parameter indices), so that checkpoints do not depend on the process count. A collective: every
    process calls it; the main process gets the state, the others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_sharded_optimizer_state(model: torch.nn.Module, optimizer, saved: dict) -> None:
    """The inverse of gather_optimizer_state: every process passes the whole saved state and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    optimizer = getattr(optimizer, "optimizer", optimizer)
    names = _param_names(model, optimizer)
    full = {"state": {names[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):  # as saved (it makes tuples lists)
        group.update({k: v for k, v in saved_group.items() if k != "params"})


# ----------------------------------------------------------------------------- loading

@dataclass
class SavedState:
    """Everything a checkpoint holds, read into memory (so that a damaged file is found before any change)."""
    path: Path
    state: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict | None
    scheduler: dict
    ema: dict[str, torch.Tensor] | None
    rng: dict | None


def read_checkpoint(path: Path, process_index: int = 0, deepspeed: bool = False) -> SavedState:
    """Read and check every file of `path`; CheckpointError naming the file when one is damaged."""
    def torch_file(name: str):
        try:
            return torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, missing file, ...: the file is unusable either way
            raise CheckpointError(f"{path / name}: unreadable ({type(e).__name__}: {e})") from None
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({e})") from None
    rng = path / f"rng-{process_index}.pt"
    return SavedState(
        path=path, state=state, trainable=load_state_dict(str(path / "trainable.safetensors")),
        optimizer=None if deepspeed else torch_file("optimizer.pt"), scheduler=torch_file("scheduler.pt"),
        ema=load_state_dict(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None,
        rng=torch_file(rng.name) if rng.is_file() else None)


def read_newest_readable(candidates: list[Path], process_index: int = 0, deepspeed: bool = False,
                         ) -> SavedState | None:
    """The first of `candidates` whose files all read back; a damaged one is skipped with a warning."""
    problems = []
    for path in candidates:
        try:
            saved = read_checkpoint(path, process_index, deepspeed)
        except (CheckpointError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"skipped damaged checkpoint(s), resuming from {path}: " + "; ".join(problems))
        return saved
    if problems:
        raise ValueError("no readable checkpoint to resume from: " + "; ".join(problems))
    return None


def load_checkpoint(accelerator, saved: SavedState, module: torch.nn.Module, optimizer, scheduler,
                    ema: dict[str, torch.Tensor] | None) -> dict:
    """Restore weights, optimizer, scheduler, EMA and this process's RNG from `saved`; returns state.json."""
    path = saved.path
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if saved.trainable.keys() != params.keys():
        diff = sorted(saved.trainable.keys() ^ params.keys())
        raise ValueError(f"{path} was saved with other trainable parameters (different --trainable_models, "
                         f"--lora_base_model, --lora_target_modules?): e.g. {diff[:5]}")
    shapes = [f"{k} {tuple(v.shape)} != {tuple(params[k].shape)}" for k, v in saved.trainable.items()
              if v.shape != params[k].shape]
    if shapes:
        raise ValueError(f"{path} holds parameters of other shapes (saved != now; a different --lora_rank?): "
                         f"{shapes[:3]}")
    if accelerator.distributed_type == "DEEPSPEED":
        accelerator.load_state(str(path / "deepspeed"), load_module_strict=False)
    else:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(shard_like(saved.trainable[k], p))
        if getattr(accelerator, "is_fsdp2", False):
            load_sharded_optimizer_state(module, optimizer, saved.optimizer)
        else:
            optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
    if ema is not None:
        if saved.ema is None:
            raise ValueError(f"{path} has no EMA weights, but --ema_decay is set")
        for k, v in saved.ema.items():
            ema[k].copy_(shard_like(v, ema[k]))
    if saved.rng is not None:
        restore_rng(saved.rng)
    else:
        warnings.warn(f"{path} has no RNG state for process {accelerator.process_index} "
                      "(saved with fewer processes): random draws will differ from an uninterrupted run")
    return saved.state
