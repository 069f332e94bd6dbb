"""The benchmark scripts that need no full-size weights run (the GPU one as a tiny CPU smoke run), and the numbers
their `main()` returns hold: positive times, finite ratios, memory measured, parity with diffusers where the
script compares against it. Never a timing threshold."""
import importlib
import math
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


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_BENCH_SMOKE", "1")


def check_comparison(r, max_diff: float) -> None:
    """A side-by-side row: both times measured, the ratio of the same rounds, outputs that agree."""
    assert r.reference_ms > 0 and r.ours_ms > 0, r
    assert math.isfinite(r.ratio) and r.ratio > 0, r
    assert 0 <= r.diff < max_diff, r


def test_vram_plan_table(capsys):
    rows = _import("vram_plan").main()
    out = capsys.readouterr().out
    assert "expected peak GB" in out and out.count("| yes") == len(rows)  # the table still prints
    by_model = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    assert {m: (round(rs[0].parameters / 1e9, 2), len(rs)) for m, rs in by_model.items()} == {
        "FLUX.1-dev": (11.90, 12), "FLUX.2 [klein] 4B": (3.88, 4), "FLUX.2 [klein] 9B": (9.08, 4),
        "FLUX.2 [dev]": (32.22, 8), "FLUX.2 [dev] Mistral-Small-3": (17.34, 4)}
    for r in rows:
        plan = r.plan
        assert plan.fits and plan.peak_bytes <= plan.budget_bytes == int((r.card_gb - 0.5) * 2**30)
        assert plan.min_peak_bytes <= plan.peak_bytes
        assert len(plan.resident) + len(plan.streamed) > 0 and plan.activation_bytes > 0
    for model, rs in by_model.items():
        for storage in {r.storage for r in rs}:
            same = sorted((r for r in rs if r.storage == storage), key=lambda r: r.card_gb)
            weights = {r.plan.resident_bytes + r.plan.streamed_bytes for r in same}
            assert len(weights) == 1, (model, storage)  # the card changes residency, not the bytes
            resident = [r.plan.resident_bytes for r in same]
            assert resident == sorted(resident), (model, storage)  # a bigger card keeps more resident
        bf16 = next(r for r in rs if r.storage == "bf16")
        bf16_bytes = bf16.plan.resident_bytes + bf16.plan.streamed_bytes
        assert bf16_bytes == pytest.approx(2 * bf16.parameters, rel=1e-3)  # 2 bytes per parameter
        fp8 = next(r for r in rs if r.storage == "fp8 e4m3fn")  # linear weights 1 byte, the rest stays bf16
        assert 0.5 < (fp8.plan.resident_bytes + fp8.plan.streamed_bytes) / bf16_bytes < 0.55


@pytest.mark.slow  # the whole GPU benchmark on a tiny model, with two regional compiles
def test_gpu_full_smoke(smoke, capsys):
    rows = _import("gpu_full").main()
    names = [r.variant for r in rows]
    assert [n.split(" (")[0] for n in names] == [
        "ours, eager", "DiT x2: diffusers", "DiT x2: ours", "DiT x2: diffusers, compiled", "DiT x2: ours, compiled",
        "ours, compiled", "ours, fp8 storage, bf16 compute", "ours, DiT stored on CPU",
        "ours, DiT stored on CPU"]
    assert "(page-locked)" in names[-2] and "(pageable)" in names[-1]
    for r in rows:
        assert r.seconds > 0 and (r.peak_gb is None or math.isnan(r.peak_gb)), r  # no CUDA peak on the CPU
    ratios = [float(n.split("(ratio ")[1].rstrip(")")) for n in names if "(ratio " in n]
    assert len(ratios) == 2 and all(math.isfinite(x) and x > 0 for x in ratios)
    assert "| ours, fp8 storage" in capsys.readouterr().out  # the table still prints


@pytest.mark.slow  # a regional compile of both DiTs
def test_gpu_flux2_smoke(smoke, capsys):
    rows = _import("gpu_flux2").main()
    assert [r.case for r in rows] == ["text-to-image", "1 reference image", "text-to-image, compiled"]
    for r in rows:
        assert r.step.reference_ms > 0 and r.step.ours_ms > 0 and math.isfinite(r.step.ratio), r
        assert r.step.diff < 1e-5, r  # same weights, same inputs: the same velocities
    assert math.isnan(rows[0].ours_peak_gb) and rows[2].ours_peak_gb is None  # no CUDA peak on the CPU
    assert "| tiny  | 1 reference image" in capsys.readouterr().out


