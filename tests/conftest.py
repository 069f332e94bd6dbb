import pytest

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
