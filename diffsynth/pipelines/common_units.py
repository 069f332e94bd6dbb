"""Units both pipeline families run: the output size and the image-to-image start."""
from __future__ import annotations

import warnings

from ..schedulers.flow_match import add_noise
from .checks import check_size
from .images import image_to_tensor, vae_encode
from .units import unit

SIZE_MULTIPLE = 16  # FLUX.1: VAE 8x, then 2x2 patches; FLUX.2: VAE 8x then 2x2 patchified latents


@unit(outputs=("height", "width"))
def check_shape(pipe, height=None, width=None, input_image=None):
    """Default size: the input image's, else 1024. Sizes are rounded up to a multiple of 16, with a warning."""
    default_h, default_w = (input_image.height, input_image.width) if input_image is not None else (1024, 1024)
    height = default_h if height is None else height
    width = default_w if width is None else width
    check_size(height, width)
    rounded = tuple(-(-v // SIZE_MULTIPLE) * SIZE_MULTIPLE for v in (height, width))
    if rounded != (height, width):
        warnings.warn(f"height/width must be multiples of {SIZE_MULTIPLE}: {height}x{width} "
                      f"rounded up to {rounded[0]}x{rounded[1]}", stacklevel=4)
    return {"height": rounded[0], "width": rounded[1]}


@unit(uses=("vae_encoder",), outputs=("latents", "input_latents"), cacheable=("input_latents",),
      stack=("latents", "input_latents"))
def encode_input_image(pipe, noise, sigmas, height, width, input_image=None, denoising_strength=1.0,
                       tiled=False, tile_size=128, tile_stride=64):
    """Inference starts from noise (txt2img) or the noised input latents (img2img); training keeps x0."""
    if input_image is None:
        if denoising_strength != 1.0:
            raise ValueError(f"denoising_strength={denoising_strength} needs an input_image "
                             "(it says how much of the input image to keep)")
        return {"latents": noise}
    x0 = vae_encode(pipe, image_to_tensor(input_image, width, height), "input_image", tiled, tile_size, tile_stride)
    x0 = x0.repeat(noise.shape[0], 1, 1, 1)
    return {"latents": add_noise(x0, noise, sigmas[0].item()), "input_latents": x0}
