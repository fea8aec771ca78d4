"""The one cache folder: the converted embedded teacher and tokenised corpora live under it."""

import os
from pathlib import Path

CACHE_ENV = "MINITRON_CACHE_DIR"


def cache_path(*parts: str) -> Path:
    """``parts`` under the cache folder: $MINITRON_CACHE_DIR if set, else $XDG_CACHE_HOME/nemo-minitron, else
    ~/.cache/nemo-minitron (an empty variable counts as unset)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "nemo-minitron"
    else:
        root = Path.home() / ".cache" / "nemo-minitron"
    return root.joinpath(*parts)
