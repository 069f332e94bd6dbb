"""ModelConfig: where a model's files are, resolved offline-first, downloaded only when missing; and where
its weights are stored versus computed (DiffSynth-Studio 1.x's `offload_*` fields and 2.0's four stages)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, fields

import torch

from ..ops.files import check_relative, is_inside
from .download import SOURCE_NAMES as DOWNLOAD_RESOURCES
from .download import fetch

Device = str | torch.device | None
_DTYPE_FIELDS = ("offload_dtype", "onload_dtype", "preparing_dtype", "computation_dtype")


@dataclass
class ModelConfig:
    """One model's files: `path` (a file, a folder or a list of shards) or `model_id` + `origin_file_pattern`
    (a glob, or a folder when it ends in "/") under `local_model_path/model_id`, downloaded when missing
    (`download_resource` "modelscope" or "huggingface"; `skip_download=True` never downloads).

    `offload_device`/`offload_dtype`: where and in which dtype the weights are stored (e.g. "cpu",
    torch.float8_e4m3fn). DiffSynth-Studio 2.0's `onload_*`, `preparing_*` and `computation_*` fields are
    accepted with the same meaning; see `storage` for how they map onto this project's storage/compute split.
    2.0's `offload_device="disk"`/`offload_dtype="disk"` (weights left in their file until onloaded) mean
    here that the onload stage is the storage: the weights are read once into `onload_device`/`onload_dtype`.
    `download_source` is 2.0's name for `download_resource`.
    """
    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | None = None
    download_resource: str = "modelscope"
    offload_device: Device = None
    offload_dtype: torch.dtype | None = None
    local_model_path: str = "./models"
    skip_download: bool = False
    onload_device: Device = None
    onload_dtype: torch.dtype | None = None
    preparing_device: Device = None
    preparing_dtype: torch.dtype | None = None
    computation_device: Device = None
    computation_dtype: torch.dtype | None = None
    download_source: str | None = None  # 2.0's name for download_resource

    def __post_init__(self):
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs `path` (local files) or `model_id` (+ `origin_file_pattern`)")
        if self.path is None:  # model_id and the pattern name places inside local_model_path, nowhere else
            check_relative(self.model_id, "ModelConfig model_id")
            check_relative(self.origin_file_pattern or "", "ModelConfig origin_file_pattern")
        if self.download_source is not None:  # 2.0's name; download_resource at its default defers to it
            if self.download_resource.lower() not in ("modelscope", self.download_source.lower()):
                raise ValueError(f"download_source={self.download_source!r} and download_resource="
                                 f"{self.download_resource!r} disagree (2.0 and 1.x names of one field): give one")
            self.download_resource, self.download_source = self.download_source, None
        self.download_resource = self.download_resource.lower()
        if self.download_resource not in DOWNLOAD_RESOURCES:
            raise ValueError(f"download_resource must be one of {DOWNLOAD_RESOURCES}, got {self.download_resource!r}")
        if "disk" in (self.offload_device, self.offload_dtype):
            if self.onload_device is None and self.onload_dtype is None:
                raise ValueError(f"{self!r}: offload 'disk' needs the onload_device/onload_dtype the weights are "
                                 "read into")
            self.offload_device = None if self.offload_device == "disk" else self.offload_device
            self.offload_dtype = None if self.offload_dtype == "disk" else self.offload_dtype
        for name in _DTYPE_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.dtype):
                raise TypeError(f"ModelConfig {name} must be a torch.dtype, got {value!r}")

    def __repr__(self) -> str:  # only the fields that were set: the message of an error stays readable
        items = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                          if getattr(self, f.name) != f.default)
        return f"ModelConfig({items})"

    # -- files -------------------------------------------------------------------------------------
    @property
    def local_dir(self) -> str:
        return os.path.join(self.local_model_path, self.model_id)

    def _local_matches(self) -> list[str]:
        pattern = self.origin_file_pattern or ""
        if pattern == "" or pattern.endswith("/"):
            folder = os.path.normpath(os.path.join(self.local_dir, pattern))
            matches = [folder] if os.path.isdir(folder) and os.listdir(folder) else []
        else:
            matches = sorted(glob.glob(os.path.join(self.local_dir, pattern)))
        for match in [self.local_dir, *matches]:
            self._check_inside(match if os.path.isdir(match) else os.path.dirname(match))
        return matches

    def _check_inside(self, folder: str) -> None:
        """A symlinked folder on the way must not lead out of local_model_path (files themselves may be links,
        as Hugging Face's older local folders link into its cache)."""
        if not is_inside(self.local_model_path, folder):
            raise ValueError(f"{self!r}: {folder} resolves to {os.path.realpath(folder)}, outside "
                             f"local_model_path {self.local_model_path} (through a symlink): refused. To read files "
                             "elsewhere, name them with ModelConfig(path=...)")

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
                    f"{self.model_id} / {self.origin_file_pattern or '(whole repository)'}: nothing matches under "
                    f"{self.local_dir} and skip_download=True")
            fetch(self.model_id, self.origin_file_pattern, self.local_dir, self.download_resource)
            matches = self._local_matches()
            if not matches:
                raise FileNotFoundError(f"download of {self.model_id} gave no file matching "
                                        f"{self.origin_file_pattern!r} in {self.local_dir}")
        self.path = matches[0] if len(matches) == 1 else matches
        return self.path

    # -- storage versus computation ----------------------------------------------------------------
    def storage(self, device: Device, torch_dtype: torch.dtype) -> tuple[Device, torch.dtype | None]:
        """(storage device, storage dtype) of this model in a pipeline computing on `device` in `torch_dtype`
        (None: the pipeline's own).

        Weights here live in one place and dtype and are cast layer by layer for computation (see
        loading/vram.py). 2.0's stages map onto that: offload_* (or onload_* when only it is set) is the
        storage; weights are onloaded and prepared in that same dtype, so a different onload_/preparing_dtype
        is refused; onload_device is the storage device or the compute device (residency is then decided by
        `vram_limit`); preparing_/computation_device must be the pipeline's device and computation_dtype its
        torch_dtype: one pipeline computes everything in one place and dtype.
        """
        dtypes = {n: getattr(self, n) for n in ("offload_dtype", "onload_dtype", "preparing_dtype")
                  if getattr(self, n) is not None}
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"{self!r}: {dtypes} differ; weights are stored, onloaded and sent to the device in "
                             "one dtype (then cast to torch_dtype layer by layer): give them the same dtype")
        if self.computation_dtype is not None and self.computation_dtype != torch_dtype:
            raise ValueError(f"{self!r}: computation_dtype={self.computation_dtype} but from_pretrained("
                             f"torch_dtype={torch_dtype}): every model computes in the pipeline's torch_dtype; "
                             "pass that torch_dtype or drop computation_dtype")
        for name in ("preparing_device", "computation_device"):
            if not _same_device(getattr(self, name), device):
                raise ValueError(f"{self!r}: {name}={getattr(self, name)!r} but from_pretrained(device="
                                 f"{device!r}): computation runs on the pipeline's device; drop {name} or match it")
        storage_device = self.offload_device if self.offload_device is not None else self.onload_device
        if self.onload_device is not None and not (_same_device(self.onload_device, storage_device)
                                                   or _same_device(self.onload_device, device)):
            raise ValueError(f"{self!r}: onload_device={self.onload_device!r} is neither the storage device "
                             f"({storage_device!r}) nor the pipeline's device ({device!r})")
        return storage_device, next(iter(dtypes.values()), None)


def _same_device(a: Device, b: Device) -> bool:
    """None matches anything; "cuda" matches "cuda:0" (an index only counts when both give one)."""
    if a is None or b is None:
        return True
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
