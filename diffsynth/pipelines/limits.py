"""Limits on generation arguments, shared by the pipeline checks and the command lines (free of torch:
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
