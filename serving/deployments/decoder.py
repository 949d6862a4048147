"""The VAE deployment: decoding batched across requests (PNG / JPEG / WebP encoding when it ends the plan), and
encoding init images for image to image and inpainting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve

from models.contracts import DecodeParams, EncodedImages, ImageEncodeParams, ImageLatents, Latents, Pixels
from serving.config import AppConfig
from serving.deployments.common import Queued, StageReplica


@serve.deployment(name="Decoder")
class DecoderDeployment(StageReplica):
    kind = "decoder"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        batcher: Any = self._batch  # serve.batch adds these setters at runtime
        spec = self.config.decoder
        batcher.set_max_batch_size(spec.max_batch_size)
        batcher.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    @staticmethod
    def stage_options(config: AppConfig) -> dict[str, Any]:
        return {"tile_above_pixels": config.decoder.tile_above_pixels}

    def _decode_all(self, items: list[tuple[Latents, DecodeParams | None]]) -> list[Pixels | EncodedImages | Exception]:
        by_version: dict[tuple[str, str], list[int]] = {}
        for i, (latents, _) in enumerate(items):
            by_version.setdefault((latents.model, latents.ref), []).append(i)
        results: list[Pixels | EncodedImages | Exception] = [RuntimeError("not decoded")] * len(items)
        for (model, ref), indices in by_version.items():
            try:
                decoded = self.runtime.get(model, ref).decode([items[i] for i in indices])
                for i, out in zip(indices, decoded, strict=True):
                    results[i] = out
            except Exception as exc:
                for i in indices:
                    results[i] = exc
        return results

    @serve.batch  # size and wait come from the stage's config, set in __init__
    async def _batch(
        self, items: list[Queued[tuple[Latents, DecodeParams | None]]]
    ) -> list[Pixels | EncodedImages | Exception]:
        results: list[Pixels | EncodedImages | Exception] = await self.run_batch(self._decode_all, items)
        return results

    async def decode(
        self, latents: Latents, output: DecodeParams | None = None, trace: Mapping[str, str] | None = None
    ) -> Pixels | EncodedImages:
        """Pixels for the next stage of the plan, or (``output`` set) the encoded image files; ``trace``: the
        caller's trace context (see ``serving.tracing``)."""
        with self.traced("decode", trace) as span:
            latents = self.pinned(latents, await self.resolve(latents.model, latents.ref))
            self.annotate_model(span, latents.model, latents.ref)
            result: Pixels | EncodedImages = await self.submit_to_batch(self._batch, (latents, output), span)
            return result

    async def encode_image(
        self, pixels: Pixels, params: ImageEncodeParams, trace: Mapping[str, str] | None = None
    ) -> ImageLatents:
        """The init image's latent distribution (and the masked image's, with a mask), on this replica's VAE."""
        with self.traced("encode_image", trace) as span:
            params = self.pinned(params, await self.resolve(params.model, params.ref))
            self.annotate_model(span, params.model, params.ref)
            stage = self.runtime.get(params.model, params.ref)
            result: ImageLatents = await self.run_traced(span, stage.encode_image, pixels, params)
            return result
