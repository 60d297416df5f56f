"""stock-sensitivity: per-day market sensitivity of stocks from a quadratic market model.

``from sensitivity import quadratic_sensitivity`` is the library entry point.  Heavy
dependencies (torch) are imported on first use, so the CLI starts quickly.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

# Arrow's default allocator (mimalloc 3, in pyarrow's wheels) backs its arenas with
# transparent huge pages where the kernel allows it, and hands freed memory back a second
# later: a fresh process then zeroes a 2 MiB page for each arena page it touches again.
# In a daily run of 500 tickers that was a tenth of all CPU time (2 of 30 CPU s; reading the
# per-day files 1.2-1.6 s instead of 2.2-2.8 s without it).  Set before pandas or pyarrow is
# imported (this package imports neither here), so mimalloc reads it when Arrow loads; the
# fetch and report worker processes inherit it.  A value set by the user is kept.
os.environ.setdefault("MIMALLOC_ALLOW_THP", "0")

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
