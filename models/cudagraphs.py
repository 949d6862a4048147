"""The UNet forward pass as CUDA graphs: one capture per padded batch shape, replayed at every step.

At small batches a Stable Diffusion UNet step is about a thousand short kernels, and eager PyTorch cannot
launch them as fast as a modern GPU runs them: the GPU waits on the host between kernels (measured on an
H100: 30 UNet forward passes/s at batch 1 eager, 81 replayed from a graph; see BENCHMARKS.md). A CUDA
graph submits the whole forward pass as one launch. UNet rows are independent (no batch statistics), so a
batch is padded up to the next bucket in ``ROW_BUCKETS`` and a handful of graphs covers every batch the
step batcher forms; all graphs share one memory pool, so the activations of only the largest are held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Rows per UNet call (twice the images under classifier-free guidance) that get a graph of their own.
ROW_BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Graphs kept per model version: every (bucket, latent size, prompt length) is one; shapes beyond run eagerly.
MAX_GRAPHS = 64


def bucket_for(rows: int, buckets: tuple[int, ...] = ROW_BUCKETS) -> int | None:
    """The smallest bucket that holds ``rows``; None when the batch is larger than every bucket."""
    return next((b for b in buckets if b >= rows), None)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    cond: torch.Tensor | None
    out: torch.Tensor


class GraphedUNet:
    """Calls a diffusers UNet through CUDA graphs; falls back to eager calls when capturing fails.

    Not thread-safe: one stage's compute thread calls it. Outputs are copied out of the graph's static
    buffer before returning, so graphs may share their memory pool.
    """

    def __init__(self, unet: Any, buckets: tuple[int, ...] = ROW_BUCKETS, max_graphs: int = MAX_GRAPHS) -> None:
        self.unet = unet
        self.buckets = buckets
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[Any, ...], _Captured] = {}
        self.pool: Any = None
        self.disabled: str | None = None  # why graphs are off (a capture failed)
        self.replays = 0
        self.eager_calls = 0

    def _eager(self, sample: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
               cond: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        out: torch.Tensor = self.unet(
            sample, timesteps, encoder_hidden_states=hidden, timestep_cond=cond, return_dict=False
        )[0]
        return out

    def __call__(
        self, sample: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        rows = sample.shape[0]
        bucket = bucket_for(rows, self.buckets)
        if self.disabled is not None or bucket is None or sample.device.type != "cuda":
            self.eager_calls += 1
            return self._eager(sample, timesteps, hidden, cond)
        key = (bucket, *sample.shape[1:], sample.dtype, *hidden.shape[1:], None if cond is None else cond.shape[1:])
        captured = self.graphs.get(key)
        if captured is None and len(self.graphs) >= self.max_graphs:
            self.eager_calls += 1
            return self._eager(sample, timesteps, hidden, cond)
        if captured is None:
            try:
                captured = self._capture(key, bucket, sample, timesteps, hidden, cond)
            except Exception as exc:  # an op that cannot be captured: keep serving, eagerly
                self.disabled = f"{type(exc).__name__}: {exc}"
                logger.warning("CUDA graph capture failed, the UNet runs eagerly from now on: %s", self.disabled)
                torch.cuda.synchronize()
                self.eager_calls += 1
                return self._eager(sample, timesteps, hidden, cond)
        captured.sample[:rows].copy_(sample)
        captured.timesteps[:rows].copy_(timesteps)
        captured.hidden[:rows].copy_(hidden)
        if cond is not None and captured.cond is not None:
            captured.cond[:rows].copy_(cond)
        captured.graph.replay()
        self.replays += 1
        return captured.out[:rows].clone()

    def _capture(
        self,
        key: tuple[Any, ...],
        bucket: int,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        hidden: torch.Tensor,
        cond: torch.Tensor | None,
    ) -> _Captured:
        # Static inputs live outside the graphs' pool; padding rows stay zero (finite, and never read back).
        def static(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device)

        s_sample, s_steps, s_hidden = static(sample), static(timesteps), static(hidden)
        s_cond = static(cond) if cond is not None else None
        s_sample[: sample.shape[0]].copy_(sample)
        s_steps[: sample.shape[0]].copy_(timesteps)
        s_hidden[: sample.shape[0]].copy_(hidden)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: kernel selection, workspace allocation
            for _ in range(2):
                self._eager(s_sample, s_steps, s_hidden, s_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._eager(s_sample, s_steps, s_hidden, s_cond)
        self.pool = graph.pool()
        captured = _Captured(graph, s_sample, s_steps, s_hidden, s_cond, out)
        self.graphs[key] = captured
        logger.info("captured a UNet CUDA graph for %d rows of %s", bucket, tuple(sample.shape[1:]))
        return captured

    def describe(self) -> dict[str, Any]:
        return {
            "graphs": len(self.graphs),
            "replays": self.replays,
            "eager_calls": self.eager_calls,
            **({"disabled": self.disabled} if self.disabled else {}),
        }
