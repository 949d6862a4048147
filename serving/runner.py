"""``ChainRunner``: runs any plan through the stage clients with the service's guarantees.

- The deadline (``limits.request_timeout_s``) covers the whole plan, re-runs included; on expiry every stage
  call still in flight is cancelled (the denoiser drops the job before its next step) and the caller gets 504.
- A caller that goes away (cancellation) cancels every stage call of the plan.
- A stage replica that dies under the plan: stage calls are pure functions of their inputs, so the plan is
  issued again (up to ``limits.replica_loss_retries`` times) and lands on live replicas.
- Progress: a step marked ``progress`` streams (``<method>_stream``) when the caller asked for progress.
- Traces: with tracing on, every stage call carries the current span's W3C context as its ``trace`` keyword
  argument (Serve handles propagate no OpenTelemetry context), and the replica's span is its child.
- Tensors never pass through the caller: each call gets the previous call's *response* as its first argument
  and the stage resolves it from the object store. Only a streamed step's final output passes through (the
  denoiser's latents: 1/48 of the pixels the decoder sends back anyway).

Plain Python: the clients are anything with ``call`` and ``stream`` (``RayStageClient`` wraps a Serve
``DeploymentHandle``; ``LocalStageClient`` calls an in-process object, for tests and tools).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from models.contracts import DenoiseProgress
from serving import tracing
from serving.config import LimitsSpec
from serving.errors import ApiError
from serving.plans import Plan, StageCall

logger = logging.getLogger(__name__)

OnProgress = Callable[[Any], Awaitable[None]]
Trace = Mapping[str, str] | None  # W3C trace context headers (traceparent, tracestate)
MapError = Callable[[BaseException], BaseException]


class StageResponse(Protocol):
    """An awaitable stage call that can be cancelled (Serve's ``DeploymentResponse``, an asyncio future)."""

    def __await__(self) -> Any: ...

    def cancel(self) -> Any: ...


class StageStream(Protocol):
    """An async iterator over a streaming stage call that can be cancelled."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> Any: ...


class StageClient(Protocol):
    """Calls one stage. ``route``: a replica-affinity key (the request's adapter set): replicas that already hold
    it are preferred. ``trace``: the caller's W3C trace context (``serving.tracing.carrier``), passed to the method
    as its ``trace`` keyword argument when set."""

    def call(self, method: str, *args: Any, route: str = "", trace: Trace = None) -> StageResponse: ...

    def stream(self, method: str, *args: Any, route: str = "", trace: Trace = None, **kwargs: Any) -> StageStream: ...


class RayStageClient:
    """A stage reached through its Serve ``DeploymentHandle``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _routed(self, route: str) -> Any:
        # Serve's model multiplexing: the router prefers replicas whose @serve.multiplexed loader holds the id
        # (serving/deployments/adapters.py), so requests with the same adapters meet their resident slots.
        return self.handle.options(multiplexed_model_id=route) if route else self.handle

    def call(self, method: str, *args: Any, route: str = "", trace: Trace = None) -> StageResponse:
        response: StageResponse = getattr(self._routed(route), method).remote(*args, **_traced(trace))
        return response

    def stream(self, method: str, *args: Any, route: str = "", trace: Trace = None, **kwargs: Any) -> StageStream:
        stream: StageStream = getattr(self._routed(route).options(stream=True), method).remote(
            *args, **kwargs, **_traced(trace)
        )
        return stream


def _traced(trace: Trace) -> dict[str, Any]:
    # Without a trace context the call is exactly what it is with tracing off: no extra argument.
    return {"trace": dict(trace)} if trace else {}


class _LocalStream:
    def __init__(self, agen: AsyncIterator[Any]) -> None:
        self.agen = agen
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self.agen

    def cancel(self) -> None:
        self.cancelled = True
        closer = getattr(self.agen, "aclose", None)
        if closer is not None:
            task = asyncio.ensure_future(closer())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())


class LocalStageClient:
    """A stage object in this process: arguments that are pending calls are awaited first, the way Serve
    resolves a ``DeploymentResponse`` passed to another call."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def call(self, method: str, *args: Any, route: str = "", trace: Trace = None) -> StageResponse:
        async def invoke() -> Any:
            resolved = [await a if isinstance(a, asyncio.Future) else a for a in args]
            result = getattr(self.target, method)(*resolved, **_traced(trace))
            return await result if inspect.isawaitable(result) else result

        return asyncio.ensure_future(invoke())

    def stream(self, method: str, *args: Any, route: str = "", trace: Trace = None, **kwargs: Any) -> StageStream:
        async def generate() -> AsyncIterator[Any]:
            resolved = [await a if isinstance(a, asyncio.Future) else a for a in args]
            async for item in getattr(self.target, method)(*resolved, **kwargs, **_traced(trace)):
                yield item

        return _LocalStream(generate())


class ChainRunner:
    """Executes plans; maps failures to API errors with ``map_error``."""

    def __init__(self, clients: Mapping[str, StageClient], limits: LimitsSpec, map_error: MapError) -> None:
        self.clients = clients
        self.limits = limits
        self.map_error = map_error

    async def run(self, plan: Plan, on_progress: OnProgress | None = None, preview: bool = False) -> Any:
        """The last step's output.

        Args:
            on_progress: awaited with each progress item of the plan's streaming step; a re-run after a replica
                loss reports from step 1 again.
            preview: ask the streaming step for previews.
        """
        missing = [call.stage for call in plan.calls if call.stage not in self.clients]
        if missing:  # the resolver refuses such requests; this is the backstop
            raise ApiError(503, "stage_unavailable", f"this deployment runs no {missing[0]} stage")
        started = time.perf_counter()
        limits = self.limits
        attempts = 0
        while True:
            attempts += 1
            remaining = max(limits.request_timeout_s - (time.perf_counter() - started), 0.0)
            deadline = asyncio.timeout(remaining)
            try:
                async with deadline:
                    return await self._run_once(plan, on_progress, preview)
            except TimeoutError as exc:
                if deadline.expired():  # not a TimeoutError a stage raised (e.g. a download's socket)
                    raise ApiError(
                        504, "timeout", f"generation did not finish within {limits.request_timeout_s:g}s"
                    ) from exc
                raise self.map_error(exc) from exc
            except BaseException as exc:
                if is_replica_loss(exc) and attempts <= limits.replica_loss_retries:
                    logger.warning("a stage replica died under a request (attempt %d); re-running it", attempts)
                    continue
                if is_replica_loss(exc):
                    raise ApiError(
                        503,
                        "stage_unavailable",
                        f"stage replicas kept failing ({attempts} attempts); retry shortly",
                        headers={"Retry-After": str(limits.retry_after_s)},
                    ) from exc
                raise self.map_error(exc) from exc

    async def _run_once(self, plan: Plan, on_progress: OnProgress | None, preview: bool) -> Any:
        pending: list[StageResponse | StageStream] = []
        previous: Any = plan.input
        outputs: dict[str, Any] = {}  # labelled outputs, for later calls' Use(label) arguments
        done = 0  # steps of the plan's earlier passes: progress counts on across them
        trace = tracing.carrier()  # the caller's span (None with tracing off): each stage's span is its child

        async def report(item: DenoiseProgress) -> None:
            assert on_progress is not None
            await on_progress(replace(item, step=done + item.step, total_steps=plan.total_steps or item.total_steps))

        try:
            for call in plan.calls:
                args = call.arguments(previous, outputs)
                client = self.clients[call.stage]
                if call.progress and on_progress is not None:
                    previous = await self._stream(client, call, args, report, preview, pending, trace)
                    done += call.steps
                else:
                    previous = client.call(call.method, *args, route=call.route, trace=trace)
                    pending.append(previous)
                if call.label:
                    outputs[call.label] = previous
            if pending and previous is pending[-1]:
                return await previous  # type: ignore[misc]  # the last call's response, not a stream
            return previous
        except BaseException:  # cancelled, timed out, failed, or on_progress failed: stop every stage call
            for response in reversed(pending):
                response.cancel()
            raise

    @staticmethod
    async def _stream(
        client: StageClient,
        call: StageCall,
        args: tuple[Any, ...],
        on_progress: OnProgress,
        preview: bool,
        pending: list[StageResponse | StageStream],
        trace: Trace,
    ) -> Any:
        """Run a streaming step: progress items go to ``on_progress``; the last item is the step's output."""
        stream = client.stream(f"{call.method}_stream", *args, route=call.route, trace=trace, preview=preview)
        pending.append(stream)
        output: Any = None
        async for item in stream:
            if isinstance(item, DenoiseProgress):
                await on_progress(item)
            else:
                output = item
        if output is None:
            raise RuntimeError(f"the {call.stage} stream ended without a result")
        return output


_REPLICA_LOSS = (RayActorError, ActorDiedError, ActorUnavailableError)


def is_replica_loss(exc: BaseException) -> bool:
    """Did the request fail because a replica process died (anywhere along the chain)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _REPLICA_LOSS):
            return True
        if isinstance(current, RayTaskError) and isinstance(current.cause, _REPLICA_LOSS):
            return True
        current = current.__cause__ or current.__context__
    return False
