"""What every stage deployment shares: building its ``StageRuntime`` from the config, one compute thread."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from serving.config import AppConfig, StageSpec
from serving.metrics import StageMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StageReplica:
    """Base of the stage deployments: loads the stage's components for every catalog model at start.

    All torch work, loading included, runs on one dedicated thread so the replica's event loop stays free for
    health checks, cancellation and new arrivals; intra-op parallelism comes from torch's own threads.
    """

    kind: str = ""

    def __init__(self, config: dict[str, Any], **options: Any) -> None:
        from models.runtime import StageRuntime  # torch is imported inside the replica, never by the ingress

        self.config = AppConfig.model_validate(config)
        spec: StageSpec = getattr(self.config, self.kind)
        self.spec = spec
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-compute")
        # Load on the compute thread too. Each thread that runs torch work gets its own OpenMP thread team;
        # two teams on the same cores (one left spinning from the load) made every UNet call ~1.5x slower.
        self.runtime = self.executor.submit(
            StageRuntime,
            self.kind,
            [(m.name, m.source) for m in self.config.models],
            device=spec.device,
            dtype=spec.dtype,
            threads=spec.torch_threads,
            **options,
        ).result()
        self.metrics = StageMetrics(self.kind)
        self._waiting = 0  # requests in this replica not yet handed to the compute thread
        logger.info("%s replica ready: %s", self.kind, list(self.runtime.stages))

    async def run_compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run_batch(self, fn: Any, items: list[Any]) -> Any:
        """Run a ``@serve.batch`` batch on the compute thread, recording its size and the queue left behind."""
        self._waiting -= len(items)
        self.metrics.set_queue_depth(max(self._waiting, 0))
        self.metrics.observe_batch(len(items))
        return await self.run_compute(fn, items)

    async def submit_to_batch(self, batch_method: Any, item: Any) -> Any:
        """Hand one request to a ``@serve.batch`` method; a per-request failure comes back as an exception."""
        with self.metrics.request():
            self._waiting += 1
            self.metrics.set_queue_depth(self._waiting)
            result = await batch_method(item)
        if isinstance(result, Exception):
            raise result
        return result

    def describe(self) -> dict[str, Any]:
        """What this replica holds (device, dtype, per-model version, files and torch modules)."""
        return self.runtime.describe()
