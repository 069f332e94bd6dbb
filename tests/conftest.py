import pytest
import torch

from diffsynth.testing import build_tiny_flux


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
