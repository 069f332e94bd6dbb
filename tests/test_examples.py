"""Every example script runs, unchanged, on tiny models (see example_harness)."""
from example_harness import run_example


def test_flux_dev_inference_example(tiny_root, tmp_path, monkeypatch):
    run_example("model_inference/FLUX.1-dev.py", tmp_path, monkeypatch, {"black-forest-labs/FLUX.1-dev": tiny_root})
    assert {p.name for p in tmp_path.glob("*.jpg")} == {"flux.jpg", "flux_cfg.jpg", "flux_img2img.jpg"}
