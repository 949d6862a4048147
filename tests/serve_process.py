"""Running a Ray Serve config file with Ray's own `serve run` in a child process, as a cluster would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.processes import stop_process_group
from serving.local import LOCAL_RAY_ENV


@contextmanager
def serve_run(config_file: Path, port: int, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """Start `serve run CONFIG` on a fresh local Ray; yield the base URL once /readyz answers 200."""
    env = LOCAL_RAY_ENV | {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra_env or {})
    log = config_file.with_suffix(".log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(config_file)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/readyz", timeout=10).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                break
            time.sleep(1)
        if not ready:
            log.flush()
            tail = config_file.with_suffix(".log").read_text()[-3000:]
            raise AssertionError(f"`serve run {config_file.name}` never became ready:\n{tail}")
        yield url
    finally:
        stop_process_group(proc, signal.SIGINT)
        log.close()
