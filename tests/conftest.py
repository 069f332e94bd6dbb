import importlib.util

import pytest
import torch

from diffsynth.testing import build_tiny_flux

# Optional packages the tests use -> how to install them. A test that needs one says so with
# `@pytest.mark.needs("cv2", ...)` (a fixture: `require("onnx")`) and is skipped, naming what is missing,
# where it is absent; the `test` extra installs them all.
OPTIONAL = {
    "cv2": "pip install 'diffsynth-flux[controlnet]' (opencv-python-headless)",
    "onnxruntime": "pip install 'diffsynth-flux[infiniteyou]'",
    "onnx": "pip install onnx (the tiny InfiniteYou detector is written as ONNX)",
    "gradio": "pip install 'diffsynth-flux[ui]'",
    "playwright": "pip install 'diffsynth-flux[test]' (Playwright drives the system's Chromium)",
    "controlnet_aux": "pip install 'diffsynth-flux[annotators]'",
}


def missing_reason(*modules: str) -> str | None:
    """Why a test needing `modules` cannot run here (the absent ones and how to install them), or None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return "; ".join(f"needs {m}: {OPTIONAL.get(m, f'pip install {m}')}" for m in absent) or None


def require(*modules: str) -> None:
    """Skip the running test (or every test using the running fixture) unless all of `modules` are installed."""
    reason = missing_reason(*modules)
    if reason:
        pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*modules): skipped, with the reason, when an optional package is absent")
    # One thread for the whole session, module-scoped fixtures included: the thread count changes a GEMM's float
    # blocking (MKL: ~5e-7), and many tests compare two runs bit for bit (resume vs uninterrupted, LoRA cleared
    # vs never applied); the tiny models run fastest single-threaded anyway. Subprocess tests set their own.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture runs: `needs` marks (module, class, function or parameter) skip a test that cannot run."""
    require(*(m for mark in item.iter_markers("needs") for m in mark.args))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A tiny random FLUX.1-dev folder in the real layout, built once per test session."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny") / "FLUX.1-dev")


@pytest.fixture(scope="session")
def tiny_configs(tiny_root):
    from diffsynth import ModelConfig
    return lambda **kw: [ModelConfig(path=str(tiny_root / p), **kw) for p in
                         ("flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/", "ae.safetensors")]


@pytest.fixture(scope="session")
def tiny_pipe(tiny_configs):
    import torch
    from diffsynth import FluxImagePipeline
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=tiny_configs())


@pytest.fixture
def one_thread():
    """Tiny ops run fastest single-threaded (and do not fight other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate(one_thread):
    """Training runs in-process: accelerate keeps global state between them, reset after each test."""
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def cpu_noise(monkeypatch, fresh_accelerate):
    """The example scripts draw noise with rand_device="cuda"; on a CPU-only machine draw it on the CPU (the
    example harness wraps this call in turn)."""
    from diffsynth import FluxImagePipeline
    original = FluxImagePipeline.__call__
    if not torch.cuda.is_available():
        monkeypatch.setattr(FluxImagePipeline, "__call__", lambda self, *a, **kw: original(
            self, *a, **{**kw, "rand_device": "cpu"}))
