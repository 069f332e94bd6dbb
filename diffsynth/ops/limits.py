"""Limits on user arguments, shared by the pipeline and LoRA checks and the command lines (free of torch:
`diffsynth --help` builds the training options from them without importing it)."""

# FLUX's T5 context (diffusers refuses more, too); each token costs memory in every DiT block.
MAX_T5_SEQUENCE_LENGTH = 512
# Largest image side and area accepted: 4 megapixels is FLUX's native range, 64 MP leaves room for
# tiled upscaling passes while keeping a typo (100000x100000) from allocating tens of GB first.
MAX_SIDE = 16384
MAX_PIXELS = 8192 * 8192
MAX_STEPS = 10_000
MAX_IMAGES = 256
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds
# sigma_shift: FLUX uses 1.15-3.2; outside [1e-3, 1e3] the fp32 schedule degenerates (1e-300 gives all-zero
# sigmas after the first), which surfaced only after denoising as non-finite latents.
MIN_SIGMA_SHIFT, MAX_SIGMA_SHIFT = 1e-3, 1e3
# Strengths (LoRA alpha, ControlNet / IP-Adapter / LoRA-Encoder scales) are used around 0-2; far past 100 the
# scaled residuals overflow (1e30 gave a late FloatingPointError). Negative strengths are allowed.
MAX_STRENGTH = 100.0
