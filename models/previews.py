"""Cheap previews of a running denoise: latents to a low-resolution RGB image without the VAE.

A fixed linear map from the latent channels to RGB approximates what the VAE would draw, at 1/8 of the
image size (the approximation AUTOMATIC1111 and ComfyUI use for their live previews). It costs a matrix
product per step instead of a VAE decode; a random test model gives coloured noise, a real model a blurry
version of the picture taking shape.
"""

from __future__ import annotations

import torch

from models.images import encode_image

# Latent channels -> RGB factors, keyed by the number of latent channels (SD1.x / SD2.x VAEs have 4).
LATENT_RGB_FACTORS: dict[int, tuple[tuple[float, float, float], ...]] = {
    4: (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
}
PREVIEW_FORMAT = "jpeg"
PREVIEW_MEDIA_TYPE = "image/jpeg"


def latent_preview(latents: torch.Tensor, quality: int = 70) -> bytes | None:
    """JPEG preview of the first image of ``latents`` (n, c, h, w); None when no factors fit ``c``."""
    factors = LATENT_RGB_FACTORS.get(latents.shape[1])
    if factors is None:
        return None
    weights = torch.tensor(factors, dtype=torch.float32)
    rgb = latents[0].detach().to("cpu", torch.float32).permute(1, 2, 0) @ weights  # (h, w, 3), about [-1, 1]
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return encode_image(pixels, PREVIEW_FORMAT, quality)
