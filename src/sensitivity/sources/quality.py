"""Data quality at the source boundary: one pure function every source's rows pass through.

:func:`clean_price_frame` takes the rows a source read for one symbol (price-frame columns,
dates that may still carry a time of day or a timezone, possibly broken rows) and returns a
checked price frame plus a :class:`QualityReport` saying which rows it dropped and why.
Nothing is dropped silently and nothing is ever filled or rescaled.  The rules, in order
(see docs/data-quality.md for why each is a drop and not an error):

1. **Dates** become naive trading dates: a tz-aware index is read as the wall-clock date in
   its own zone (the exchange's, as the sources deliver it); a time of day is dropped; rows
   are sorted by their original timestamp.
2. **Missing prices**: a row without any price, without a close, or without an adjusted close
   while other rows have one, is dropped and recorded.
3. **Non-positive or infinite prices** (any of open, high, low, close, adjusted close): dropped.
4. **high < low**: dropped.
5. **Duplicated dates**: of the rows left, the first of a date (earliest timestamp) is kept,
   the others are dropped and recorded.
6. **100x jumps**: a run of at most :data:`MAX_SPIKE_ROWS` rows whose close is more than
   :data:`JUMP_RATIO` times (or less than 1/:data:`JUMP_RATIO` of) the close before it, and
   which comes back just as far on the next row, is a unit mix-up (pence for pounds, cents
   for dollars): dropped.  A jump that does not come back is kept with a warning (it may be
   real; ``source.repair = true`` lets yfinance look at it).  Indices and rates (symbols
   starting with ``^``) have no currency unit to mix up, and a rate near zero can move 50x
   for real, so this rule skips them.

A frame with no usable row left raises :class:`~sensitivity.errors.EmptyDataError` naming the
symbol, the range and what was dropped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd

from sensitivity.errors import DataValidationError, EmptyDataError
from sensitivity.prices import PRICE_COLUMNS, check_price_frame, float_columns

__all__ = [
    "JUMP_RATIO",
    "MAX_SPIKE_ROWS",
    "REASON_DUPLICATE",
    "REASON_NO_PRICE",
    "CheckedPrices",
    "QualityIssue",
    "QualityReport",
    "clean_price_frame",
    "naive_trading_dates",
]

#: A day-over-day close ratio beyond this (or below its inverse) is a "100x" jump.
JUMP_RATIO: Final = 50.0

#: The longest run of rows a reverting 100x jump may span and still be dropped as a mix-up.
MAX_SPIKE_ROWS: Final = 5

#: The prices of a row (volume and corporate actions are not prices).
PRICE_FIELDS: Final = ("open", "high", "low", "close", "adj_close")

REASON_DUPLICATE: Final = "duplicate date: an earlier row of the same date was kept"
REASON_NO_PRICE: Final = "no price: open, high, low, close and adjusted close are all missing"


@dataclass(frozen=True)
class QualityIssue:
    """One row that was dropped, repaired or looked suspicious: its date and why."""

    date: str  #: ISO date, ``YYYY-MM-DD``
    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"date": ..., "reason": ...}`` (for the manifest)."""
        return {"date": self.date, "reason": self.reason}


@dataclass(frozen=True)
class QualityReport:
    """What the boundary checks did to one symbol's rows.

    ``dropped``: rows removed (never passed on); ``repaired``: rows the source repaired
    (yfinance with ``repair=True``); ``warnings``: rows kept but worth a look.
    """

    symbol: str
    dropped: tuple[QualityIssue, ...] = ()
    repaired: tuple[QualityIssue, ...] = ()
    warnings: tuple[QualityIssue, ...] = ()

    @property
    def clean(self) -> bool:
        """True when nothing was dropped, repaired or flagged."""
        return not (self.dropped or self.repaired or self.warnings)

    def summary(self) -> str:
        """One line: how many rows were dropped/repaired/flagged and the first reasons."""
        parts: list[str] = []
        for label, issues in (
            ("dropped", self.dropped),
            ("repaired", self.repaired),
            ("flagged", self.warnings),
        ):
            if issues:
                first = "; ".join(f"{i.date}: {i.reason}" for i in issues[:3])
                more = f"; and {len(issues) - 3} more" if len(issues) > 3 else ""
                parts.append(f"{len(issues)} row(s) {label} ({first}{more})")
        return ", ".join(parts) if parts else "no issues"


@dataclass(frozen=True)
class CheckedPrices:
    """A checked price frame and the report of the checks that produced it."""

    frame: pd.DataFrame
    quality: QualityReport
    #: What the source has checked of the symbol's data, to hand back to its next fetch so
    #: that it need not check it again (an opaque text; only the ``files`` source gives one:
    #: :class:`~sensitivity.sources.files.CheckedPrefix`).  None: nothing to hand back.
    checked_prefix: str | None = None


