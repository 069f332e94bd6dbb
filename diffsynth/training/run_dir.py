"""The output folder of a training run: checked writable up front, locked for the run, never taken over.

- **Lock**: the main process holds an exclusive `flock` on the `<output_path>` folder for the whole run, so
  a second run in the same folder stops at once instead of mixing its files with the first one's. The
  kernel drops the lock when the process dies, so a killed run never leaves a stale lock.
- **No take-over**: a new run (no `--resume_from_checkpoint`) refuses a folder that already holds another
  run's outputs or checkpoints; nothing in it is touched.
- **Clean-up**: under the lock, what killed saves left behind is repaired or removed (`checkpoint.recover`).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..ops.files import check_writable, remove_stale_temps
from .checkpoint import recover

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected from each other there
    fcntl = None


class OutputLocked(RuntimeError):
    """Another live process trains into the same --output_path."""


class FolderLock:
    """An exclusive flock on the folder itself: no lock file is created, and none is left behind."""

    def __init__(self, folder: Path, created: bool = False):
        self.folder, self.created = folder, created
        self.fd: int | None = os.open(folder, os.O_RDONLY)
        if fcntl is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise OutputLocked(f"--output_path {folder} is in use by another running training; wait for it to "
                               "finish or choose another --output_path") from None

    def close(self, discard: bool = False) -> None:
        """Unlock; `discard`: a run that failed before writing anything removes the folder it created."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if discard and self.created and not any(self.folder.iterdir()):
            self.folder.rmdir()


def previous_run_files(folder: Path) -> list[str]:
    """What in `folder` belongs to an earlier run: weight outputs and checkpoints."""
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    ckpt = folder / "checkpoints"
    if ckpt.is_dir():
        found += sorted(f"checkpoints/{p.name}" for p in ckpt.iterdir())
    return found


def claim_output(folder: Path, resuming: bool) -> tuple[FolderLock, list[str]]:
    """Main process, before any model loads: writable check, lock, repair, take-over check.
    Returns (lock handle, notes about what was repaired)."""
    lock = FolderLock(folder, created=check_writable(folder, "--output_path"))
    try:
        existing = previous_run_files(folder)
        if existing and not resuming:  # checked before any repair: the other run's folder stays as it is
            listed = ", ".join(existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6 else "")
            raise ValueError(f"--output_path {folder} already holds another run ({listed}); nothing was changed. "
                             "Continue it with --resume_from_checkpoint latest, or choose another --output_path")
        notes = recover(folder / "checkpoints")
        for sub in (folder, folder / "validation"):
            notes += [f"removed temp file {os.path.basename(f)}" for f in remove_stale_temps(sub, any_pid=True)]
    except BaseException:
        lock.close(discard=True)
        raise
    return lock, notes
