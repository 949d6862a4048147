"""Rendering the chart with the helm binary the Makefile installs, and the schemas to check objects against."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sdserve"
# "default" is the chart's defaults: auth is on and a bare render fails by design until the key file's Secret is
# named (test_chart.py::test_bare_render_asks_for_api_keys), so it names that Secret and nothing else.
CHART_DEFAULTS = Path(__file__).with_name("default-values.yaml")
VALUES_SETS = {"default": [CHART_DEFAULTS]} | {p.stem: [p] for p in sorted((CHART / "ci").glob("*.yaml"))}
KUBERAY_SCHEMAS = Path(os.environ.get("SDSERVE_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))
KUBERNETES_VERSION = "1.33.0"


def tool(name: str) -> str:
    """A binary from the venv (installed by `make tools`), else from PATH; never skipped when missing."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is not installed; run `make tools`"
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120, check=check)


def render(
    values: list[Path] | None = None, sets: list[str] | None = None, release: str = "sdserve", chart: Path = CHART
) -> list[dict]:
    args = ["template", release, str(chart)]
    for v in values or []:
        args += ["-f", str(v)]
    for s in sets or []:
        args += ["--set-json", s]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def pod_templates(obj: dict) -> list[dict]:
    """Every pod template in an object (RayService head and worker groups, or a workload's template)."""
    if obj["kind"] == "RayService":
        cluster = obj["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    template = obj.get("spec", {}).get("template")
    return [template] if template else []
