"""Regenerate the kustomize base and overlay patches from the Helm chart (`make k8s`).

The chart is the one source of truth: `base/sdserve.yaml` is the chart rendered with `base/values.yaml`;
each overlay's `rayservice.yaml` is a merge patch carrying the RayService spec rendered with the overlay's
`values.yaml`, and `extra.yaml` holds the objects only that overlay has. A test regenerates everything and
fails when the committed files differ.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
CHART = K8S.parent / "charts" / "sdserve"
RELEASE = "sdserve"
HEADER = "# Generated from charts/sdserve by k8s/generate.py (make k8s); edit the values file, not this one.\n"


def helm_binary() -> str:
    local = Path(sys.executable).parent / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        raise SystemExit("helm not found; run `make tools`")
    return found


def render(values: Path) -> list[dict]:
    out = subprocess.run(
        [helm_binary(), "template", RELEASE, str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def dump(docs: list[dict]) -> str:
    return HEADER + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def generate(target: Path = K8S) -> list[Path]:
    """Write the generated files under ``target`` (the k8s folder layout); return their paths."""
    written = []
    base = render(K8S / "base" / "values.yaml")
    (target / "base").mkdir(parents=True, exist_ok=True)
    path = target / "base" / "sdserve.yaml"
    path.write_text(dump(base))
    written.append(path)
    base_keys = {key(o) for o in base}
    for overlay in sorted((K8S / "overlays").iterdir()):
        docs = render(overlay / "values.yaml")
        out_dir = target / "overlays" / overlay.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (service,) = [d for d in docs if d["kind"] == "RayService"]
        patch = {
            "apiVersion": service["apiVersion"],
            "kind": service["kind"],
            "metadata": {"name": service["metadata"]["name"]},
            "spec": service["spec"],
        }
        path = out_dir / "rayservice.yaml"
        path.write_text(dump([patch]))
        written.append(path)
        extra = [d for d in docs if key(d) not in base_keys]
        path = out_dir / "extra.yaml"
        path.write_text(dump(extra) if extra else HEADER + "[]\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in generate():
        print(f"wrote {p.relative_to(K8S.parent)}")