@pytest.mark.slow  # two subprocesses, each tracing both DiTs' blocks
def test_compile_cpu_smoke(smoke):
    rows = _import("compile_cpu").main()
    assert [(r.family, r.dtype) for r in rows] == [("flux1", "fp32"), ("flux2", "fp32")]
    for r in rows:
        assert r.first_call_s > 0
        check_comparison(r.step, 1e-5)  # compiled (aot_eager here) computes what eager does


def test_controlnet_step_smoke(smoke):
    rows = _import("controlnet_step").main()
    assert [r.case for r in rows] == ["1", "2"]
    for r in rows:
        check_comparison(r, 1e-5)  # relative: one and two ControlNets agree with diffusers


def test_image_variants_smoke(smoke):
    rows = _import("image_variants").main()
    assert [r.case for r in rows] == ["kontext", "fill", "canny/depth", "flex", "redux"]
    for r in rows:
        check_comparison(r, 1e-4)  # both steps compute the same velocity


@pytest.mark.slow  # four subprocesses, each importing torch and diffusers
def test_adapters_step_smoke(smoke):
    result = _import("adapters_step").main()
    names = ["base", "instantx", "xlabs", "eligen", "diffusers", "diffusers-xlabs"]
    assert list(result.latency_ms) == names and list(result.ratio_to_base) == names
    assert all(result.latency_ms[n] > 0 and math.isfinite(result.ratio_to_base[n]) for n in names)
    assert result.ratio_to_base["base"] == 1.0  # each round's base step over itself
    assert math.isfinite(result.xlabs_vs_diffusers) and result.xlabs_vs_diffusers > 0
    assert list(result.memory_mb) == ["base", "unmasked-2", "eligen-2"]
    assert all(math.isfinite(m) and m >= 0 for m in result.memory_mb.values())


def test_text_encode_smoke(smoke):
    check_comparison(_import("text_encode").main(), 1e-5)  # our T5 encoder: transformers' numbers


def test_qwen_vl_encode_smoke(smoke):
    fp32, bf16 = _import("qwen_vl_encode").main()
    check_comparison(fp32, 1e-5)  # our Qwen2.5-VL: transformers' numbers
    check_comparison(bf16, 3e-2)  # bf16 roundings in another order (both ~1.2e-2 from fp32 at mid size)


def test_step1x_step_smoke(smoke):
    check_comparison(_import("step1x_step").main(), 1e-4)  # parity with diffusers' transformer


@pytest.mark.needs("cv2")  # the identity cost aligns a face with OpenCV
def test_infiniteyou_step_smoke(smoke):
    result = _import("infiniteyou_step").main()
    check_comparison(result.step, 1e-5)  # InfuseNet with identity tokens + DiT: same as diffusers
    assert result.identity_ms > 0


@pytest.mark.slow  # subprocesses importing torch and diffusers
def test_flux2_step_smoke(smoke):
    (row,) = _import("flux2_step").main()
    assert (row.references, row.dtype) == (1, "fp32")
    check_comparison(row.step, 1e-5)  # with a reference image: the same velocity as diffusers
    assert math.isfinite(row.reference_peak_mb) and math.isfinite(row.ours_peak_mb)
    assert row.reference_peak_mb >= 0 and row.ours_peak_mb >= 0


@pytest.mark.slow  # three subprocesses loading both pipelines
def test_flux2_pipeline_smoke(smoke):
    result = _import("flux2_pipeline").main()
    check_comparison(result.run, 2 / 255)  # the same image as diffusers' Flux2KleinPipeline
    assert result.run.case == "64px-2steps"
    assert math.isfinite(result.reference_peak_mb) and math.isfinite(result.ours_peak_mb)
    assert result.reference_peak_mb > 0 and result.ours_peak_mb > 0


@pytest.mark.slow  # four fresh processes loading a pipeline each
def test_first_image_smoke(smoke):
    sys.modules.pop("flux2_pipeline", None)  # (it reads the smoke setting when imported)
    rows = _import("first_image").main()
    assert [r.family for r in rows] == ["flux1", "flux2"]
    for r in rows:
        check_comparison(r.run, 2 / 255)  # the saved PNGs: the same picture from both libraries
        assert r.run.case == "64px-2steps" and r.run.reference_ms > 0 and r.run.ours_ms > 0
        assert 100 < r.reference_peak_mb < 8000 and 100 < r.ours_peak_mb < 8000  # a whole process's high-water mark
