"""Names the command lines offer as choices, kept free of torch so that `diffsynth --help` and argument
errors answer at once (torch takes seconds to import)."""

# Short names of compute/save dtypes (generate --dtype, train --torch_dtype/--save_dtype) -> torch attribute.
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Storage-only dtypes (generate --offload-dtype).
FP8_DTYPES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage", "math")
# Multi-device inference (generate --parallel): split the DiT's tokens or its heads/MLP channels.
PARALLEL_MODES = ("context", "tensor")
