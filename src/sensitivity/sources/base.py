"""The one small interface every price source implements, and what the sources share.

A source turns ``(symbol, start, end)`` into a *price frame* (see :mod:`sensitivity.prices`):

* both dates are **inclusive** trading dates; rows outside them are not returned;
* the frame passes :func:`~sensitivity.prices.check_price_frame` (tz-naive ``DatetimeIndex``
  named ``date``, strictly increasing, float64 columns, positive prices);
* it is never empty: a source raises a :class:`~sensitivity.errors.SourceError` subclass
  (``EmptyDataError``, ``SymbolNotFoundError``, ``RateLimitError``, ``NetworkError``) or a
  :class:`~sensitivity.errors.DataValidationError` whose message names the symbol and says
  what to do.

Each source splits *extract* (the only disk or network read) from *transform* (a pure
function from what was read to a price frame, tested on recorded data).  The helpers here are
the pure steps the sources share.

Every source's rows pass the boundary checks of :mod:`sensitivity.sources.quality`
(duplicated dates, missing or non-positive prices, high < low, 100x jumps), which drop bad
rows and record why.  The sources of this package expose the record through
``fetch_checked(symbol, start, end) -> CheckedPrices``; :func:`fetch_checked` gives the same
for any :class:`PriceSource`.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from sensitivity.errors import ConfigError, EmptyDataError
from sensitivity.prices import PRICE_COLUMNS, check_price_frame
from sensitivity.sources.quality import CheckedPrices, clean_price_frame

if TYPE_CHECKING:
    from sensitivity.config import SourceConfig

__all__ = [
    "PriceSource",
    "check_date_range",
    "fetch_checked",
    "make_source",
    "select_date_range",
    "trading_date_index",
]


@runtime_checkable
class PriceSource(Protocol):
    """Where daily prices come from.

    ``name`` says which source it is, for logs and the manifest: ``"yahoo"``,
    ``"files:<folder>"`` or ``"sample"``.
    """

    name: str

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """Return the price frame of ``symbol`` from ``start`` to ``end``, both inclusive.

        Raises a :class:`~sensitivity.errors.SourceError` subclass (never returns an empty
        frame) or :class:`~sensitivity.errors.DataValidationError` for broken data.
        """
        ...


def make_source(cfg: SourceConfig) -> PriceSource:
    """Build the source a validated :class:`~sensitivity.config.SourceConfig` describes.

    The Yahoo source (and with it yfinance) is imported only when it is asked for.
    """
    if cfg.kind == "sample":
        from sensitivity.sources.sample import SampleSource

        return SampleSource()
    if cfg.kind == "files":
        from sensitivity.sources.files import FilesSource

        if cfg.path is None:  # SourceConfig refuses this already; kept for a clear message
            raise ConfigError("source.path is required when source.kind is 'files'")
        return FilesSource(cfg.path)
    if cfg.kind == "yahoo":
        from sensitivity.sources.yahoo import YahooSource

        return YahooSource(
            timeout_s=cfg.timeout_s, requests_per_second=cfg.requests_per_second, repair=cfg.repair
        )
    raise ConfigError(f"source.kind must be one of yahoo, files, sample, got {cfg.kind!r}")


def fetch_checked(
    source: PriceSource,
    symbol: str,
    start: dt.date,
    end: dt.date,
    *,
    checked_prefix: str | None = None,
) -> CheckedPrices:
    """``source``'s prices of ``symbol`` from ``start`` to ``end`` with their quality report.

    Uses the source's own ``fetch_checked`` when it has one (the sources of this package do);
    otherwise the frame ``fetch`` returns goes through
    :func:`~sensitivity.sources.quality.clean_price_frame`.  ``checked_prefix``: what the
    source's last fetch of ``symbol`` reported it had checked
    (:attr:`~sensitivity.sources.quality.CheckedPrices.checked_prefix`), handed back to a
    source that takes it (``takes_checked_prefix``: the ``files`` source) and ignored by the
    others.  It only spares work: the result is the same with or without it.
    """
    own = getattr(source, "fetch_checked", None)
    if callable(own):
        if checked_prefix is not None and getattr(source, "takes_checked_prefix", False):
            result = own(symbol, start, end, checked_prefix=checked_prefix)
        else:
            result = own(symbol, start, end)
        if not isinstance(result, CheckedPrices):  # pragma: no cover - a foreign source's bug
            raise TypeError(
                f"{source!r}.fetch_checked must return CheckedPrices, got {type(result).__name__}"
            )
        return result
    frame = source.fetch(symbol, start, end)
    return clean_price_frame(frame, symbol, origin=source.name, start=start, end=end)


def check_date_range(start: dt.date, end: dt.date) -> None:
    """Refuse a range whose start is after its end (or dates that are not dates)."""
    for what, value in (("start", start), ("end", end)):
        if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
            raise ConfigError(f"{what} must be a date (YYYY-MM-DD), got {value!r}")
    if start > end:
        raise ConfigError(f"start {start} is after end {end}; start must be on or before end")


def trading_date_index(values: object) -> pd.DatetimeIndex:
    """A tz-naive ``datetime64[ns]`` index named ``date`` of midnight trading dates.

    ``values`` are dates, naive datetimes or ``datetime64`` values (any unit); times of day
    are dropped.  The index has no ``freq`` (pandas would infer one for consecutive days).
    """
    index = pd.DatetimeIndex(pd.to_datetime(values))  # type: ignore[call-overload]
    if index.tz is not None:
        raise ValueError("trading_date_index expects naive dates; convert tz-aware values first")
    return pd.DatetimeIndex(index.as_unit("ns").normalize().to_numpy(), name="date")


def select_date_range(
    frame: pd.DataFrame, symbol: str, start: dt.date, end: dt.date, *, origin: str
) -> pd.DataFrame:
    """Keep the rows of a full price frame from ``start`` to ``end`` (inclusive) and check them.

    ``origin`` names where the prices came from (a file, "the bundled sample", "Yahoo") for
    the message of the :class:`EmptyDataError` raised when no row falls in the range.
    """
    index = frame.index
    assert isinstance(index, pd.DatetimeIndex)
    lo, hi = pd.Timestamp(start), pd.Timestamp(end)
    mask = (index >= lo) & (index <= hi)
    selected = frame.loc[mask, list(PRICE_COLUMNS)]
    if not np.isfinite(selected["close"].to_numpy()).any():
        if len(frame):
            covered = f"it has prices from {index.min().date()} to {index.max().date()}"
        else:
            covered = "it has no prices at all"
        raise EmptyDataError(
            f"{symbol}: {origin} has no prices between {start} and {end} ({covered}; "
            "widen the dates or update the data)",
            symbol=symbol,
        )
    return check_price_frame(selected, symbol)
