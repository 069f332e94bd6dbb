"""The benchmark scripts that need no diffusers comparison run (the GPU one as a tiny CPU smoke run)."""
import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _import(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        sys.modules.pop(name, None)
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_vram_plan_table(capsys):
    _import("vram_plan").main()
    out = capsys.readouterr().out
    assert "11.90B parameters" in out and out.count("| yes") == 12


def test_gpu_full_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("gpu_full").main()
    out = capsys.readouterr().out
    for variant in ("ours, eager", "DiT x2: diffusers", "DiT x2: diffusers, compiled", "DiT x2: ours, compiled",
                    "ours, compiled", "fp8 storage", "DiT stored on CPU"):
        assert variant in out


def test_step1x_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("step1x_step").main()
    out = capsys.readouterr().out
    assert "Step1X-Edit denoiser step" in out
    assert float(out.strip().splitlines()[-1].split("|")[-2]) < 1e-4  # parity with diffusers' transformer