def _iso(day: Any) -> str:
    return pd.Timestamp(day).date().isoformat()


def naive_trading_dates(index: pd.Index) -> pd.DatetimeIndex:
    """Midnight, tz-naive ``datetime64[ns]`` dates of ``index`` (wall-clock dates in its zone).

    Any time of day is dropped.  Raises :class:`DataValidationError` for an index that does
    not hold timestamps.
    """
    if not isinstance(index, pd.DatetimeIndex):
        try:
            index = pd.DatetimeIndex(pd.to_datetime(index))  # type: ignore[call-overload]
        except (TypeError, ValueError) as exc:
            raise DataValidationError(f"price dates must be dates, got {index.dtype} ({exc})") from exc
    if index.tz is not None:
        index = index.tz_localize(None)  # the wall-clock time in the index's own zone
    # Midnight of each wall-clock date (numpy: DatetimeIndex.normalize infers a frequency).
    days = index.as_unit("ns").to_numpy().astype("datetime64[D]")
    return pd.DatetimeIndex(days.astype("datetime64[ns]"), name="date")


def _in_range(dates: pd.DatetimeIndex, start: dt.date | None, end: dt.date | None) -> np.ndarray:
    mask = np.ones(len(dates), dtype=bool)
    if start is not None:
        mask &= np.asarray(dates >= pd.Timestamp(start))
    if end is not None:
        mask &= np.asarray(dates <= pd.Timestamp(end))
    return mask


def _fmt(value: Any) -> str:
    return f"{float(value):.6g}"


