"""Where memexport keeps what it can rebuild (exported ONNX, timing caches, ORT TensorRT engines)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MEMEXPORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/memexport``, else ``~/.cache/memexport``."""
    if os.environ.get("MEMEXPORT_CACHE_DIR"):
        return Path(os.environ["MEMEXPORT_CACHE_DIR"])
    root = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return root / "memexport"
