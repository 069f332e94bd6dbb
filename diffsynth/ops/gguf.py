"""GGUF files (the city96 FLUX layout: BFL key names) and GGML block dequantization in torch.

`scan_gguf` reads only the header: every tensor becomes a `TensorRef` whose `extra` is the GGML type
name ("Q4_K", "F16", ...), so `diffsynth inspect` can report quant types without reading weights.
Plain types (F32/F16/BF16/...) load as ordinary tensors. Quantized types load as their raw blocks:
a uint8 tensor of shape (*logical_shape[:-1], bytes_per_row). Rows are quantized independently, so row
operations (slicing, concatenation, the BFL final-layer half swap) are valid on the raw bytes, and
`dequantize` turns a raw tensor back into floats on whatever device it sits (CPU or GPU) per layer.

Block layouts follow ggml's `block_*` structs (little endian, fp16 scales); K-quants use
256-element super-blocks.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Callable

import torch

from .tensor_ref import CheckpointError, TensorRef, read_exactly

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
QK_K = 256

# type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210), 20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
PLAIN_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}
BLOCK_SIZES: dict[str, tuple[int, int]] = {name: (bs, ts) for name, bs, ts in GGML_TYPES.values()}


def is_quantized(type_name: object) -> bool:
    """True for GGML block-quantized type names (those `dequantize` handles)."""
    return isinstance(type_name, str) and type_name in _DEQUANT


def row_bytes(type_name: str, row_length: int) -> int:
    block, size = BLOCK_SIZES[type_name]
    if row_length % block:
        raise ValueError(f"{type_name} rows must be a multiple of {block} elements, got {row_length}")
    return row_length // block * size


def quantized_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of logical `shape` takes in `type_name` (F16, Q4_K, ...)."""
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows * row_bytes(type_name, shape[-1] if shape else 1)


