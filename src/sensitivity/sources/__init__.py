"""Price sources behind one small interface: ``PriceSource.fetch(symbol, start, end)``.

``make_source(cfg)`` builds the source a :class:`~sensitivity.config.SourceConfig` names:
:class:`SampleSource` (the bundled offline sample), :class:`FilesSource` (a folder of CSV or
Parquet files) or :class:`YahooSource` (live, yfinance).  ``YahooSource`` is imported on first
use, so importing this package does not import yfinance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sensitivity.sources.base import PriceSource, make_source
from sensitivity.sources.files import FilesSource
from sensitivity.sources.sample import SampleSource

if TYPE_CHECKING:
    from sensitivity.sources.yahoo import YahooSource

__all__ = ["FilesSource", "PriceSource", "SampleSource", "YahooSource", "make_source"]


def __getattr__(name: str) -> Any:
    if name == "YahooSource":
        from sensitivity.sources.yahoo import YahooSource

        return YahooSource
    raise AttributeError(f"module 'sensitivity.sources' has no attribute {name!r}")
