"""The canonical daily price frame every source produces and the store keeps.

A *price frame* is a :class:`pandas.DataFrame` with

* index: ``DatetimeIndex`` named ``date``, tz-naive midnight trading dates, strictly increasing;
* columns :data:`PRICE_COLUMNS`, all float64 (NaN where the source has no value):
  ``open, high, low, close`` (as quoted, split-adjusted by Yahoo), ``adj_close`` (split- and
  dividend-adjusted; NaN for the whole frame when the source has none), ``volume``,
  ``dividends`` (cash per share paid that day, 0.0 on other days), ``splits`` (split ratio
  that day, e.g. 4.0 for 4:1, 0.0 on other days).  ``dividends`` and ``splits`` are NaN when
  the source does not report corporate actions at all (e.g. a classic CSV download).

:func:`check_price_frame` enforces that contract at the boundary of every source.
:class:`PriceArrays` holds some columns of one as plain arrays, the form the fit reads a
universe's stored prices in (a frame per symbol cost more than the read).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from sensitivity.errors import DataValidationError, EmptyDataError

PRICE_COLUMNS: tuple[str, ...] = (
    "open",
    "high",
    "low",
    "close",
    "adj_close",
    "volume",
    "dividends",
    "splits",
)


#: The columns that must be positive where present (prices, not volume or actions).
POSITIVE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "adj_close")

_EPOCH = dt.date(1970, 1, 1)


def empty_price_frame() -> pd.DataFrame:
    """A price frame with no rows (the right columns, dtypes and index)."""
    index = pd.DatetimeIndex([], name="date", dtype="datetime64[ns]")
    return pd.DataFrame({c: pd.Series([], dtype="float64", index=index) for c in PRICE_COLUMNS})


def float_columns(frame: pd.DataFrame, names: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
    """``{name: frame[name].to_numpy(dtype=np.float64, na_value=np.nan)}`` for ``names``.

    A price frame's columns (all float64) come from one conversion of the whole frame: the
    same values for about 60 us instead of 40 us a column (pandas builds a Series for each
    lookup, and a daily fetch looks at its few-row frames some forty times a symbol).  Raises
    ``KeyError`` for a missing name, as a lookup does.
    """
    same = _float_block(frame, names)
    if same is not None:
        return same
    return {n: np.asarray(frame[n].to_numpy(dtype=np.float64, na_value=np.nan)) for n in names}


def _float_block(frame: pd.DataFrame, names: Sequence[str]) -> dict[str, npt.NDArray[np.float64]] | None:
    """:func:`float_columns` from one conversion when every column is float64; else None."""
    columns = frame.columns.tolist()
    if len(set(columns)) != len(columns) or not all(d == np.float64 for d in frame.dtypes.to_numpy()):
        return None
    at = {c: i for i, c in enumerate(columns)}
    if not all(n in at for n in names):
        return None  # a missing name: the lookups raise as they always did
    block = frame.to_numpy()
    return {n: block[:, at[n]] for n in names}


def check_price_frame(frame: pd.DataFrame, symbol: str) -> pd.DataFrame:
    """Return ``frame`` if it is a valid price frame for ``symbol``; raise otherwise.

    Raises :class:`EmptyDataError` when there is no row with a usable close, and
    :class:`DataValidationError` for a broken invariant, naming the symbol and the first
    offending date.
    """
    missing = [c for c in PRICE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{symbol}: price frame lacks column(s) {', '.join(missing)}")
    idx = frame.index
    if not isinstance(idx, pd.DatetimeIndex) or idx.tz is not None:
        raise DataValidationError(f"{symbol}: price dates must be tz-naive dates, got {idx.dtype}")
    # Each column is taken once, all in one conversion where they can be: a column lookup
    # costs pandas tens of microseconds, and every fetch checks a few frames.
    prices = _float_block(frame, POSITIVE_COLUMNS)
    if prices is None:  # a column that is not float64: refused below, after the other checks
        prices = {c: frame[c].to_numpy() for c in POSITIVE_COLUMNS}
    if len(frame) == 0 or not np.isfinite(prices["close"]).any():
        raise EmptyDataError(f"{symbol}: the source returned no prices", symbol=symbol)
    if idx.has_duplicates:
        dup = idx[idx.duplicated()][0]
        raise DataValidationError(f"{symbol}: date {dup.date()} appears more than once")
    if not idx.is_monotonic_increasing:
        raise DataValidationError(f"{symbol}: dates are not sorted ascending")
    dtypes = frame.dtypes
    for col in PRICE_COLUMNS:
        if dtypes[col] != np.float64:
            raise DataValidationError(f"{symbol}: column {col} must be float64, got {dtypes[col]}")
    _check_positive(prices, lambda i: idx[i].date(), symbol)
    return frame


def check_price_arrays(
    days: npt.NDArray[np.int64], prices: Mapping[str, npt.NDArray[np.float64]], symbol: str
) -> None:
    """:func:`check_price_frame` of the same data held as arrays, with the same messages.

    ``days``: int64 days since 1970-01-01; ``prices``: at least :data:`POSITIVE_COLUMNS`
    as float64 arrays of the same length, NaN where absent.  For a merge built from Arrow
    tables, which never goes through pandas.
    """
    if len(days) == 0 or not np.isfinite(prices["close"]).any():
        raise EmptyDataError(f"{symbol}: the source returned no prices", symbol=symbol)
    if (np.diff(days) <= 0).any():  # rare: name the culprit as check_price_frame does
        repeated = pd.Index(days).duplicated()
        if repeated.any():
            dup = epoch_day(int(days[np.flatnonzero(repeated)[0]]))
            raise DataValidationError(f"{symbol}: date {dup} appears more than once")
        raise DataValidationError(f"{symbol}: dates are not sorted ascending")
    _check_positive(prices, lambda i: epoch_day(int(days[i])), symbol)


def epoch_day(days: int) -> dt.date:
    """The date ``days`` days after 1970-01-01 (how Arrow's date32 counts)."""
    return _EPOCH + dt.timedelta(days=days)


def _check_positive(
    prices: Mapping[str, npt.NDArray[np.float64]], day_of: Callable[[int], dt.date], symbol: str
) -> None:
    for col in POSITIVE_COLUMNS:
        values = prices[col]
        bad = np.flatnonzero(np.isfinite(values) & (values <= 0))
        if bad.size:
            raise DataValidationError(
                f"{symbol}: {col} is {float(values[bad[0]])!r} on {day_of(int(bad[0]))}; prices must be "
                "positive (fix or remove the row in the source)"
            )


@dataclass(frozen=True, eq=False)
class PriceArrays:
    """Some price columns of one symbol as numpy arrays, in stored order.

    ``days``: int64 days since 1970-01-01 (the dates; not checked for order here);
    ``columns``: float64 arrays of the same length, by column name (of :data:`PRICE_COLUMNS`).
    """

    days: npt.NDArray[np.int64]
    columns: Mapping[str, npt.NDArray[np.float64]]

    def __len__(self) -> int:
        return int(self.days.shape[0])

    def frame(self) -> pd.DataFrame:
        """The same data as a price frame of these columns (a ``date`` index)."""
        return pd.DataFrame(dict(self.columns), index=date_index(self.days))


def date_index(days: npt.NDArray[np.int64]) -> pd.DatetimeIndex:
    """Days since 1970-01-01 as a price frame's index (``date``, midnight, nanoseconds)."""
    return pd.DatetimeIndex(days.astype("datetime64[D]").astype("datetime64[ns]"), name="date")
