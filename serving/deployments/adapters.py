"""A stage replica's LoRA adapters: loaded off the compute thread, copied into device slots between forward passes.

The text encoder and the denoiser each hold a ``LoraBank`` per loaded model (its slots) and share this logic: a
request names its adapters by pinned reference (``AdapterUse``); the files are fetched, verified and converted on a
worker thread (``AdapterStore``, host memory), so a cold adapter never holds up the running batch; then the
request's slots are reserved on the event loop, all at once or not at all (a request waits while every slot is in
use by running requests), and only the adapters not yet resident are copied in, on the compute thread between
forward passes. A request whose adapters are resident never waits for the compute thread. Slots are released when
the request leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from ray import serve

from models.contracts import AdapterUse
from models.errors import AdapterError, StageInputError
from serving.config import AppConfig
from serving.env import SDSERVE_HOME
from serving.plans import ROUTE_SEPARATOR

if TYPE_CHECKING:
    from models.adapters import AdapterStore, LoadedAdapter

# Adapter sets a replica tells Serve's router it holds (its @serve.multiplexed LRU); requests naming one of them
# prefer this replica. A set beyond that may still be in the host tier; it just no longer attracts requests.
AFFINITY_SETS = 16


class ReplicaAdapters:
    """Adapters of one replica (``component``: ``unet`` or ``text_encoder``, the layers this stage applies)."""

    def __init__(self, store: AdapterStore, component: str, executor: Executor) -> None:
        self.store = store
        self.component = component
        self.executor = executor  # the replica's compute thread
        self._loading: dict[str, asyncio.Future[LoadedAdapter]] = {}
        self._freed = asyncio.Condition()

    async def load(self, ref: str) -> LoadedAdapter:
        """The converted adapter at ``ref``; concurrent requests for one reference share a load."""
        cached = self.store.cached(ref)
        if cached is not None:
            return cached
        future = self._loading.get(ref)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self.store.load, ref))
            self._loading[ref] = future
            future.add_done_callback(lambda _: self._loading.pop(ref, None))
        return await asyncio.shield(future)

    def submit_compute(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        """Queue ``fn`` on the compute thread now (not when the returned future is first awaited)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.asynccontextmanager
    async def slots(self, stage: Any, uses: tuple[AdapterUse, ...]) -> AsyncIterator[list[tuple[str, int, float]]]:
        """Hold device slots for ``uses`` on ``stage`` (its ``loras`` bank) while the block runs; yields
        (pinned reference, slot, scale) for each adapter that has layers in this stage's component."""
        if not uses:
            yield []
            return
        bank = stage.loras
        if bank is None:
            raise StageInputError("this service holds no LoRA slots (lora.slots is 0); leave out `loras`", "loras")
        loaded = await asyncio.gather(*(self.load(use.ref) for use in uses))
        family = stage.snapshot.family.name
        wanted: list[tuple[AdapterUse, dict[str, Any]]] = []
        for use, adapter in zip(uses, loaded, strict=True):
            if adapter.weights.family != family:
                raise AdapterError(
                    f"LoRA {use.name!r} is for {adapter.weights.family} models; {stage.name!r} is {family}", "loras"
                )
            layers = getattr(adapter.weights, self.component)
            if layers:
                wanted.append((use, layers))
        if not wanted:
            yield []
            return
        adapters = [(use.ref, layers) for use, layers in wanted]
        taken = await self._reserve(bank, adapters)
        try:
            # Submitted now, before anything later on this loop: a request that finds one of these adapters
            # resident while its copy is queued has its work run after the copy on the same compute thread.
            fills = [
                self.submit_compute(bank.fill, slot, layers)
                for (slot, fresh), (_, layers) in zip(taken, adapters, strict=True)
                if fresh
            ]
            try:
                await asyncio.gather(*fills)
            except BaseException:
                for (_slot, fresh), (key, _) in zip(taken, adapters, strict=True):
                    if fresh:
                        bank.forget(key)
                raise
            yield [(use.ref, slot, use.scale) for (use, _), (slot, _) in zip(wanted, taken, strict=True)]
        finally:
            for slot, _ in taken:
                bank.release(slot)
            await asyncio.shield(self._notify())

    async def _reserve(self, bank: Any, adapters: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, bool]]:
        from models.adapters import SlotsBusy

        while True:
            try:
                taken: list[tuple[int, bool]] = bank.reserve_all(adapters)
                return taken
            except SlotsBusy:
                async with self._freed:
                    await self._freed.wait()  # a request releasing its slots wakes us (the deadline bounds this)

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    def describe(self, stages: dict[str, Any]) -> dict[str, Any]:
        """Host-memory adapters, and the slots of each loaded model version (pinned reference -> slots)."""
        banks = {ref: stage.loras.describe() for ref, stage in stages.items() if getattr(stage, "loras", None)}
        return {**self.store.describe(), "slots": banks}


class AdapterAffinity:
    """Replica affinity for adapters, through Serve's model multiplexing: the ingress sends a request with
    ``multiplexed_model_id`` = its adapter set (``serving.plans.adapter_route``); the replica that serves it
    registers the set with ``adapter_set`` (and reads the adapters into host memory), and the router then prefers
    replicas that hold a request's set, where its adapters are in host memory or already in device slots.

    Why multiplexing rather than a custom request router: it is Serve's supported way to say "this replica holds
    model X" (the replica reports its ids to the controller, every router sees them), and it falls back to any
    replica when the ones holding the set are busy, so affinity never turns into a queue."""

    adapters: ReplicaAdapters

    @serve.multiplexed(max_num_models_per_replica=AFFINITY_SETS)
    async def adapter_set(self, route: str) -> tuple[str, ...]:
        refs = tuple(route.split(ROUTE_SEPARATOR))
        await asyncio.gather(*(self.adapters.load(ref) for ref in refs))
        return refs

    def held_routes(self) -> list[str]:
        """The adapter sets this replica has told the router it holds, least recently used first."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        return list(getattr(wrapper, "models", {}))

    async def register_route(self) -> None:
        """Record this request's adapter set as held here (a no-op for a request without adapters)."""
        route = serve.get_multiplexed_model_id()
        if route:
            await self.adapter_set(route)


def lora_options(config: AppConfig) -> dict[str, Any]:
    """The LoRA keyword arguments of the text-encoder and denoiser stage constructors."""
    spec = config.lora
    return {"lora_slots": spec.slots, "lora_max_rank": spec.max_rank, "loras_per_request": config.limits.max_loras}


def adapter_support(replica: Any, component: str) -> ReplicaAdapters:
    """The adapters of a text-encoder or denoiser replica (reads through the replica's snapshot cache)."""
    from models.adapters import AdapterStore

    store = AdapterStore(replica.config.snapshot_cache(SDSERVE_HOME), replica.config.lora.host_cache_mb * 2**20)
    return ReplicaAdapters(store, component, replica.executor)
