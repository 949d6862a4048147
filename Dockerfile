# syntax=docker/dockerfile:1
# sdserve images. Code and pinned dependencies are baked in; model weights are never part of the image
# (they are pulled at replica start into the model cache).
#
#   docker build --target gpu -t sdserve:0.1.0-gpu .   # CUDA runtime on the Ray image (what the chart runs)
#   docker build --target cpu -t sdserve:0.1.0-cpu .   # CPU-only, for development and CI clusters
#
# Ray in the image must match the Ray the chart declares (rayVersion) and requirements.lock pins.

ARG RAY_VERSION=2.60.0

# ---- gpu: Ray's CUDA image (Python 3.11), running as its non-root "ray" user (uid 1000) ----
FROM rayproject/ray:${RAY_VERSION}-py311-cu128 AS gpu
WORKDIR /opt/sdserve
COPY --chown=1000:100 requirements.lock pyproject.toml README.md ./
COPY --chown=1000:100 serving ./serving
COPY --chown=1000:100 models ./models
# Every version comes from the lock file; torch resolves to its CUDA build from PyPI.
RUN python -m pip install --no-cache-dir -c requirements.lock . \
    && python -c "import ray, torch, diffusers; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
ENV HOME=/tmp/home \
    HF_HOME=/var/cache/sdserve/hf \
    SDSERVE_HOME=/var/cache/sdserve \
    PYTHONDONTWRITEBYTECODE=1
USER 1000
EXPOSE 8000 9000 8080

# ---- cpu: slim Python with the CPU build of torch ----
FROM python:3.11-slim-bookworm AS cpu
ARG RAY_VERSION
WORKDIR /opt/sdserve
# uid 1000 / gid 100, like the Ray image's user, so one pod security context fits both targets.
RUN useradd --uid 1000 --gid 100 --create-home --home-dir /home/sdserve sdserve
COPY --chown=1000:100 requirements.lock pyproject.toml README.md ./
COPY --chown=1000:100 serving ./serving
COPY --chown=1000:100 models ./models
RUN python -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -c requirements.lock . \
    && python -c "import ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"
ENV HOME=/tmp/home \
    HF_HOME=/var/cache/sdserve/hf \
    SDSERVE_HOME=/var/cache/sdserve \
    PYTHONDONTWRITEBYTECODE=1
USER 1000
EXPOSE 8000 9000 8080
CMD ["sdserve", "serve"]