# ----------------------------------------------------------------------------- header reader

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    def __init__(self, f: BinaryIO, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise CheckpointError(f"{self.path}: corrupt GGUF string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, n = self.unpack("<I"), self.unpack("<Q")
            if n > self.size:
                raise CheckpointError(f"{self.path}: corrupt GGUF array length {n}")
            return [self.value(item_type) for _ in range(n)]
        raise CheckpointError(f"{self.path}: unknown GGUF metadata value type {vtype}")


def read_gguf_header(path: str) -> tuple[dict, list[tuple[str, tuple[int, ...], str, int]], int]:
    """(metadata, [(name, torch shape, type name, offset in data section)], data section start)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        cur = _Cursor(f, path, size)
        if cur.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
            if type_id not in GGML_TYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has GGML type {type_id}, which is not supported")
            infos.append((name, tuple(reversed(dims)), GGML_TYPES[type_id][0], offset))
        alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
        start = f.tell()
    start += (-start) % alignment
    return meta, infos, start


def _read_gguf_tensor(ref: TensorRef) -> torch.Tensor:
    type_name = ref.extra
    out = torch.empty(ref.nbytes, dtype=torch.uint8)
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        read_exactly(fd, memoryview(out.numpy()), ref.offset, f"{ref.path}: truncated while reading {ref.key!r}")
    finally:
        os.close(fd)
    if type_name in PLAIN_DTYPES:
        return out.view(PLAIN_DTYPES[type_name]).reshape(ref.shape)
    return out.reshape(*ref.shape[:-1], row_bytes(type_name, ref.shape[-1]))


def scan_gguf(path: str) -> dict[str, TensorRef]:
    """Lazy refs for every tensor: plain types read as tensors, quantized ones as raw uint8 rows."""
    meta, infos, start = read_gguf_header(path)
    data_size = os.path.getsize(path) - start
    refs = {}
    for name, shape, type_name, offset in infos:
        orig = meta.get(f"comfy.gguf.orig_shape.{name}")
        if orig is not None and tuple(orig) != shape:
            if type_name not in PLAIN_DTYPES:
                raise CheckpointError(f"{path}: quantized tensor {name!r} stored reshaped "
                                      f"({shape} -> {tuple(orig)}) is not supported")
        nbytes = quantized_nbytes(type_name, shape) if shape else BLOCK_SIZES[type_name][1]
        if offset + nbytes > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes {offset}..{offset + nbytes} "
                                  f"of a {data_size}-byte data section")
        logical = tuple(orig) if orig is not None else shape
        dtype = PLAIN_DTYPES.get(type_name, torch.uint8)
        ref = TensorRef(name, logical if type_name in PLAIN_DTYPES else shape, dtype, path, _read_gguf_tensor,
                        start + offset, nbytes, extra=type_name)
        if type_name in PLAIN_DTYPES and logical != shape:
            ref.reader = lambda r, _s=shape, _l=logical: _read_gguf_tensor(
                TensorRef(r.key, _s, r.dtype, r.path, r.reader, r.offset, r.nbytes, r.extra)).reshape(_l)
        refs[name] = ref
    return refs


# ----------------------------------------------------------------------------- dequantization

def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 (n, k) -> (n, 8k) bits, little endian (bit j of the packed integer at index j)."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) packed bytes -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:].view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).float() + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins per super-block."""
    s = s.long()
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()


def _q4_k(b):
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # sub-block 2c+h
    x = (_f16(b, 0) * scales)[..., None] * q - (_f16(b, 2) * mins)[..., None]
    return x.reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    scales, mins = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # bit s of qh[l] is the 5th bit of element l of sub-block s
    qs = b[:, 48:176].reshape(n, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).float()
    x = (_f16(b, 0) * scales)[..., None] * q - (_f16(b, 2) * mins)[..., None]
    return x.reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 32)
    scales = b[:, 192:208].view(torch.int8).float().reshape(n, 2, 4, 2)
    low = torch.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    high = (qh[:, :, None, :] >> shifts[None, None, :, None]) & 3
    q = (low | (high << 4)).float() - 32  # (n, half, k, 32)
    scale = scales.repeat_interleave(16, dim=-1)  # element l of group k uses scale 2k + l // 16
    return (_f16(b, 208)[:, :, None, None] * scale * q).reshape(n, QK_K)


def _q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16].reshape(n, 2, 4, 2)  # scale index 8*half + 2*shift + h
    qs = b[:, 16:80].reshape(n, 2, 1, 2, 16)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1, 1)
    q = ((qs >> shifts) & 3).float()  # (n, half, shift, h, 16)
    d = _f16(b, 80).reshape(n, 1, 1, 1)
    dmin = _f16(b, 82).reshape(n, 1, 1, 1)
    x = (d * (sc & 0x0F).float())[..., None] * q - (dmin * (sc >> 4).float())[..., None]
    return x.reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask = b[:, 0:32].reshape(n, 1, 1, 2, 16)
    qs = b[:, 32:96].reshape(n, 2, 1, 2, 16)
    s = b[:, 96:108].long()
    i = torch.arange(16, device=b.device)
    low = (s[:, i % 8] >> (4 * (i // 8))) & 0x0F
    high = (s[:, 8 + i % 4] >> (2 * (i // 4))) & 3
    scales = ((low | (high << 4)) - 32).float().reshape(n, 2, 4, 2)
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1, 1)
    q = ((qs >> shifts) & 3).long()  # (n, half, j, h, 16)
    bit = (torch.arange(2, device=b.device).reshape(2, 1) * 4 + torch.arange(4, device=b.device)).reshape(1, 2, 4, 1, 1)
    has_high = (hmask.long() >> bit) & 1
    q = (q - 4 * (1 - has_high)).float()
    return (_f16(b, 108).reshape(n, 1, 1, 1, 1) * scales[..., None] * q).reshape(n, QK_K)


_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_nl(b):
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    return _f16(b, 0) * table[_nibbles(b[:, 2:18]).long()]


def _iq4_xs(b):
    n = b.shape[0]
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=b.device)
    scales_h = b[:, 2:4].contiguous().view(torch.int16).long() & 0xFFFF  # (n, 1)
    scales_l = b[:, 4:8].long()
    ib = torch.arange(8, device=b.device)
    ls = ((scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0x0F) | (((scales_h >> (2 * ib)) & 3) << 4)
    qs = b[:, 8:136].reshape(n, 8, 16)
    q = table[torch.cat([qs & 0x0F, qs >> 4], dim=-1).long()]  # (n, 8, 32)
    return ((_f16(b, 0) * (ls - 32).float())[..., None] * q).reshape(n, QK_K)


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}
QUANT_TYPES = tuple(_DEQUANT)


def dequantize(raw: torch.Tensor, type_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGML blocks (uint8, shape (*rows, bytes_per_row)) -> floats (*rows, row_length) on raw's device."""
    if type_name in PLAIN_DTYPES:
        return raw.to(dtype)
    if type_name not in _DEQUANT:
        raise NotImplementedError(f"GGML type {type_name} cannot be dequantized (supported: {', '.join(QUANT_TYPES)})")
    block, size = BLOCK_SIZES[type_name]
    if raw.dtype != torch.uint8 or raw.shape[-1] % size:
        raise ValueError(f"{type_name} data must be uint8 rows of whole {size}-byte blocks, "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    rows = raw.shape[:-1]
    values = _DEQUANT[type_name](raw.reshape(-1, size))
    return values.reshape(*rows, raw.shape[-1] // size * block).to(dtype)
