"""Loading reads straight into the destination tensors (threaded positional reads, chunked dtype conversion):
the tensors are exactly the ones the plain path gives, and a damaged file still fails the same way."""
import os

import pytest
import torch

from diffsynth.models.entry import cat_rows
from diffsynth.ops import tensor_ref
from diffsynth.ops.files import CheckpointError, load_state_dict, load_tensors, save_safetensors, scan

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int64]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"w.{str(d).split('.')[-1]}": (torch.randn(37, 129, generator=g) * 4).to(d) for d in DTYPES}
    out["empty"] = torch.empty(0, 5)
    out["scalar"] = torch.tensor(2.5)
    return out


def _plain(ref, dtype):
    """The reference: the whole tensor as stored, then converted (what loading did before)."""
    t = ref.reader(ref)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_threaded_chunked_load_equals_plain(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(tensor_ref, "CONVERT_CHUNK_BYTES", 256)  # many chunks, a ragged last one
    monkeypatch.setattr(tensor_ref, "LOAD_THREADS", 3)
    path = tmp_path / "m.safetensors"
    save_safetensors(_tensors(), path)
    refs = scan(path)
    got = load_tensors(refs, dtype)
    assert list(got) == list(refs)
    for k, ref in refs.items():
        want = _plain(ref, dtype)
        assert got[k].dtype == want.dtype and got[k].shape == want.shape
        assert torch.equal(_bytes(got[k]), _bytes(want)), k  # bitwise: fp8 has no equal kernel


def test_sharded_folder_loads_every_shard(tmp_path):
    t = _tensors()
    keys = list(t)
    save_safetensors({k: t[k] for k in keys[:3]}, tmp_path / "a.safetensors")
    save_safetensors({k: t[k] for k in keys[3:]}, tmp_path / "b.safetensors")
    got = load_state_dict(tmp_path, torch.float32)
    assert sorted(got) == sorted(keys)
    for k in keys:
        want = t[k].float() if t[k].is_floating_point() else t[k]
        assert torch.equal(got[k], want)


def test_nan_found_in_a_later_chunk_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_ref, "CONVERT_CHUNK_BYTES", 64)
    w = torch.zeros(1000, dtype=torch.bfloat16)
    w[-1] = float("nan")
    path = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.zeros(1000, dtype=torch.bfloat16)}, path)  # the writer refuses NaN: patch it in
    data = bytearray(path.read_bytes())
    data[-2:] = w[-1:].view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        load_tensors(scan(path), torch.float32)


def test_file_truncated_after_scan_fails_clearly_when_converting(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(1000, dtype=torch.bfloat16), "b": torch.ones(1000, dtype=torch.bfloat16)}, path)
    refs = scan(path)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="changed on disk|truncated"):
        load_tensors(refs, torch.float32)


def test_first_failure_in_key_order_is_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_ref, "LOAD_THREADS", 4)
    path = tmp_path / "m.safetensors"
    save_safetensors({f"t{i}": torch.ones(100) for i in range(8)}, path)
    refs = scan(path)

    def broken(key):
        def read(ref):
            raise CheckpointError(key)
        return read
    for k in ("t3", "t6"):
        refs[k].reader, refs[k].read_range = broken(k), None
    with pytest.raises(CheckpointError, match="^t3$"):
        load_tensors(refs)


def test_cat_rows_on_meta_gives_the_shape_without_reading():
    a, b = torch.empty(3, 4, device="meta"), torch.empty(5, 4, device="meta")
    out = cat_rows([a, b])
    assert out.is_meta and out.shape == (8, 4) and out.dtype == a.dtype
    x, y = torch.randn(2, 3), torch.randn(1, 3)
    assert torch.equal(cat_rows([x, y]), torch.cat([x, y]))
