"""ModelConfig: where a model's files are, resolved offline-first, downloaded only when missing."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

DOWNLOAD_RESOURCES = ("modelscope", "huggingface")


@dataclass
class ModelConfig:
    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | None = None
    download_resource: str = "modelscope"
    offload_device: str | torch.device | None = None
    offload_dtype: torch.dtype | None = None
    local_model_path: str = "./models"
    skip_download: bool = False

    def __post_init__(self):
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs `path` (local files) or `model_id` (+ `origin_file_pattern`)")
        self.download_resource = self.download_resource.lower()
        if self.download_resource not in DOWNLOAD_RESOURCES:
            raise ValueError(f"download_resource must be one of {DOWNLOAD_RESOURCES}, got {self.download_resource!r}")
        if self.offload_dtype is not None and not isinstance(self.offload_dtype, torch.dtype):
            raise TypeError(f"offload_dtype must be a torch.dtype, got {self.offload_dtype!r}")

    @property
    def local_dir(self) -> str:
        return os.path.join(self.local_model_path, self.model_id)

    def _local_matches(self) -> list[str]:
        pattern = self.origin_file_pattern or ""
        if pattern == "" or pattern.endswith("/"):
            folder = os.path.normpath(os.path.join(self.local_dir, pattern))
            return [folder] if os.path.isdir(folder) and os.listdir(folder) else []
        return sorted(glob.glob(os.path.join(self.local_dir, pattern)))

    def resolve(self) -> str | list[str]:
        """Local path(s) of the files; downloads only what is not on disk yet."""
        if self.path is not None:
            paths = [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)
            missing = [str(p) for p in paths if not os.path.exists(p)]
            if missing:
                raise FileNotFoundError(f"model file(s) not found: {missing}")
            return self.path
        matches = self._local_matches()
        if not matches:
            if self.skip_download:
                raise FileNotFoundError(
                    f"{self.model_id}/{self.origin_file_pattern or ''} is not under {self.local_dir} "
                    f"and skip_download=True")
            download(self)
            matches = self._local_matches()
            if not matches:
                raise FileNotFoundError(f"download of {self.model_id} gave no file matching "
                                        f"{self.origin_file_pattern!r} in {self.local_dir}")
        self.path = matches[0] if len(matches) == 1 else matches
        return self.path


def _allow_pattern(pattern: str | None) -> str | None:
    if not pattern:
        return None
    return pattern + "*" if pattern.endswith("/") else pattern


def download(config: ModelConfig) -> None:
    """Fetch the files of `config` into its local_dir, skipping files already there."""
    allow = _allow_pattern(config.origin_file_pattern)
    present = [os.path.relpath(p, config.local_dir) for p in
               glob.glob(os.path.join(config.local_dir, "**", "*"), recursive=True) if os.path.isfile(p)]
    os.makedirs(config.local_dir, exist_ok=True)
    if config.download_resource == "modelscope":
        _download_modelscope(config.model_id, config.local_dir, allow, present)
    else:
        _download_huggingface(config.model_id, config.local_dir, allow, present)


def _download_modelscope(model_id: str, local_dir: str, allow: str | None, ignore: list[str]) -> None:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ImportError("downloading from ModelScope needs `pip install modelscope` "
                          "(or pass local files with ModelConfig(path=...))") from None
    snapshot_download(model_id, local_dir=local_dir, allow_file_pattern=allow, ignore_file_pattern=ignore or None)


def _download_huggingface(model_id: str, local_dir: str, allow: str | None, ignore: list[str]) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading from Hugging Face needs `pip install huggingface_hub`") from None
    snapshot_download(repo_id=model_id, local_dir=local_dir, allow_patterns=allow, ignore_patterns=ignore or None)
