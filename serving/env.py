"""Environment variables sdserve reads, all in one place. They never change the deployment graph."""

from __future__ import annotations

import os
from pathlib import Path

# Where `sdserve serve` keeps the tiny test model it creates when no model is configured.
SDSERVE_HOME = Path(os.environ.get("SDSERVE_HOME", Path.home() / ".cache" / "sdserve")).expanduser()

# Log level of the sdserve loggers (DEBUG, INFO, WARNING, ...).
SDSERVE_LOG_LEVEL = os.environ.get("SDSERVE_LOG_LEVEL", "INFO").upper()

# Password of the Redis job store when jobs.store_url carries none (keep it out of the config).
SDSERVE_REDIS_PASSWORD = os.environ.get("SDSERVE_REDIS_PASSWORD") or None
