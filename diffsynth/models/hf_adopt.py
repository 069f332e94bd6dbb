"""A model built with empty weights (on the meta device) adopts a state dict in transformers' names: keys and
shapes checked, tensors taken as they are (no copy), buffers computed at construction moved to the weights'
device."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..ops.files import CheckpointError


def adopt_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, config_name: str) -> nn.Module:
    """`model` (built on the meta device) with `sd` as its weights, in eval mode without gradients.
    `config_name` names what the model was built from, for the errors ("config.json", "the Qwen3 config")."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not fit {config_name}; missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}" for k in sorted(sd)
           if sd[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{source}: wrong shapes (file != {config_name}): {bad[:8]}")
    model.load_state_dict(dict(sd), assign=True, strict=True)
    device = next(iter(sd.values())).device
    for module in model.modules():  # rotary tables were computed on the CPU
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
    return model.eval().requires_grad_(False)
