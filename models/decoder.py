"""Decoding stage: VAE decode in batches (tiled above a size), then image file encoding."""

from __future__ import annotations

import numpy as np
import torch

from models.contracts import DecodeParams, EncodedImages, Latents, Pixels
from models.images import finish
from models.snapshot import ModelSnapshot


class DecoderStage:
    """Holds one model's VAE."""

    def __init__(
        self,
        name: str,
        snapshot: ModelSnapshot,
        device: torch.device,
        dtype: torch.dtype,
        tile_above_pixels: int = 1024 * 1024,
    ) -> None:
        from diffusers import AutoencoderKL

        self.name = name
        self.snapshot = snapshot
        self.device = device
        self.dtype = dtype
        self.tile_above_pixels = tile_above_pixels
        self.vae = AutoencoderKL.from_pretrained(
            snapshot.path, subfolder="vae", torch_dtype=dtype, use_safetensors=snapshot.use_safetensors
        ).to(device)
        self.vae.eval()
        self.scale_factor = snapshot.family.vae_scale_factor
        self.tiled_decodes = 0

    @property
    def version(self) -> str:
        return self.snapshot.version

    def loaded_modules(self) -> dict[str, str]:
        return {"vae": type(self.vae).__name__}

    @torch.inference_mode()
    def decode_pixels(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (n, 4, h, w) -> uint8 pixels (n, 8h, 8w, 3), the way diffusers post-processes."""
        config = self.vae.config
        z = latents.to(self.device, self.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        height, width = z.shape[-2] * self.scale_factor, z.shape[-1] * self.scale_factor
        if height * width > self.tile_above_pixels:
            # Decoding in overlapping tiles bounds activation memory for large images.
            image = self.vae.tiled_decode(z, return_dict=False)[0]
            self.tiled_decodes += 1
        else:
            image = self.vae.decode(z, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return (array * 255).round().astype("uint8")

    def decode(self, batch: list[tuple[Latents, DecodeParams | None]]) -> list[Pixels | EncodedImages]:
        """Decode a batch of requests; requests with the same latent shape share one VAE call. A request with
        ``DecodeParams`` gets its files encoded; one without gets pixels for the next stage of its plan."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (latents, _) in enumerate(batch):
            groups.setdefault(tuple(latents.tensor.shape[1:]), []).append(i)
        pixels: list[np.ndarray | None] = [None] * len(batch)
        for indices in groups.values():
            stacked = torch.cat([batch[i][0].tensor for i in indices])
            decoded = self.decode_pixels(stacked)
            offset = 0
            for i in indices:
                n = batch[i][0].tensor.shape[0]
                pixels[i] = decoded[offset : offset + n]
                offset += n
        results = []
        for (latents, output), images in zip(batch, pixels, strict=True):
            assert images is not None
            results.append(finish(Pixels(images, latents.model_version), output))
        return results
