"""Checkpoint readers: safetensors (own reader, sharded + index), torch files (weights_only), folders.

Tensors are described lazily (`TensorRef`: shape, dtype, where the bytes are) so that detection and
`diffsynth inspect` never read weights. Loading reads each tensor into its own memory (never a view of
the file: see `_FileReader`) with positional reads straight into the destination tensor, a few tensors at a
time; a dtype conversion reads and converts in chunks, so peak memory is the size of the weights in the
requested dtype plus a few chunks.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import torch

from .names import COMPUTE_DTYPES
from .tensor_ref import CheckpointError, TensorRef, all_finite, load_all, read_exactly  # noqa: F401  (the readers' public names)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Short names of compute/save dtypes on command lines (generate --dtype, train --torch_dtype/--save_dtype).
DTYPE_NAMES = {name: getattr(torch, attr) for name, attr in COMPUTE_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


# ----------------------------------------------------------------------------- safetensors

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit


def require_regular_file(path: str) -> None:
    """A FIFO, socket or device given as a model file would block or stream forever: refuse it up front."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path}: not a regular file (a pipe, device or socket cannot be a checkpoint)")


def _unique_pairs(path: str):
    """json object_pairs_hook refusing duplicated names (json.loads would silently keep the last one)."""
    def hook(pairs: list[tuple[str, object]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            dup = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            raise CheckpointError(f"{path}: corrupt safetensors header: duplicated names {dup[:5]}")
        return out
    return hook


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    require_regular_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file is {size})")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique_pairs(path))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: a JSON object was expected, "
                              f"got a {type(header).__name__}")
    return header, 8 + n


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_entry(path: str, key: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, validated as the format specification requires."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors entry for {key!r}: {what} ({info!r})")
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise bad("needs dtype, shape and data_offsets")
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise bad(f"unsupported dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad("shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise bad("data_offsets must be [begin, end] with integers 0 <= begin <= end")
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = offsets
    expected = torch.Size(shape).numel() * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(f"{path}: corrupt: tensor {key!r} has {end - begin} bytes, shape {shape} needs {expected}")
    return dtype, tuple(shape), begin, end


def _check_layout(path: str, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """Byte ranges must tile the data section exactly: in bounds, disjoint, no gap, nothing after the last."""
    position = 0
    for begin, end, key in sorted(ranges):
        if end > data_size:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {key!r} needs bytes {begin}..{end} "
                                  f"of a {data_size}-byte data section")
        if begin != position:
            kind = "overlaps another tensor" if begin < position else f"leaves a gap after byte {position}"
            raise CheckpointError(f"{path}: corrupt: the byte range {begin}..{end} of tensor {key!r} {kind}")
        position = max(position, end)
    if position != data_size:
        raise CheckpointError(f"{path}: corrupt: {data_size - position} bytes after the last tensor "
                              "(the data section must be exactly covered)")


class _FileReader:
    """Reads each tensor of one safetensors file into fresh memory (copy-on-load, see README "Data safety").

    Loaded weights never alias the file: a file truncated or re-downloaded while a server runs cannot
    crash it (SIGBUS on a memory map) or silently change its weights. A file that changed between the
    scan and the read (size, mtime or inode) is refused instead of being read half old, half new.
    """

    def __init__(self, path: str):
        self.path = path
        self.identity = self._identity(os.stat(path))

    @staticmethod
    def _identity(st: os.stat_result) -> tuple[int, int, int]:
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read(self, ref: TensorRef) -> torch.Tensor:
        out = torch.empty(ref.shape, dtype=ref.dtype)
        self.read_range(ref, out.reshape(-1).view(torch.uint8), 0)
        return out

    def read_range(self, ref: TensorRef, buf: torch.Tensor, start: int) -> None:
        """Fill uint8 `buf` with the tensor's bytes from `start` on: positional reads straight into its memory."""
        if buf.numel() == 0:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self._identity(os.fstat(fd)) != self.identity:
                raise CheckpointError(f"{self.path}: changed on disk since it was opened (replaced or truncated "
                                      "while loading?): load it again")
            read_exactly(fd, memoryview(buf.numpy()), ref.offset + start,
                         f"{self.path}: truncated while reading {ref.key!r} (file changed on disk?)")
        finally:
            os.close(fd)


def scan_safetensors(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    header, data_start = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings, "
                              f"got {metadata!r:.200}")
    data_size = os.path.getsize(path) - data_start
    reader = _FileReader(path)
    refs, ranges = {}, []
    for key, info in header.items():
        dtype, shape, begin, end = _parse_entry(path, key, info)
        ranges.append((begin, end, key))
        refs[key] = TensorRef(key, shape, dtype, path, reader.read, data_start + begin, end - begin,
                              read_range=reader.read_range)
    _check_layout(path, ranges, data_size)
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
    require_regular_file(path)
    try:
        # torch can map only zip-format files; legacy (pre-1.6) files are read into memory instead
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle with code, zip damage, ...: all mean "refuse this file"
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    # clone on load: loaded weights must not stay views of a file that may change (see _FileReader)
    return {k: TensorRef(k, tuple(t.shape), t.dtype, path, lambda r: r.extra.clone(), extra=t)
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
            require_regular_file(p)
            files.append(p)
    return files


IDENTITY_BYTES = 1 << 20  # the header and the first weights: what differs between two files of one layout


def file_identity(path: str | os.PathLike) -> list:
    """What tells one file's content from another's without reading it whole: size, mtime and a hash of its
    first MiB (a safetensors header and the start of the data: another checkpoint of the same model differs
    there even when it was copied with its size and mtime kept). Independent of the path it is reached by."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(IDENTITY_BYTES)).hexdigest()
    return [st.st_size, st.st_mtime_ns, head]


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON in this {what} ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: this {what} must hold a JSON object, got a {type(value).__name__}")
    return value


def is_inside(folder: str | os.PathLike, name: str | os.PathLike) -> bool:
    """`name` (relative to `folder`, or a path) is `folder` or under it once symlinks are resolved."""
    real = os.path.realpath(folder)
    return os.path.commonpath([real, os.path.realpath(os.path.join(real, name))]) == real


def check_relative(name: str, what: str) -> None:
    """A path built from a name (a model id, a file pattern) must stay inside the folder it is joined to:
    an absolute path, a drive or a `..` part would read, write or move files anywhere."""
    parts = re.split(r"[\\/]", name)
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts \
            or "\0" in name:
        raise ValueError(f"{what} {name!r} must be a relative path inside the models folder (no '..', not absolute)")


def _index_shards(index_path: str) -> list[str]:
    weight_map = read_json(index_path, "shard index").get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if not is_inside(folder, s)]
    if outside:  # an index must not make us open /etc/passwd or another model's files
        raise CheckpointError(f"{index_path} names shards outside its folder: {outside[:5]}")
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
    require_regular_file(path)
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
    return read_json(cfg, "model config") if cfg.is_file() else None


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
    """Read every tensor (a few threads), converting floating ones to `dtype` as they are read."""
    return load_all({k: (r, dtype) for k, r in refs.items()}, device)


def load_state_dict(paths, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """DiffSynth-Studio-style helper: read a checkpoint (file, shards or folder) into a plain state dict."""
    return load_tensors(scan(paths), dtype, device)


# ----------------------------------------------------------------------------- atomic writes

# `<target>.tmp-<pid>-<n>-<tag>`: the writer's PID tells a leftover of a killed process from a live write, and
# the tag (a keyed hash of the rest of the name) is our marker: only names this project wrote carry it, so a
# user's `holiday.tmp-2019.png` or `notes.tmp-12-3` in the same folder is never taken for a temp file.
TEMP_NAME = re.compile(r"(.+)\.tmp-(\d+)-(\d+)-([0-9a-f]{8})")
_temp_counter = itertools.count()


def _temp_tag(target_name: str, pid: int, n: int) -> str:
    return hashlib.blake2b(f"{target_name}|{pid}|{n}".encode(), digest_size=4, person=b"diffsynth.tmp").hexdigest()


def temp_path(path: str, pid: int | None = None) -> str:
    """A temporary name beside `path`, unique per process and call (`pid`: another writer's, for tests)."""
    pid, n = os.getpid() if pid is None else pid, next(_temp_counter)
    return f"{path}.tmp-{pid}-{n}-{_temp_tag(os.path.basename(path), pid, n)}"


def temp_writer(name: str) -> int | None:
    """The PID of the process that wrote temp file `name`, None when `name` is not one of our temp names."""
    m = TEMP_NAME.fullmatch(name)
    if m is None or m.group(4) != _temp_tag(m.group(1), int(m.group(2)), int(m.group(3))):
        return None
    return int(m.group(2))


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, any_pid: bool = False) -> list[str]:
    """Delete temp files in `folder` left by killed writers of this project (their PID is gone; `any_pid`: every
    one of our temp files, for a folder locked by the caller, where no other writer can be at work). Files that
    only look like temp files (no marker, see TEMP_NAME) are never touched. Returns what was removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.scandir(folder):
        pid = temp_writer(entry.name)
        if pid is not None and entry.is_file(follow_symlinks=False) and (any_pid or not _pid_alive(pid)):
            os.remove(entry.path)
            removed.append(entry.path)
    return removed


def check_writable(folder: Path, what: str) -> bool:
    """Create `folder` if needed and prove a file can be written in it, before any expensive work.
    Returns whether the folder was created."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} exists and is not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = Path(temp_path(str(folder / ".write-test")))
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {folder} is not writable ({e.strerror or e})") from None
    return created


def fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, path: str, overwrite: bool = True) -> None:
    """Move a finished temp file to `path` in one step. overwrite=False never replaces an existing file,
    even one created by a concurrent process after any earlier check (a hard link fails if `path` exists)."""
    fsync_path(tmp)  # the data is on disk before the name points at it
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (written by another process?): not overwritten") from None
    os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: os.umask can only be read by setting it. Files get the mode a plain open() gives
# (safetensors' writer creates its files 0600, which other users of a shared model folder cannot read).
FILE_MODE = 0o666 & ~_umask()


class DiskFull(OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the folder."""


def is_disk_full(e: BaseException) -> bool:
    """`e` says the disk is full: an OSError's errno, or the text writers that wrap it put in their message
    (safetensors' Rust writer: "StorageFull"; others: "No space left on device")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(e) for s in ("No space left", "StorageFull", "Disk quota exceeded"))


def disk_full(folder: str | os.PathLike, what: str) -> DiskFull:
    """The one-line error for `what` not written into `folder` because its disk is full."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
    except OSError:
        free = "free space unknown"
    error = DiskFull(f"{what} not written: the disk of {folder} is full ({free})")
    error.errno = errno.ENOSPC  # set apart: given to the constructor, it would prefix the message
    return error


def _write_atomic(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool) -> None:
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists: not overwritten")
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        publish(tmp, path, overwrite)
    except Exception as e:
        if is_disk_full(e):
            raise disk_full(os.path.dirname(os.path.abspath(path)), path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_text(text: str, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Write a UTF-8 text file atomically."""
    _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if not all_finite(v)]


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
                     overwrite: bool = True) -> None:
    """Write atomically (temp file beside the target, fsync, rename): readers never see half a file.
    Tensors holding NaN/Inf are refused: such a file is never useful and would hide the real failure."""
    from safetensors.torch import save_file
    bad = nonfinite_keys(tensors)
    if bad:
        raise ValueError(f"{path}: not written: {len(bad)} tensors hold NaN/Inf, e.g. {bad[:3]}")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write_atomic(path, lambda tmp: save_file(cpu, tmp, metadata=metadata), overwrite)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | os.PathLike) -> str:
    """The format an output file's extension names; ValueError for others."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"{path}: the extension must be one of {', '.join(IMAGE_FORMATS)} (it picks the format)")
    return IMAGE_FORMATS[ext]


def save_image(image, path: str | os.PathLike, text: dict[str, str] | None = None, overwrite: bool = True) -> None:
    """Write a PIL image atomically in the format its extension names. `text`: PNG text chunks; a JPEG
    keeps only the `parameters` entry, as its comment; a WebP none."""
    fmt = image_format(path)
    kwargs: dict = {}
    if fmt == "PNG" and text:
        from PIL.PngImagePlugin import PngInfo
        kwargs["pnginfo"] = PngInfo()
        for k, v in text.items():
            kwargs["pnginfo"].add_text(k, v)
    if fmt == "JPEG":
        from .images import convert_image
        kwargs.update(quality=95, comment=(text or {}).get("parameters", ""))
        image = convert_image(image)
    _write_atomic(path, lambda tmp: image.save(tmp, format=fmt, **kwargs), overwrite)
