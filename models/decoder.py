"""The VAE stage: decoding latents in batches (tiled above a size), then image file encoding; and encoding init
images (img2img, inpainting) into latent distributions."""

from __future__ import annotations

import numpy as np
import torch

from models.contracts import DecodeParams, EncodedImages, ImageEncodeParams, ImageLatents, Latents, Pixels
from models.images import finish, resize_images
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
        self.tiled_encodes = 0

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

    @torch.inference_mode()
    def _distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution for images in [-1, 1], shape (n, 3, H, W)."""
        x = images.to(self.device, self.dtype)
        if x.shape[-2] * x.shape[-1] > self.tile_above_pixels:
            dist = self.vae.tiled_encode(x, return_dict=False)[0]
            self.tiled_encodes += 1
        else:
            dist = self.vae.encode(x, return_dict=False)[0]
        return dist.mean.cpu(), dist.std.cpu()

    def encode_image(self, pixels: Pixels, params: ImageEncodeParams) -> ImageLatents:
        """Init images (uint8, (n, H, W, 3), H and W multiples of the VAE's scale) -> their latent distributions.

        Preprocessing is diffusers' ``VaeImageProcessor``: [0, 255] -> [-1, 1]; the mask is binarised at 0.5, the
        masked image is the image with the repainted region set to 0 (grey), and the mask is resized to the
        latent size with nearest-neighbour interpolation, as ``StableDiffusionInpaintPipeline`` does.
        """
        array = pixels.array
        if params.width and params.height and (params.height, params.width) != array.shape[1:3]:
            array = resize_images(array, params.width, params.height)
        height, width = array.shape[1:3]
        if height % self.scale_factor or width % self.scale_factor:
            raise ValueError(f"image sides must be multiples of {self.scale_factor}, got {width}x{height}")
        images = torch.from_numpy(array.astype("float32") / 255.0).permute(0, 3, 1, 2)
        images = 2.0 * images - 1.0
        mean, std = self._distribution(images)
        mask = masked_mean = masked_std = None
        if params.mask is not None:
            if params.mask.shape != (height, width):
                raise ValueError(f"mask is {params.mask.shape[::-1]}, the image {width}x{height}")
            condition = torch.from_numpy((params.mask >= 0.5).astype("float32"))[None, None]
            masked = images * (condition < 0.5)
            masked_mean, masked_std = self._distribution(masked)
            size = (height // self.scale_factor, width // self.scale_factor)
            mask = torch.nn.functional.interpolate(condition, size=size)
        return ImageLatents(
            model=self.name,
            model_version=self.version,
            mean=mean,
            std=std,
            scaling_factor=float(self.vae.config.scaling_factor),
            mask=mask,
            masked_mean=masked_mean,
            masked_std=masked_std,
            ref=params.ref,
        )
