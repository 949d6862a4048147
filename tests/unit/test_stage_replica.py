"""A stage replica that Serve stops while it is still loading ends the load quietly (no Ray needed).

Serve stops a replica by calling its ``__del__`` and then shutting the event loop's default executor down
(``call_destructor`` in ray/serve/_private/replica.py); a downscale right after a scale-up does that while the
new replica is inside its first ``reconfigure``. These tests play that sequence on a plain event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from serving.config import AppConfig
from serving.deployments.common import StageReplica


class DecoderReplica(StageReplica):
    kind = "decoder"  # the cheapest stage to build


def make_replica(model_dir: Path, cache: Path) -> tuple[DecoderReplica, dict[str, Any]]:
    config = AppConfig.model_validate(
        {
            "models": [{"name": "tiny", "source": str(model_dir)}],
            "registry": {"cache_dir": str(cache)},
            "decoder": {"torch_threads": 1},
        }
    )
    return DecoderReplica(config.model_dump(mode="json")), config.catalog()


def run_like_serve(test: Any) -> None:
    """Run ``test(default_executor)`` on a fresh loop whose default executor Serve would own."""
    executor = ThreadPoolExecutor(max_workers=2)

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(executor)
        await test(executor)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown(wait=True)


def stop_like_serve(replica: StageReplica, executor: ThreadPoolExecutor) -> None:
    if hasattr(replica, "__del__"):  # what Serve checks before calling it
        replica.__del__()
    executor.shutdown(wait=False)


def assert_quiet_stop(caplog: pytest.LogCaptureFixture, model_dir: Path) -> None:
    """The replica logged one info line about the abandoned load: no error, and not 'ready'."""
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "serving.deployments.common"]
    assert messages == [("INFO", f"decoder replica is stopping; abandoned loading tiny from {model_dir}")]


def test_stopped_before_the_load_starts(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The failure from the issue: reconfigure's first fetch meets an executor Serve already shut down."""
    caplog.set_level(logging.INFO)
    replica, catalog = make_replica(tiny_model_dir, tmp_path)

    async def test(executor: ThreadPoolExecutor) -> None:
        stop_like_serve(replica, executor)
        await replica.reconfigure(catalog)  # returns: no exception for Serve to report

    run_like_serve(test)
    assert_quiet_stop(caplog, tiny_model_dir)
    assert replica.active == {} and replica.runtime.loaded == {}


def test_stopped_while_fetching(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fetch already running finishes, but nothing is built after it and the load ends quietly."""
    caplog.set_level(logging.INFO)
    replica, catalog = make_replica(tiny_model_dir, tmp_path)
    fetching, release = threading.Event(), threading.Event()
    fetch = replica.runtime.fetch

    def slow_fetch(ref: str) -> Any:
        fetching.set()
        assert release.wait(30)
        return fetch(ref)

    replica.runtime.fetch = slow_fetch  # type: ignore[method-assign]

    async def test(executor: ThreadPoolExecutor) -> None:
        load = asyncio.ensure_future(replica.reconfigure(catalog))
        assert await asyncio.to_thread(fetching.wait, 30)
        stop_like_serve(replica, executor)
        release.set()
        await asyncio.wait_for(load, 30)

    run_like_serve(test)
    assert_quiet_stop(caplog, tiny_model_dir)
    assert replica.active == {} and replica.runtime.loaded == {}


def test_a_replica_not_stopping_still_loads_and_still_fails_loudly(tiny_model_dir: Path, tmp_path: Path) -> None:
    replica, catalog = make_replica(tiny_model_dir, tmp_path)

    async def loads(executor: ThreadPoolExecutor) -> None:
        await replica.reconfigure(catalog)

    run_like_serve(loads)
    assert list(replica.active) == ["tiny"] and len(replica.runtime.loaded) == 1

    # The same executor error without a stop is a real failure: the replica must not report ready.
    fresh, _ = make_replica(tiny_model_dir, tmp_path)

    async def broken(executor: ThreadPoolExecutor) -> None:
        executor.shutdown(wait=False)
        with pytest.raises(RuntimeError, match="after shutdown"):
            await fresh.reconfigure(catalog)

    run_like_serve(broken)
    assert fresh.active == {} and "tiny" in fresh.load_errors
