"""Baseline (c): the design of Ray's own Stable Diffusion example — one Ray Serve deployment runs the whole
pipeline per request, behind a FastAPI ingress deployment.

    python -m benchmarks.baselines.monolith MODEL_DIR PORT
"""

import signal
import sys
import threading
import time
from typing import Any

from fastapi import Body, FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

api = FastAPI()


# One request at a time: Serve runs sync methods on a thread pool, and concurrent calls into one shared
# diffusers pipeline corrupt its scheduler state (seen here: IndexError in the scheduler step).
@serve.deployment(name="Pipeline", max_ongoing_requests=1)
class PipelineDeployment:
    def __init__(self, model_dir: str) -> None:
        from benchmarks.baselines.common import PipelineWorker

        self.worker = PipelineWorker(model_dir)

    async def generate(self, body: dict[str, Any]) -> list[str]:
        images: list[str] = await self.worker.generate(body)
        return images


@serve.deployment(name="APIIngress")
@serve.ingress(api)
class APIIngress:
    def __init__(self, pipeline: DeploymentHandle) -> None:
        self.pipeline = pipeline

    @api.post("/v1/images/generations")
    async def generate(self, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        images = await self.pipeline.generate.remote(body)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in images]}

    @api.get("/readyz")
    async def ready(self) -> dict[str, str]:
        return {"status": "ready"}


def main(model_dir: str, port: int) -> None:
    import ray

    from serving.local import local_ray_env

    local_ray_env()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    import torch

    gpus = 1 if torch.cuda.is_available() else 0
    app = APIIngress.options(ray_actor_options={"num_cpus": 0.25}).bind(  # type: ignore[attr-defined]
        PipelineDeployment.options(ray_actor_options={"num_cpus": 1, "num_gpus": gpus}).bind(model_dir)  # type: ignore[attr-defined]
    )
    serve.run(app, name="monolith", route_prefix="/", blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
