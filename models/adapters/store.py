"""``AdapterStore``: adapters in host memory, read through the snapshot cache.

Three tiers hold an adapter on a replica: a device slot (``LoraBank``: ready for the next forward pass), host
memory (here: converted ``LoraWeights``, least recently used dropped past ``max_bytes``), and the node's snapshot
cache on disk (pinned, verified against its manifest; downloaded from S3 or the hub on first use). ``load`` is
plain blocking I/O and CPU work and is called off the compute thread, so fetching and converting a cold adapter
never holds up the forward passes of the running batch; only the copy into a slot runs between them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from models.adapters.lora import AdapterError, LoraWeights, read_lora
from models.registry import SnapshotCache
from models.registry.errors import IntegrityError, UnsafeWeightsError

ADAPTER_KIND = "lora"


@dataclass(frozen=True)
class LoadedAdapter:
    ref: str  # the pinned reference it was read from
    version: str  # content id of its manifest (or the folder's, for an in-place file:// source)
    weights: LoraWeights


class AdapterStore:
    """Converted adapters by pinned reference, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, cache: SnapshotCache, max_bytes: int) -> None:
        self.cache = cache
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # reads from the snapshot cache (host misses)

    def cached(self, ref: str) -> LoadedAdapter | None:
        with self._lock:
            adapter = self._held.get(ref)
            if adapter is not None:
                self._held.move_to_end(ref)
            return adapter

    def load(self, ref: str) -> LoadedAdapter:
        """The adapter at ``ref``: from host memory, else fetched, verified and converted (blocking).

        Raises:
            AdapterError: a pickle, corrupt or non-adapter artifact (the request's fault: 422).
            RegistryError: the store cannot be reached or the reference does not resolve.
        """
        adapter = self.cached(ref)
        if adapter is not None:
            return adapter
        try:
            snap = self.cache.materialize(ref)
        except (UnsafeWeightsError, IntegrityError) as exc:
            raise AdapterError(f"adapter {ref} was refused: {exc.message}", "loras") from exc
        if snap.manifest is not None and snap.manifest.kind != ADAPTER_KIND:
            raise AdapterError(f"{ref} is a {snap.manifest.kind}, not a LoRA adapter", "loras")
        try:
            weights = read_lora(snap.path)
        except AdapterError as exc:
            raise AdapterError(f"adapter {ref}: {exc.message}", "loras") from exc
        adapter = LoadedAdapter(snap.report.pinned, snap.report.version or snap.path.name, weights)
        with self._lock:
            self.loads += 1
            self._held[ref] = adapter
            total = sum(a.weights.nbytes for a in self._held.values())
            while total > self.max_bytes and len(self._held) > 1:
                _, dropped = self._held.popitem(last=False)
                total -= dropped.weights.nbytes
        return adapter

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {
                "host_adapters": list(self._held),
                "host_bytes": sum(a.weights.nbytes for a in self._held.values()),
                "host_max_bytes": self.max_bytes,
                "loads": self.loads,
            }
