"""Baseline (b): the common self-hosted design — one FastAPI process, one pipeline behind an asyncio.Lock,
generation in a worker thread (one thread that also loaded the pipeline).

    python -m benchmarks.baselines.lock_server MODEL_DIR PORT
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from benchmarks.baselines.common import PipelineWorker


def create_app(model_dir: str) -> FastAPI:
    app = FastAPI()
    worker = PipelineWorker(model_dir)
    lock = asyncio.Lock()

    @app.post("/v1/images/generations")
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        async with lock:
            images = await worker.generate(body)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in images]}

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
