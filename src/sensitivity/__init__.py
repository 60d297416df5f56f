"""stock-sensitivity: per-day market sensitivity of stocks from a quadratic market model.

``from sensitivity import quadratic_sensitivity`` is the library entry point.  Heavy
dependencies (torch) are imported on first use, so the CLI starts quickly.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("stock-sensitivity")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from sensitivity.api import quadratic_sensitivity

__all__ = ["__version__", "quadratic_sensitivity"]


def __getattr__(name: str) -> Any:
    if name == "quadratic_sensitivity":
        from sensitivity.api import quadratic_sensitivity

        return quadratic_sensitivity
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
