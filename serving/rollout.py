"""Model rollouts as the ingress sees them: which pinned version of each model new requests use.

At replica start every reference is pinned and served at once (the stages load the same catalog before they
report ready). Later, a changed reference is pinned (a hub branch becomes a commit), loaded by every pipeline
stage beside the old version, and only then do new requests go to it; requests in flight finish on the version
they started with. A failed load keeps the old version serving and is reported in ``/readyz``, ``GET
/v1/models`` and the log.

Artifacts (upscalers, safety checkers) roll out inside their own stage: its replicas load a changed artifact
beside the old one and switch once it is loaded; the ingress keeps their names and configured references.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayTaskError

from serving.config import ArtifactSpec, ModelCatalog, ModelSpec
from serving.runner import StageClient
from serving.stages import ADAPTER_CATALOG

logger = logging.getLogger(__name__)


@dataclass
class ModelCatalogState:
    """The ingress's view of the catalog: what each model name is served from right now."""

    specs: dict[str, ModelSpec] = field(default_factory=dict)
    default: str | None = None
    configured: dict[str, str] = field(default_factory=dict)  # name -> reference as configured
    active: dict[str, str] = field(default_factory=dict)  # name -> pinned reference new requests use
    versions: dict[str, str] = field(default_factory=dict)  # name -> content id, once a stage reported it
    errors: dict[str, str] = field(default_factory=dict)  # name -> why the configured reference is not served
    artifacts: dict[str, dict[str, ArtifactSpec]] = field(default_factory=dict)  # section -> name -> spec
    rollout: asyncio.Task[None] | None = None
    # LoRA adapters: name -> pinned reference requests load (a hub branch pinned to its commit when the catalog
    # is applied, and again on refresh), or name -> why it could not be pinned.
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_errors: dict[str, str] = field(default_factory=dict)

    def describe_adapters(self) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "source": spec.source,
                "ref": self.adapters.get(name),
                "description": spec.description,
                "error": self.adapter_errors.get(name),
            }
            for name, spec in self.artifacts.get(ADAPTER_CATALOG, {}).items()
        ]

    def describe(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "ref": self.configured.get(name),
                "serving": self.active.get(name),
                "version": self.versions.get(name),
                "error": self.errors.get(name),
            }
            for name in self.specs
        }


class ModelRollout:
    """Applies catalogs: pins references and moves each model to a new version once every stage holds it."""

    def __init__(self, state: ModelCatalogState, snapshots: Any, clients: Mapping[str, StageClient]) -> None:
        self.state = state
        self.snapshots = snapshots  # pins references (offline: from what is cached)
        self.clients = clients  # the pipeline stages, which load model versions

    async def apply(self, user_config: dict[str, Any]) -> None:
        """Take a (changed) catalog; a changed model reference is rolled out without dropping requests."""
        catalog = ModelCatalog.model_validate(user_config or {})
        state = self.state
        initial = not state.specs
        state.specs = {m.name: m for m in catalog.models}
        state.default = catalog.models[0].name if catalog.models else None
        state.artifacts = {
            section: {a.name: a for a in getattr(catalog, section)}
            for section in type(catalog).model_fields
            if section != "models"
        }
        for bookkeeping in (state.active, state.configured, state.versions, state.errors):
            for name in [n for n in bookkeeping if n not in state.specs]:
                del bookkeeping[name]  # a model removed and added back later is rolled out afresh
        await self.pin_adapters()
        changed = [m for m in catalog.models if state.configured.get(m.name) != m.source]
        if initial:
            await asyncio.gather(*(self._roll_out(m, prepare=False) for m in changed))
        elif changed:
            if state.rollout is not None and not state.rollout.done():
                state.rollout.cancel()
            state.rollout = asyncio.get_running_loop().create_task(self._roll_out_all(changed))

    async def pin_adapters(self) -> None:
        """Pin every adapter's reference (A1111's refresh-loras does it again): requests name the pinned one, so
        the text encoder and the denoiser load the same version and the response can say which. One that cannot
        be pinned keeps its previous pin, if any, and is reported."""
        state = self.state
        specs = state.artifacts.get(ADAPTER_CATALOG, {})

        async def pin(spec: ArtifactSpec) -> None:
            try:
                state.adapters[spec.name] = str(await asyncio.to_thread(self.snapshots.pin, spec.source))
                state.adapter_errors.pop(spec.name, None)
            except Exception as exc:
                state.adapter_errors[spec.name] = f"{type(exc).__name__}: {exc}"[:1000]
                logger.error("adapter %s: %s cannot be pinned: %s", spec.name, spec.source, exc)

        for bookkeeping in (state.adapters, state.adapter_errors):
            for name in [n for n in bookkeeping if n not in specs]:
                del bookkeeping[name]
        await asyncio.gather(*(pin(spec) for spec in specs.values()))

    async def _roll_out_all(self, models: list[ModelSpec]) -> None:
        await asyncio.gather(*(self._roll_out(m, prepare=True) for m in models))

    async def _roll_out(self, model: ModelSpec, prepare: bool) -> None:
        state = self.state
        state.configured[model.name] = model.source
        try:
            pinned = str(await asyncio.to_thread(self.snapshots.pin, model.source))
            if prepare:
                # Every pipeline stage loads the version before any request uses it.
                answers = await asyncio.gather(
                    *(client.call("prepare", model.name, pinned) for client in self.clients.values())
                )
                versions = {answer["version"] for answer in answers}
                if len(versions) != 1:
                    raise RuntimeError(f"stages loaded different versions of {pinned}: {sorted(versions)}")
                state.versions[model.name] = versions.pop()
        except Exception as exc:
            cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
            state.errors[model.name] = f"{type(cause).__name__}: {cause}"[:1000]
            logger.error("model %s: %s stays in service; %s failed: %s", model.name,
                         state.active.get(model.name), model.source, exc)  # fmt: skip
            return
        previous = state.active.get(model.name)
        state.active[model.name] = pinned
        state.errors.pop(model.name, None)
        logger.info("model %s now serves %s (configured %s, was %s)", model.name, pinned, model.source, previous)
