"""Downloads from ModelScope / Hugging Face, offline-first: files already on disk are never fetched again.

`fetch` is what `ModelConfig.resolve` calls when files are missing. `download_models` and
`download_customized_models` are DiffSynth-Studio 1.x's helpers, with the same arguments and results.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Callable, Sequence

from ..ops.files import check_relative, is_inside

# 1.x scripts name the hubs "ModelScope" / "HuggingFace"; ModelConfig lower-cases them.
SOURCE_NAMES = ("modelscope", "huggingface")


class DownloadError(FileNotFoundError):
    """Files are not on disk and could not be downloaded (no client installed, no network, unknown id)."""


def _modelscope(model_id: str, local_dir: str, allow: str | None, ignore: list[str]) -> None:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ImportError("the modelscope package is not installed (`pip install modelscope`)") from None
    snapshot_download(model_id, local_dir=local_dir, allow_file_pattern=allow, ignore_file_pattern=ignore or None)


def _huggingface(model_id: str, local_dir: str, allow: str | None, ignore: list[str]) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("the huggingface_hub package is not installed (`pip install huggingface_hub`)") from None
    snapshot_download(repo_id=model_id, local_dir=local_dir, allow_patterns=allow, ignore_patterns=ignore or None)


# source -> client call (model_id, local_dir, allow pattern, files to skip); tests replace the entries.
SOURCES: dict[str, Callable[[str, str, str | None, list[str]], None]] = {
    "modelscope": _modelscope, "huggingface": _huggingface}


def allow_pattern(pattern: str | None) -> str | None:
    """The hub glob for a ModelConfig pattern: a folder ("text_encoder_2/") means everything in it."""
    if not pattern:
        return None
    return pattern + "*" if pattern.endswith("/") else pattern


def _files_under(folder: str) -> list[str]:
    return [os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
            if os.path.isfile(p)]


def _first_missing_dir(folder: str) -> str | None:
    """The outermost folder on the way to `folder` that does not exist yet (None if it exists)."""
    missing = None
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def fetch(model_id: str, pattern: str | None, local_dir: str, source: str = "modelscope") -> None:
    """Download what matches `pattern` from `model_id` into `local_dir`, skipping files already there.

    A failure (client not installed, no network, unknown repository) raises DownloadError naming the model,
    the pattern and the folder, and removes the folders this call created if nothing landed in them.
    """
    if source not in SOURCES:
        raise ValueError(f"download source must be one of {SOURCE_NAMES}, got {source!r}")
    created = _first_missing_dir(local_dir)
    present = _files_under(local_dir) if created is None else []
    try:
        SOURCES[source](model_id, local_dir, allow_pattern(pattern), present)
    except Exception as e:  # every client failure means the same thing to the caller: the files are not here
        if created is not None and os.path.isdir(created) and not _files_under(created):
            shutil.rmtree(created)
        raise DownloadError(
            f"{model_id} / {pattern or '(whole repository)'}: not found under {local_dir} and the download "
            f"from {source} failed ({type(e).__name__}: {e}). Put the files there, pass local files with "
            f"ModelConfig(path=...), or choose the other hub with download_resource=") from e


# ----------------------------------------------------------------------------- DiffSynth-Studio 1.x helpers

def _priority(downloading_priority: Sequence[str]) -> list[str]:
    sources = [s.lower() for s in downloading_priority]
    unknown = [s for s in sources if s not in SOURCE_NAMES]
    if unknown or not sources:
        raise ValueError(f"downloading_priority must list 'ModelScope' and/or 'HuggingFace', "
                         f"got {list(downloading_priority)}")
    return sources


def _first_source(sources: list[str], attempt: Callable[[str], None]) -> None:
    """Try each hub in order; raise the last hub's error when none works."""
    for i, source in enumerate(sources):
        try:
            return attempt(source)
        except DownloadError:
            if i == len(sources) - 1:
                raise


def _remove_empty_folders(folder: str, stop: str) -> None:
    """Remove `folder` and its parents while they are empty, up to (not including) `stop`."""
    stop = os.path.abspath(stop)
    folder = os.path.abspath(folder)
    while folder != stop and is_inside(stop, folder) and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)


def download_customized_models(model_id: str, origin_file_path: str, local_dir: str,
                               downloading_priority: Sequence[str] = ("ModelScope", "HuggingFace")) -> list[str]:
    """One file of any repository, saved as `local_dir/<file name>` (1.x's result); returns [that path].
    Nothing is downloaded when the file is already there."""
    check_relative(origin_file_path, "origin_file_path")  # what lands is moved: it must be a file of local_dir
    target = os.path.join(local_dir, os.path.basename(origin_file_path))
    if os.path.isfile(target):
        return [target]

    def attempt(source):
        fetch(model_id, origin_file_path, local_dir, source)
        landed = os.path.join(local_dir, origin_file_path)
        if not is_inside(local_dir, landed):
            raise ValueError(f"{landed} resolves to {os.path.realpath(landed)}, outside {local_dir} (through a "
                             "symlink): not moved")
        if not os.path.isfile(landed):
            raise DownloadError(f"{model_id} has no file {origin_file_path!r} on {source}")
        if os.path.abspath(landed) != os.path.abspath(target):  # the hub kept the repository's sub-folders
            os.replace(landed, target)
            _remove_empty_folders(os.path.dirname(landed), local_dir)
    _first_source(_priority(downloading_priority), attempt)
    return [target]
