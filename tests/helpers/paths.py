"""Where things are, wherever pytest was started from."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout's root (``pyproject.toml``, ``jobs/``, ``cluster/``)."""
JOBS = REPO / "jobs"
CONFIGS = JOBS / "configs"
BIN = Path(sys.executable).parent
"""The venv's scripts: ``cola-ray``, ``ray``, ``mlflow``, ``moto_server``."""
CLI = BIN / "cola-ray"
