"""Features cached per file content: `<root>/<extractor>/<sha256[:2]>/<sha256>.npy`, so comparing a
folder again (or a renamed copy of it) does not run the network again and gives the same numbers
bit for bit. Root: $LDM_METRICS_CACHE, else $XDG_CACHE_HOME/ldm/metrics, else ~/.cache/ldm/metrics."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def default_root() -> Path:
    if os.environ.get("LDM_METRICS_CACHE"):
        return Path(os.environ["LDM_METRICS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm" / "metrics"


class FeatureCache:
    """get/put of one feature vector per content hash for one extractor (its name is part of the path,
    so features of another network or another resize never mix)."""

    def __init__(self, extractor: str, root: str | os.PathLike | None = None):
        self.dir = Path(root if root is not None else default_root()) / extractor

    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def get(self, sha: str) -> np.ndarray | None:
        try:
            return np.load(self._path(sha), allow_pickle=False)
        except (OSError, ValueError):           # absent, or a damaged entry: compute it again
            return None

    def put(self, sha: str, features: np.ndarray) -> None:
        """Written to a temporary file and renamed, so a killed run never leaves half an entry;
        a cache that can't be written (read-only home) is no error, only slower next time."""
        path, tmp = self._path(sha), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, features, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
