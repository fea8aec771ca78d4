"""Console hygiene for the command-line entry points (never applied by importing the package)."""

from __future__ import annotations

import warnings


def quiet_known_warnings() -> None:
    """Ignore known noise: notices of absent Transformer Engine / Apex (expected on CPU), "full scope is deprecated"."""
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
