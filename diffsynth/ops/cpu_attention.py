"""bf16 attention for x86 CPUs with AVX512-BF16: a small C kernel, compiled once, called through ctypes.

torch's CPU flash-attention kernel reached ~150-170 GFLOPS in bf16 on a 2-core Zen 4 (AVX512-BF16), where
oneDNN's bf16 GEMMs reach ~400, so attention was 40 % of a bf16 FLUX step. `kernels/attention_bf16.c`
computes the same exact attention (fp32 scores and softmax, bf16 probabilities, fp32 accumulation, as
torch's kernel) with vdpbf16ps register tiles: ~330 GFLOPS there (6 heads x 1536 tokens x 128: 22 vs 46 ms),
with the same error against an fp32 reference. It runs on torch's OpenMP thread pool (the libgomp torch
loaded), so no second set of threads competes with torch's spinning ones.

The kernel is compiled on first use with the system C compiler (`$CC`, else cc/gcc/clang) into
`$DIFFSYNTH_KERNEL_CACHE` (default: `$XDG_CACHE_HOME/diffsynth/kernels` or `~/.cache/diffsynth/kernels`),
under a name that hashes the source and flags, written atomically. Without a compiler, on other CPUs or
systems, or when compiling fails, `attention` uses torch's SDPA and `kernel_status()` says why.

Used for: CPU bf16 inference without a mask (FLUX's joint attention), head sizes 64/128/192/256. Autograd,
torch.compile tracing and masks stay on SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("kernels") / "attention_bf16.c"
_FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512bf16", "-mfma")
_KEYS_PER_BLOCK = 64  # KB in the C source: keys are packed in blocks of this many
_state: dict = {}
_lock = threading.Lock()  # one build, even when the first calls come from several threads


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cache_dir() -> Path:
    if os.environ.get("DIFFSYNTH_KERNEL_CACHE"):
        return Path(os.environ["DIFFSYNTH_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffsynth" / "kernels"


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    return next(([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _compile(compiler: list[str]) -> Path:
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join((*compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"attention_bf16-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".attention_bf16-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed on {_SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state.update(_build())
    return _state["lib"]


def _build() -> dict:
    """The loaded kernel, or why there is none. Where this CPU could run it but it cannot be built (no compiler, a
    failed build) a warning says so once; on other systems and CPUs it is simply not used."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {"lib": None, "why": f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"}
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= _cpu_flags():
        return {"lib": None, "why": "this CPU has no AVX512-BF16"}
    compiler = _compiler()
    if compiler is None:
        why = "no C compiler found (set $CC, or install gcc)"
    else:
        try:
            lib = ctypes.CDLL(str(_compile(compiler)))
            fn = lib.attention_bf16
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
            why = f"could not build the kernel: {err}"
        else:
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.POINTER(ctypes.c_long)] * 2 + [ctypes.c_float, ctypes.c_long]
            return {"lib": lib, "why": None}
    warnings.warn(f"bf16 CPU attention falls back to torch's SDPA (about half as fast here): {why}", stacklevel=4)
    return {"lib": None, "why": why}


def kernel_status() -> str | None:
    """None when the bf16 CPU kernel is usable here, else why not (building it on first call)."""
    _load()
    return _state["why"]


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether `attention_bf16` takes this call (else the caller uses SDPA)."""
    if mask is not None or q.device.type != "cpu" or q.dim() != 4:
        return False
    if any(type(t) is not torch.Tensor or t.dtype != torch.bfloat16 for t in (q, k, v)):
        return False
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        return False
    if q.shape[-1] % 64 or q.shape[-1] > 256 or k.numel() == 0 or q.numel() == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    return not torch.compiler.is_compiling() and _load() is not None


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for bf16 (B, H, L, D) CPU tensors (check `applies` first). The result is a
    (B, H, L, D) view of a (B, L, H, D) tensor, the layout the DiTs merge heads from without a copy."""
    lib = _load()
    q, k, v = (t if t.stride(-1) == 1 and t.stride(-2) % 2 == 0 else t.contiguous() for t in (q, k, v))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    padded = b * h * -(-lk // _KEYS_PER_BLOCK) * _KEYS_PER_BLOCK * d
    kp, vp = q.new_empty(padded), q.new_empty(padded)
    out = q.new_empty(b, lq, h, d).transpose(1, 2)
    dims = (ctypes.c_long * 5)(b, h, lq, lk, d)
    strides = (ctypes.c_long * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    code = lib.attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), kp.data_ptr(),
                              vp.data_ptr(), dims, strides, d ** -0.5, torch.get_num_threads())
    if code == 2:
        raise MemoryError("bf16 CPU attention: the kernel could not allocate its scratch memory")
    if code != 0:
        raise RuntimeError(f"bf16 CPU attention kernel refused head size {d} / {lk} keys (error {code})")
    return out
