"""The benchmark scripts that need no diffusers comparison run (the GPU one as a tiny CPU smoke run)."""
import importlib
import sys
from pathlib import Path

import pytest

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
    assert "11.90B parameters" in out and out.count("| yes") == 12 + 8 + 8 + 4
    assert "FLUX.2 [klein] 4B DiT, 1024x1024 (3.88B parameters)" in out and "9B DiT, 1024x1024 (9.08B parameters)" in out
    assert "FLUX.2 [dev] DiT, 1024x1024 (32.22B parameters)" in out
    assert "Mistral-Small-3 text encoder, one 512-token prompt (17.90B parameters)" in out


def test_gpu_full_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("gpu_full").main()
    out = capsys.readouterr().out
    for variant in ("ours, eager", "DiT x2: diffusers", "DiT x2: diffusers, compiled", "DiT x2: ours, compiled",
                    "ours, compiled", "fp8 storage", "DiT stored on CPU"):
        assert variant in out


def test_controlnet_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("controlnet_step").main()
    out = capsys.readouterr().out
    assert "ours/diffusers" in out and out.count("e-0") == 2  # both rows agree with diffusers to ~1e-7


def test_image_variants_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("image_variants").main()
    out = capsys.readouterr().out
    for variant in ("kontext", "fill", "canny/depth", "flex", "redux"):
        assert f"| {variant}" in out
    diffs = [float(line.rsplit("|", 2)[-2]) for line in out.splitlines() if line.startswith("| ") and "e-" in line]
    assert len(diffs) == 5 and max(diffs) < 1e-4  # both steps compute the same velocity


@pytest.mark.slow  # four subprocesses, each importing torch and diffusers
def test_adapters_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("adapters_step").main()
    out = capsys.readouterr().out
    for row in ("instantx", "xlabs", "eligen", "diffusers-xlabs", "/ base step", "eligen-2", "/ same tokens unmasked"):
        assert row in out


def test_step1x_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("step1x_step").main()
    out = capsys.readouterr().out
    assert "Step1X-Edit denoiser step" in out
    assert float(out.strip().splitlines()[-1].split("|")[-2]) < 1e-4  # parity with diffusers' transformer


def test_infiniteyou_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("infiniteyou_step").main()
    out = capsys.readouterr().out
    step = next(line for line in out.splitlines() if line.startswith("| step"))
    assert float(step.rsplit("|", 2)[-2]) < 1e-5  # InfuseNet with identity tokens + DiT: same as diffusers
    assert "once per call" in out


@pytest.mark.slow  # subprocesses importing torch and diffusers
def test_flux2_step_smoke(monkeypatch, capsys):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")
    _import("flux2_step").main()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 1 reference"))
    assert float(row.rsplit("|", 2)[-2]) < 1e-5  # with a reference image: the same velocity as diffusers
