"""Default locations, resolved from the repository root rather than the working folder."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_root() -> Path:
    """The read-only shared folder: ``$MASKMESH_SHARED`` or ``../shared`` beside the repo."""
    env = os.environ.get("MASKMESH_SHARED")
    return Path(env) if env else (REPO_ROOT.parent / "shared").resolve()


def default_data_root() -> Path:
    """Folder holding the data set folders."""
    return shared_root() / "datasets"


def default_runs() -> Path:
    """Folder for run outputs and caches (git-ignored)."""
    return REPO_ROOT / "runs"


def models_dir() -> Path:
    """Folder for shipped models and cards."""
    return REPO_ROOT / "models"


def reports_dir() -> Path:
    """Folder for the models' evaluation reports and plots (images live under docs/)."""
    return REPO_ROOT / "docs" / "model-report"