def clean_price_frame(
    frame: pd.DataFrame,
    symbol: str,
    *,
    origin: str = "the source",
    start: dt.date | None = None,
    end: dt.date | None = None,
    dropped: Iterable[QualityIssue] = (),
    repaired: Iterable[QualityIssue] = (),
) -> CheckedPrices:
    """Apply the boundary checks to ``frame`` and keep the rows from ``start`` to ``end``.

    ``frame`` has the price-frame columns (others are ignored) and a date index that may be
    tz-aware, carry times of day, be unsorted or hold a date twice.  ``dropped`` and
    ``repaired`` are issues the source found itself (rows it could not deliver, rows
    yfinance repaired); they are reported with the others, limited to the range.  Pure.

    Raises :class:`EmptyDataError` (naming ``origin`` and the range) when no usable row is
    left, and :class:`DataValidationError` when a column is missing.
    """
    missing = [c for c in PRICE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataValidationError(f"{symbol}: price frame lacks column(s) {', '.join(missing)}")
    try:
        stamps = naive_trading_dates(frame.index)
    except DataValidationError as exc:
        raise DataValidationError(f"{symbol}: {exc}") from exc
    # The rows in range, sorted by their original timestamps (stable): the same rows in the
    # same order as sorting every row and then taking the range, without touching the rest.
    rows = np.flatnonzero(_in_range(stamps, start, end))
    order = rows[np.argsort(_sortable(frame.index)[rows], kind="stable")]
    values: dict[str, np.ndarray] = {c: v[order] for c, v in float_columns(frame, PRICE_COLUMNS).items()}
    dates = stamps[order]

    drops: list[tuple[int, str]] = []
    keep = np.ones(len(dates), dtype=bool)

    def drop(rows: np.ndarray, reason: str | Callable[[int], str]) -> None:
        for i in np.flatnonzero(rows & keep):
            drops.append((int(i), reason(int(i)) if callable(reason) else reason))
        keep[rows] = False

    # 2. missing prices.
    prices = np.vstack([values[c] for c in PRICE_FIELDS])
    drop(np.isnan(prices).all(axis=0), REASON_NO_PRICE)
    drop(np.isnan(values["close"]), "no close price")
    adj = values["adj_close"]
    if np.isfinite(adj[keep]).any():
        drop(np.isnan(adj), "no adjusted close (the other rows have one)")

    # 3. non-positive or infinite prices.
    for col in PRICE_FIELDS:
        v = values[col]
        bad = np.isinf(v) | (v <= 0)  # NaN compares False
        drop(bad, _not_positive(col.replace("_", " "), v))

    # 4. high below low.
    high, low = values["high"], values["low"]
    drop(
        high < low,
        lambda i: f"high {_fmt(high[i])} is below low {_fmt(low[i])}",
    )

    # 5. duplicated dates: of the rows left, keep the first (earliest timestamp).
    later = np.zeros(len(dates), dtype=bool)
    later[keep] = np.asarray(dates[keep].duplicated(keep="first"))
    drop(later, REASON_DUPLICATE)

    # 6. 100x jumps that revert (a currency's minor unit mix-up: not for indices and rates).
    warnings: list[tuple[int, str]] = []
    spikes, flagged = _jumps(values["close"], keep) if not symbol.startswith("^") else ([], [])
    for row, reason in spikes:
        drops.append((row, reason))
        keep[row] = False
    warnings.extend(flagged)

    report = QualityReport(
        symbol=symbol,
        dropped=tuple(
            sorted(
                [QualityIssue(_iso(dates[i]), r) for i, r in drops] + _limit(dropped, start, end),
                key=lambda q: q.date,
            )
        ),
        repaired=tuple(sorted(_limit(repaired, start, end), key=lambda q: q.date)),
        warnings=tuple(QualityIssue(_iso(dates[i]), r) for i, r in sorted(warnings)),
    )
    if not keep.any():
        raise EmptyDataError(_empty_message(symbol, origin, start, end, report, stamps), symbol=symbol)
    index = pd.DatetimeIndex(dates[keep], name="date")
    out = pd.DataFrame({c: values[c][keep] for c in PRICE_COLUMNS}, index=index)
    return CheckedPrices(check_price_frame(out, symbol), report)


def _not_positive(name: str, values: np.ndarray) -> Callable[[int], str]:
    def reason(i: int) -> str:
        return f"{name} is {_fmt(values[i])}: prices must be positive and finite"

    return reason


def _sortable(index: pd.Index) -> np.ndarray:
    """Sort keys of the original timestamps (UTC instants for a tz-aware index)."""
    if isinstance(index, pd.DatetimeIndex):
        if index.tz is not None:
            return np.asarray(index.tz_convert("UTC").tz_localize(None).as_unit("ns").asi8)
        return np.asarray(index.as_unit("ns").asi8)
    return np.asarray(pd.DatetimeIndex(pd.to_datetime(index)).as_unit("ns").asi8)  # type: ignore[call-overload]


def _limit(issues: Iterable[QualityIssue], start: dt.date | None, end: dt.date | None) -> list[QualityIssue]:
    lo = start.isoformat() if start is not None else ""
    hi = end.isoformat() if end is not None else "9999-12-31"
    return [i for i in issues if lo <= i.date <= hi]


def _jumps(close: np.ndarray, keep: np.ndarray) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Runs of rows that jump 100x and come back (to drop), and jumps that stay (to flag).

    Works on the rows still kept; returns row positions in the full arrays.
    """
    rows = np.flatnonzero(keep)
    if rows.size < 2:
        return [], []
    c = close[rows]
    ratio = c[1:] / c[:-1]
    jump = (ratio > JUMP_RATIO) | (ratio < 1.0 / JUMP_RATIO)
    spikes: list[tuple[int, str]] = []
    flagged: list[tuple[int, str]] = []
    n = len(c)
    free = 1  # rows before this one were dropped as part of a spike already
    for k in (np.flatnonzero(jump) + 1).tolist():  # row k jumped from row k - 1
        if k < free:
            continue
        up = bool(ratio[k - 1] > 1.0)
        back = None
        for m in range(k + 1, min(n, k + MAX_SPIKE_ROWS + 1)):
            r = ratio[m - 1]
            if (up and r < 1.0 / JUMP_RATIO) or (not up and r > JUMP_RATIO):
                back = m
                break
        if back is None:
            flagged.append(
                (
                    int(rows[k]),
                    f"close jumps {ratio[k - 1]:.3g}x from {_fmt(c[k - 1])} to {_fmt(c[k])} and does "
                    f"not come back within {MAX_SPIKE_ROWS} rows; kept (check the data, or set "
                    "source.repair = true)",
                )
            )
            continue
        times = "100x" if up else "1/100"
        for j in range(k, back):
            spikes.append(
                (
                    int(rows[j]),
                    f"close {_fmt(c[j])} is about {times} of the closes around it ({_fmt(c[k - 1])} "
                    f"before, {_fmt(c[back])} after): a unit mix-up",
                )
            )
        free = back + 1
    return spikes, flagged


def _empty_message(
    symbol: str,
    origin: str,
    start: dt.date | None,
    end: dt.date | None,
    report: QualityReport,
    all_dates: pd.DatetimeIndex,
) -> str:
    span = f" between {start} and {end}" if start is not None and end is not None else ""
    if report.dropped:
        return (
            f"{symbol}: {origin} has no prices{span} (it sent {len(report.dropped)} row(s), none "
            f"usable: {report.summary()}); widen the dates or check the symbol's data"
        )
    if len(all_dates):
        covered = f"it has prices from {all_dates.min().date()} to {all_dates.max().date()}"
    else:
        covered = "it has no prices at all"
    return f"{symbol}: {origin} has no prices{span} ({covered}; widen the dates or update the data)"


def issues_to_dicts(issues: Sequence[QualityIssue]) -> list[dict[str, str]]:
    """``[{"date": ..., "reason": ...}, ...]`` for the manifest."""
    return [i.to_dict() for i in issues]
