"""Where lrcompress caches what it derives once (converted GGUF models, dense baselines)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LRCOMPRESS_CACHE", Path.home() / ".cache" / "lrcompress"))
