"""Timestep LoRA (DiffSynth-Studio 2.0's FLUX.1-dev-Timestep-LoRA): `pipe.load_timestep_lora(config, alpha=2.0)`.

The LoRA's features are scaled and shifted by functions of the timestep (see models.flux_timestep_lora), so it
cannot be merged into the weights: at every DiT evaluation the step unit hooks the target layers with that
evaluation's sigma, and the call's output edit (run right after the DiT) removes the hooks again.
"""
from __future__ import annotations

from ..units import step_unit


@step_unit()
def apply_timestep_lora(models, call, step):
    lora = getattr(models, "timestep_lora", None)
    if lora is None:
        return
    lora.attach(models.dit, call.timestep)

    def detach(velocity):
        lora.detach()
        return velocity
    call.output.append(detach)


UNITS = [apply_timestep_lora]
