"""What every stage deployment shares: the model versions it holds, rollouts, one compute thread, and the span of
each request (``traced``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from models.errors import UnknownModelError
from models.registry.errors import RegistryError
from serving import tracing
from serving.config import AppConfig, ModelCatalog, StageSpec
from serving.env import SDSERVE_HOME
from serving.metrics import GAUGE_REFRESH_S, StageMetrics
from serving.stages import STAGES

if TYPE_CHECKING:
    from opentelemetry.trace import Span

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETIRE_CHECK_S = 2.0  # how often replaced versions are looked at for unloading


@dataclass(eq=False)
class Queued(Generic[T]):
    """One request's item in a ``@serve.batch`` queue; once its batch runs, how long it waited and the batch's
    size (for its span)."""

    item: T
    arrived: float = field(default_factory=time.perf_counter)
    waited_s: float = 0.0
    batch_size: int = 0


class ReplicaStopping(Exception):
    """Serve began stopping this replica while it was loading a model; the load is abandoned."""


class StageReplica:
    """Base of the stage deployments.

    The model catalog arrives as the deployment's ``user_config``. The first ``reconfigure`` (during replica
    start) loads every model before the replica reports ready; a later one (a changed catalog) loads the new
    versions in the background beside the old ones, makes them this replica's default once loaded, and
    unloads a replaced version after ``registry.keep_previous_s`` without requests. A version that fails to
    load leaves the old one serving; the error shows in ``describe`` (and so in ``/readyz``) and the log.
    Requests name the pinned reference they need (the ingress decides when a new version takes traffic), and
    a replica that does not hold it yet loads it first.

    All torch work, loading included, runs on one dedicated thread so the replica's event loop stays free for
    health checks, cancellation and new arrivals; intra-op parallelism comes from torch's own threads.
    Downloads run on other threads (no torch there).

    Serve may stop a replica while it is still loading (a downscale right after a scale-up): it calls
    ``__del__`` and then shuts the event loop's default executor down, so the load ends there, with one info
    line rather than a traceback.
    """

    kind: str = ""  # the stage's row in the stage table

    def __init__(self, config: dict[str, Any]) -> None:
        from models.runtime import StageRuntime  # torch is imported inside the replica, never by the ingress

        tracing.setup(self.kind)
        self.config = AppConfig.model_validate(config)
        self.stage = STAGES[self.kind]
        spec: StageSpec = getattr(self.config, self.kind)
        self.spec = spec
        options = self.stage_options(self.config)
        cache = self.config.snapshot_cache(SDSERVE_HOME)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-compute")
        # Build on the compute thread too. Each thread that runs torch work gets its own OpenMP thread team;
        # two teams on the same cores (one left spinning from the load) made every UNet call ~1.5x slower.
        self.runtime = self.executor.submit(
            StageRuntime,
            self.kind,
            self.stage.compute_cls(),
            cache,
            components=self.stage.components,
            artifact=self.stage.artifact,
            device=spec.device,
            dtype=spec.dtype,
            threads=spec.torch_threads,
            **options,
        ).result()
        self.metrics = StageMetrics(self.kind)
        self._waiting = 0  # requests in this replica not yet handed to the compute thread
        self.catalog: dict[str, str] = {}  # model name -> configured reference
        self.active: dict[str, str] = {}  # model name -> pinned reference this replica serves by default
        self.load_errors: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # name -> reference of the newest catalog (loaded or not yet)
        self._loading: dict[str, asyncio.Future[str]] = {}
        self._rollout: asyncio.Task[bool] | None = None
        self._retirer: asyncio.Task[None] | None = None
        self._gauges: asyncio.Task[None] | None = None
        self._stopping = False

    def __del__(self) -> None:
        # Serve's graceful-shutdown hook (run on the replica's event loop, after requests drained); Python also
        # calls it on garbage collection, where it is harmless.
        self._stopping = True

    @staticmethod
    def stage_options(config: AppConfig) -> dict[str, Any]:
        """Keyword arguments of this kind's stage constructor, beyond name, snapshot, device and dtype."""
        return {}

    # -- model versions -------------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        models = getattr(ModelCatalog.model_validate(user_config or {}), self.stage.catalog)
        self.pending = {m.name: m.source for m in models}
        if self._retirer is None:
            self._retirer = asyncio.get_running_loop().create_task(self._retire_loop())
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        if not self.active and not self.catalog:
            # The replica is not ready until its models are (or Serve stops it meanwhile).
            if await self._apply(models, initial=True):
                logger.info("%s replica ready: %s", self.kind, self.active)
            return
        if self._rollout is not None and not self._rollout.done():
            self._rollout.cancel()
        self._rollout = asyncio.get_running_loop().create_task(self._apply(models, initial=False))

    async def _apply(self, models: list[Any], initial: bool) -> bool:
        """Load and activate ``models``; False if the replica began stopping first (nothing more is loaded)."""
        for model in models:
            if self.catalog.get(model.name) == model.source and model.name in self.active:
                continue
            try:
                pinned = await self.ensure_loaded(model.name, model.source)
            except ReplicaStopping:
                logger.info("%s replica is stopping; abandoned loading %s from %s", self.kind, model.name, model.source)
                return False
            except Exception as exc:
                self.load_errors[model.name] = f"{model.source}: {type(exc).__name__}: {exc}"[:1000]
                logger.error("%s could not load %s from %s: %s", self.kind, model.name, model.source, exc)
                # A pipeline stage without its model cannot serve; an artifact stage serves its other artifacts
                # (the failed one is refused and reported, and readiness says degraded).
                if initial and not self.stage.artifact:
                    raise
                continue
            previous = self.active.get(model.name)
            self.active[model.name] = pinned
            self.load_errors.pop(model.name, None)
            if previous and previous != pinned:
                logger.info("%s now serves %s from %s (was %s)", self.kind, model.name, pinned, previous)
        self.catalog = {m.name: m.source for m in models}
        for name in [n for n in self.active if n not in self.catalog]:
            del self.active[name]
        for name in [n for n in self.load_errors if n not in self.catalog]:
            del self.load_errors[name]  # no longer configured: no longer a reason to be degraded
        self.metrics.set_load_errors(len(self.load_errors))
        return True

    async def ensure_loaded(self, name: str, ref: str) -> str:
        """Load ``ref`` unless this replica holds it (concurrent callers share one load); return it pinned."""
        if ref in self.runtime.loaded:
            return ref
        future = self._loading.get(ref)
        if future is None:
            future = asyncio.ensure_future(self._load(name, ref))
            self._loading[ref] = future
            future.add_done_callback(lambda _: self._loading.pop(ref, None))
        return await asyncio.shield(future)

    async def _load(self, name: str, ref: str) -> str:
        try:
            pinned, snap = await asyncio.to_thread(self.runtime.fetch, ref)  # network and hashing: no torch
        except RuntimeError:
            if self._stopping:  # "cannot schedule new futures after shutdown": Serve closed the default executor
                raise ReplicaStopping(ref) from None
            raise
        if self._stopping:  # no torch build for a replica on its way out
            raise ReplicaStopping(ref)
        if pinned not in self.runtime.loaded:
            await self.run_compute(self.runtime.build, name, pinned, snap)
        return pinned

    async def resolve(self, name: str, ref: str) -> str:
        """The pinned reference a request runs on: the one it names (loaded if needed), else the default."""
        if not ref:
            # A name the newest catalog added is loaded on first use (sharing the rollout's load): the ingress
            # may name it before this replica's background load finished.
            ref = self.active.get(name, "") or (self.pending.get(name, "") if name not in self.load_errors else "")
            if not ref and name in self.load_errors:
                raise RegistryError(f"{name!r} failed to load: {self.load_errors[name]}", name)
            if not ref:
                raise UnknownModelError(f"model {name!r} is not served; see GET /v1/models", param="model")
        pinned = await self.ensure_loaded(name, ref)
        self.runtime.last_used[pinned] = time.monotonic()  # keeps a replaced version loaded while in use
        return pinned

    async def prepare(self, name: str, ref: str) -> dict[str, Any]:
        """Load a version ahead of traffic (the ingress calls this before switching a model to it)."""
        pinned = await self.ensure_loaded(name, ref)
        return {"pinned": pinned, "version": self.runtime.loaded[pinned].version}

    async def _retire_loop(self) -> None:
        idle_s = self.config.registry.keep_previous_s
        while not self._stopping:
            await asyncio.sleep(RETIRE_CHECK_S)
            with contextlib.suppress(Exception):
                keep = set(self.active.values()) | set(self._loading)
                await self.run_compute(self.runtime.retire, keep, idle_s)

    async def _refresh_gauges(self) -> None:
        # On the event loop, not the compute thread: a busy replica must keep reporting its gauges.
        while not self._stopping:
            self.metrics.refresh()
            await asyncio.sleep(GAUGE_REFRESH_S)

    @staticmethod
    def pinned(item: T, ref: str) -> T:
        """A copy of a frozen request dataclass that names the pinned reference."""
        return dataclasses.replace(item, ref=ref)  # type: ignore[type-var]

    # -- compute --------------------------------------------------------------------------------------------

    async def run_compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_traced(self, span: Span | None, fn: Any, *args: Any) -> Any:
        """``run_compute``, noting on ``span`` how long the call waited for the compute thread."""
        if span is None:
            return await self.run_compute(fn, *args)
        queued = time.perf_counter()
        began: list[float] = []

        def timed() -> Any:
            began.append(time.perf_counter())
            return fn(*args)

        try:
            return await self.run_compute(timed)
        finally:
            if began:
                tracing.annotate(span, queue_ms=round((began[0] - queued) * 1000, 3))

    async def run_batch(self, fn: Any, queued: list[Queued[Any]]) -> Any:
        """Run a ``@serve.batch`` batch on the compute thread (``fn`` gets the items), recording its size, the
        queue left behind and each request's wait."""
        now = time.perf_counter()
        for entry in queued:
            entry.waited_s, entry.batch_size = now - entry.arrived, len(queued)
        self._waiting -= len(queued)
        self.metrics.set_queue_depth(max(self._waiting, 0))
        self.metrics.observe_batch(len(queued))
        return await self.run_compute(fn, [entry.item for entry in queued])

    async def submit_to_batch(self, batch_method: Any, item: Any, span: Span | None = None) -> Any:
        """Hand one request to a ``@serve.batch`` method; a per-request failure comes back as an exception.
        ``span``: the request's, which gets the batch's size and the time waited for it."""
        queued = Queued(item)
        with self.metrics.request():
            self._waiting += 1
            self.metrics.set_queue_depth(self._waiting)
            result = await batch_method(queued)
        tracing.annotate(span, batch_size=queued.batch_size, queue_ms=round(queued.waited_s * 1000, 3))
        if isinstance(result, Exception):
            raise result
        return result

    # -- traces ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def traced(self, method: str, trace: Mapping[str, str] | None) -> Iterator[Span | None]:
        """The span of one stage call, child of the caller's ``trace`` context; None when the call carries none
        (tracing off at the ingress) or this process records no spans. An exception ends it with status ERROR."""
        if trace is None:
            yield None
            return
        with tracing.span(f"{self.kind} {method}", trace, attributes={"stage": self.kind}) as span:
            yield span

    def annotate_model(self, span: Span | None, name: str, pinned: str, loras: tuple[Any, ...] = ()) -> None:
        """The model (or artifact) a call runs on, its version, and the adapters it applies."""
        if span is None:
            return
        loaded = self.runtime.loaded.get(pinned)
        tracing.annotate(
            span,
            model=name,
            model_ref=pinned,
            model_version=getattr(loaded, "version", None),
            loras=[f"{a.name}:{a.scale:g}" for a in loras] or None,
        )

    def describe(self) -> dict[str, Any]:
        """What this replica holds (device, dtype, per-model version, files, torch modules, fetch report)."""
        info = self.runtime.describe(self.active)
        info["catalog"] = dict(self.catalog)
        info["load_errors"] = dict(self.load_errors)
        return info
