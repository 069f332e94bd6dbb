"""Checkpoint readers: safetensors (own reader, sharded + index), torch files (weights_only), folders.

Tensors are described lazily (`TensorRef`: shape, dtype, where the bytes are) so that detection and
`diffsynth inspect` never read weights. Loading maps each safetensors file copy-on-write and hands out
views of it: a tensor already in the requested dtype costs no copy at all, a converted one exactly one,
so peak memory is the size of the weights in the requested dtype.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not what it claims to be."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Short names of compute/save dtypes on command lines (generate --dtype, train --torch_dtype/--save_dtype).
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class TensorRef:
    """Where one tensor lives. `reader(ref)` returns it as stored; `load` converts dtype/device."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: str
    reader: Callable[["TensorRef"], torch.Tensor]
    offset: int = 0
    nbytes: int = 0
    extra: object = None  # format-specific payload (a preloaded tensor, a GGUF quant type, ...)

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        t = self.reader(self)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t if device is None else t.to(device)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# ----------------------------------------------------------------------------- safetensors

def _read_safetensors_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file is {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    return header, 8 + n


class _MappedFile:
    """One copy-on-write memory map per file, opened on first read and shared by all its tensors.

    Tensors read from it are views of the page cache: loading costs no copy and no page faults on
    fresh memory, and the process holds only the pages it touches. Writes (a merged LoRA, say) go to
    private copies of the touched pages, never to the file.
    """

    def __init__(self, path: str):
        self.path = path
        self._map: mmap.mmap | None = None

    def read(self, ref: TensorRef) -> torch.Tensor:
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(self._map) < ref.offset + ref.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {ref.key!r} (file changed on disk?)")
        data = torch.frombuffer(self._map, dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
        if ref.offset % ref.dtype.itemsize:
            data = data.clone()  # unaligned: a typed view needs an aligned start
        return data.view(ref.dtype).reshape(ref.shape)


def scan_safetensors(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    header, data_start = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    data_size = os.path.getsize(path) - data_start
    mapped = _MappedFile(path)
    refs = {}
    for key, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}: {info!r}") from None
        if end > data_size or begin > end:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {key!r} needs bytes {begin}..{end} "
                                  f"of a {data_size}-byte data section")
        expected = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: corrupt: tensor {key!r} has {end - begin} bytes, shape {shape} needs {expected}")
        refs[key] = TensorRef(key, shape, dtype, path, mapped.read, data_start + begin, end - begin)
    return refs, metadata


# ----------------------------------------------------------------------------- torch files

def _flatten(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def scan_torch_file(path: str) -> dict[str, TensorRef]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle with code, zip damage, ...: all mean "refuse this file"
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: TensorRef(k, tuple(t.shape), t.dtype, path, lambda r: r.extra, extra=t)
            for k, t in _flatten(obj).items()}


# ----------------------------------------------------------------------------- files, shards, folders

def expand_paths(paths: str | os.PathLike | Iterable) -> list[str]:
    """A file, a list of files, or a folder -> the list of weight files (an index picks the shards)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in map(str, paths):
        if not os.path.exists(p):
            raise FileNotFoundError(f"model file not found: {p}")
        if os.path.isdir(p):
            files.extend(_folder_weight_files(p))
        elif p.endswith(".index.json"):
            files.extend(_index_shards(p))
        else:
            files.append(p)
    return files


def _index_shards(index_path: str) -> list[str]:
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are missing: {missing}")
    return [os.path.join(folder, s) for s in shards]


def _folder_weight_files(folder: str) -> list[str]:
    names = sorted(os.listdir(folder))
    for index in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
        if index in names:
            return _index_shards(os.path.join(folder, index))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    chosen = safetensors or [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if not chosen:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, ...) in folder {folder}")
    return [os.path.join(folder, n) for n in chosen]


def scan_file(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    if path.endswith(".gguf"):
        from .gguf import scan_gguf  # optional format, imported only when used
        return scan_gguf(path), {}
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return scan_torch_file(path), {}
    return scan_safetensors(path)


def scan(paths) -> dict[str, TensorRef]:
    """All tensors of one model (several shards merge into one key space)."""
    refs: dict[str, TensorRef] = {}
    for f in expand_paths(paths):
        file_refs, _ = scan_file(f)
        dup = refs.keys() & file_refs.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also present in another shard: {sorted(dup)[:5]}")
        refs.update(file_refs)
    return refs


def read_config(paths) -> dict | None:
    """config.json of an HF/diffusers folder, or next to a single weight file."""
    p = paths if isinstance(paths, (str, os.PathLike)) else (list(paths)[0] if paths else None)
    if p is None:
        return None
    folder = Path(p) if Path(p).is_dir() else Path(p).parent
    cfg = folder / "config.json"
    if cfg.is_file():
        with open(cfg) as f:
            return json.load(f)
    return None


def strip_prefix(mapping: dict, prefix: str) -> dict:
    """The entries whose key starts with `prefix`, with the prefix removed (the others dropped)."""
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def strip_first_prefix(mapping: dict, prefixes: Iterable[str]) -> dict:
    """`strip_prefix` with the first of `prefixes` that some key carries; unchanged when none does."""
    for p in prefixes:
        if any(k.startswith(p) for k in mapping):
            return strip_prefix(mapping, p)
    return dict(mapping)


def load_tensors(refs: dict[str, TensorRef], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor, converting floating ones to `dtype` one at a time."""
    return {k: r.load(dtype, device) for k, r in refs.items()}


def load_state_dict(paths, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """DiffSynth-Studio-style helper: read a checkpoint (file, shards or folder) into a plain state dict."""
    return load_tensors(scan(paths), dtype, device)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write atomically: a temp file beside the target, then rename, so readers never see half a file."""
    from safetensors.torch import save_file
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path: str | os.PathLike, pnginfo=None) -> None:
    """Write a PIL image as PNG atomically (temp file beside it, then rename)."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        image.save(tmp, format="PNG", pnginfo=pnginfo)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
