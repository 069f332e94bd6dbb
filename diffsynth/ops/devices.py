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


def check_device(device: str | torch.device, argument: str = "device") -> torch.device:
    """`device` as a torch.device, when this machine has it; otherwise ValueError naming `argument` (a
    missing CUDA surfaced as an AssertionError from deep inside model loading)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{argument} {str(device)!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if resolved.type not in ("cpu", "meta", *available_devices()):
        cli = argument.startswith("--")  # --device cuda, device='cuda'
        shown, fix = (f"{argument} {device}", f"{argument} cpu") if cli else (f"{argument}={str(device)!r}",
                                                                              f"{argument}='cpu'")
        raise ValueError(f"{shown}: this machine/torch build has no {resolved.type.upper()} device (use {fix})")
    return resolved
