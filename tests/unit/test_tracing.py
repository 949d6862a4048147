"""Trace context through the chain runner, without Ray: off, stage calls carry nothing; on, every stage call carries
the caller's span as a W3C ``trace`` argument, and a span whose block raises ends with status ERROR."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from serving import tracing
from serving.config import LimitsSpec
from serving.plans import Plan, StageCall
from serving.runner import ChainRunner, LocalStageClient

CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


class Stage:
    """Records the keyword arguments of each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def run(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return "out"

    async def run_stream(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        yield "out"


def run_plan() -> dict[str, Stage]:
    stages = {"a": Stage(), "b": Stage()}
    plan = Plan((StageCall("a", "run", ("x",)), StageCall("b", "run", progress=True)))
    runner = ChainRunner({n: LocalStageClient(s) for n, s in stages.items()}, LimitsSpec(), map_error=lambda e: e)

    async def progress(_: Any) -> None:
        pass

    asyncio.run(runner.run(plan, on_progress=progress))
    return stages


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def test_off_stage_calls_carry_nothing() -> None:
    assert not tracing.enabled() and tracing.carrier() is None
    with tracing.span("x", {"traceparent": TRACEPARENT}, make_current=True) as span:
        assert span is None and tracing.carrier() is None
    stages = run_plan()
    assert [call for stage in stages.values() for call in stage.calls] == [{}, {"preview": False}]


def test_on_every_stage_call_carries_the_ingress_span(exporter: InMemorySpanExporter) -> None:
    async def handle() -> tuple[dict[str, Stage], Any]:
        with tracing.span("ingress", {"traceparent": TRACEPARENT}, make_current=True) as span:
            return await asyncio.to_thread(run_plan), span

    stages, ingress = asyncio.run(handle())
    assert ingress.parent.span_id == int(CLIENT_SPAN, 16)
    assert format(ingress.get_span_context().trace_id, "032x") == CLIENT_TRACE
    context = ingress.get_span_context()
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert [call["trace"]["traceparent"] for stage in stages.values() for call in stage.calls] == [expected] * 2


def test_a_raising_block_ends_its_span_with_an_error(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), tracing.span("stage", {"traceparent": TRACEPARENT}):
        raise ValueError("no such thing")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and span.parent.span_id == int(CLIENT_SPAN, 16)
    assert [event.name for event in span.events] == ["exception"]
    assert span.events[0].attributes["exception.type"] == "ValueError"
