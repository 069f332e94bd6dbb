"""The training choices `train --help` lists (free of torch, which the modules using them import)."""

LORA_FORMATS = ("diffsynth", "kohya", "diffusers")
FULL_FORMATS = ("diffsynth", "bfl")
TIMESTEP_SAMPLINGS = ("shifted_uniform", "logit_normal", "flux_shift")
LR_SCHEDULERS = ("constant", "cosine", "linear")
TASKS = ("sft", "sft:data_process", "sft:train")  # one command; the preprocessing half; the training half
