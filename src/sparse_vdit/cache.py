"""Where sparse-vdit caches what it measures (cost tables, Triton tiles)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SPARSE_VDIT_CACHE``, else ``$XDG_CACHE_HOME/sparse-vdit`` (``~/.cache`` by default)."""
    root = os.environ.get("SPARSE_VDIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse-vdit"
