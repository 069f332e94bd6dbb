"""Device arguments checked up front, so that a device this machine lacks is named as such."""
from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """Device types that work here ("cpu" always; "cuda"/"mps"/"xpu" when present)."""
    out = ["cpu"]
    for name in ("cuda", "mps", "xpu"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            out.append(name)
    return out


def random_generator(device: str | torch.device, seed: int, argument: str = "rand_device") -> torch.Generator:
    """A seeded generator on `device`; a device that is missing or cannot generate raises ValueError naming
    `argument` and the values that work, instead of torch's internal message."""
    try:
        return torch.Generator(device).manual_seed(seed)
    except (RuntimeError, ValueError) as e:  # torch's own message stays in the chained traceback
        raise ValueError(f"{argument}={str(device)!r}: this device is not available here; use one of "
                         f"{available_devices()} ('cpu', the default, gives the same noise on every machine)") from e
