"""Where the development data lives: ``$WSICODEC_SHARED``, else ``shared/`` beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared data/weights folder (it may not exist: callers check and explain)."""
    env = os.environ.get("WSICODEC_SHARED")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared"
