"""Style presets: a name that stands for a prompt template, a negative prompt and default settings.

Three sources, later ones winning on a name:

- **Built-in presets** are plug-ins: one module each in ``serving/presets/builtin/``, a function decorated with
  ``@preset`` that returns a ``PresetSpec``. Modules are discovered at import, so a new built-in preset is one new
  file and no list to edit. OpenAI's ``style`` values ``vivid`` and ``natural`` are two of them.
- ``styles.presets`` in the config (inline).
- ``styles.directory``: one YAML file per preset (a ConfigMap in the chart). The folder is checked every
  ``styles.reload_interval_s`` and changes are picked up without a restart; a file that does not parse is
  logged and the preset keeps its previous version.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serving.config import PresetSpec, StylesSpec

logger = logging.getLogger(__name__)

_BUILTIN: dict[str, PresetSpec] = {}


def preset(fn: Callable[[], PresetSpec]) -> Callable[[], PresetSpec]:
    """Register a built-in preset (the decorated function returns it)."""
    spec = fn()
    if spec.name in _BUILTIN:
        raise ValueError(f"built-in preset {spec.name!r} is defined twice")
    _BUILTIN[spec.name] = spec
    return fn


def builtin_presets() -> dict[str, PresetSpec]:
    """Every module of ``serving.presets.builtin``, imported once: name -> preset."""
    from serving.presets import builtin

    for module in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{module.name}")
    return dict(_BUILTIN)


class PresetLibrary:
    """The presets a service offers, with the preset folder re-read when it changes."""

    def __init__(self, spec: StylesSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self._fixed = {**(builtin_presets() if spec.builtin else {}), **{p.name: p for p in spec.presets}}
        self._files: dict[str, PresetSpec] = {}  # file name -> its last good preset
        self._seen: dict[str, float] = {}  # file name -> mtime read
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self.errors: dict[str, str] = {}  # file name -> why it is not (re)loaded
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Re-read the preset folder if it is time to (or ``force``)."""
        directory = self.spec.directory
        if directory is None:
            return
        now = self.clock()
        with self._lock:
            if not force and now - self._checked < self.spec.reload_interval_s:
                return
            self._checked = now
            folder = Path(directory)
            current = {}
            for path in sorted(folder.glob("*.y*ml")) if folder.is_dir() else []:
                if path.name.startswith("."):  # a ConfigMap's ..data links and staging files
                    continue
                try:
                    current[path.name] = path.stat().st_mtime
                except OSError:
                    continue
            for name in set(self._files) - set(current):  # removed
                self._files.pop(name, None)
                self._seen.pop(name, None)
                self.errors.pop(name, None)
            for name, mtime in current.items():
                if self._seen.get(name) == mtime:
                    continue
                self._seen[name] = mtime
                try:
                    data: Any = yaml.safe_load((folder / name).read_text())
                    if isinstance(data, dict):
                        data.setdefault("name", Path(name).stem)
                    self._files[name] = PresetSpec.model_validate(data)
                    self.errors.pop(name, None)
                except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
                    self.errors[name] = f"{type(exc).__name__}: {exc}"[:500]
                    logger.error("preset file %s not loaded (the previous version, if any, stays): %s", name, exc)

    def all(self) -> dict[str, PresetSpec]:
        self.refresh()
        with self._lock:
            return {**self._fixed, **{p.name: p for p in self._files.values()}}

    def get(self, name: str) -> PresetSpec | None:
        return self.all().get(name)
