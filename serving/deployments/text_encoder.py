"""TextEncoder deployment: tokenizer + CLIP, request batching across callers, embedding cache."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve

from models.contracts import EncodeRequest, PromptEmbeddings
from serving.config import AppConfig
from serving.deployments.adapters import AdapterAffinity, adapter_support, lora_options
from serving.deployments.common import Queued, StageReplica

TextAdapters = tuple[tuple[str, int, float], ...]  # (pinned reference, slot, scale), as the stage takes them


@serve.deployment(name="TextEncoder")
class TextEncoderDeployment(AdapterAffinity, StageReplica):
    kind = "text_encoder"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        batcher: Any = self._batch  # serve.batch adds these setters at runtime
        spec = self.config.text_encoder
        batcher.set_max_batch_size(spec.max_batch_size)
        batcher.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.adapters = adapter_support(self, "text_encoder")

    @staticmethod
    def stage_options(config: AppConfig) -> dict[str, Any]:
        return {
            "max_prompt_tokens": config.limits.max_prompt_tokens,
            "cache_size": config.text_encoder.cache_size,
            **lora_options(config),
        }

    def _encode_all(self, items: list[tuple[EncodeRequest, TextAdapters]]) -> list[PromptEmbeddings | Exception]:
        # One bad request (unknown model, prompt too long) must not fail the others in its batch.
        results: list[PromptEmbeddings | Exception] = []
        for req, adapters in items:
            try:
                results.append(self.runtime.get(req.model, req.ref).encode([req], [adapters])[0])
            except Exception as exc:
                results.append(exc)
        return results

    @serve.batch  # size and wait come from the stage's config, set in __init__
    async def _batch(
        self, items: list[Queued[tuple[EncodeRequest, TextAdapters]]]
    ) -> list[PromptEmbeddings | Exception]:
        results: list[PromptEmbeddings | Exception] = await self.run_batch(self._encode_all, items)
        return results

    async def encode(self, request: EncodeRequest, trace: Mapping[str, str] | None = None) -> PromptEmbeddings:
        """The prompt's embeddings; ``trace``: the caller's trace context (see ``serving.tracing``)."""
        with self.traced("encode", trace) as span:
            request = self.pinned(request, await self.resolve(request.model, request.ref))
            self.annotate_model(span, request.model, request.ref, request.loras)
            stage = self.runtime.get(request.model, request.ref)
            await self.register_route()
            # The text-encoder layers of the request's adapters, in slots while it is encoded (a cached embedding
            # is keyed by them, so a hit costs no slot copy beyond the first).
            async with self.adapters.slots(stage, request.loras) as slots:
                result: PromptEmbeddings = await self.submit_to_batch(self._batch, (request, tuple(slots)), span)
            return result

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["loras"] = {**self.adapters.describe(dict(self.runtime.loaded)), "routes": self.held_routes()}
        return info
