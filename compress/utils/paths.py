"""Where compress keeps what it downloads and converts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$COMPRESS_CACHE`` if set, else ``~/.cache/compress``; created on first use."""
    root = os.environ.get("COMPRESS_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "compress"
    path.mkdir(parents=True, exist_ok=True)
    return path
