"""Prices to returns, aligned stock by stock with the index (pure: no I/O).

The model's contract (SPEC, "The model"):

* the price of a day is the adjusted close, or the close where the source has no adjusted
  close at all (:func:`price_series`);
* each stock is aligned with the index on the dates **both** traded (an inner join; a date
  with a missing price counts as not traded), and only then are simple returns
  ``P_t / P_{t-1} - 1`` taken on consecutive aligned dates.  After a day the stock missed,
  its return spans the gap, and so does the index return on that row: index returns are per
  stock;
* nothing is ever filled: a missing price stays missing, and a return exists only where
  both ends of it exist.

:func:`aligned_returns` lays the result out on the index's return calendar (the index's
price dates except its first), one column per stock, NaN where a stock has no aligned
return; that is the ``[T, N]`` panel the model consumes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sensitivity.errors import DataValidationError
from sensitivity.prices import PriceArrays, date_index

__all__ = [
    "TRADING_DAYS_PER_YEAR",
    "AlignedReturns",
    "aligned_returns",
    "aligned_returns_from_arrays",
    "daily_risk_free",
    "period_risk_free",
    "price_series",
    "simple_returns",
]


def price_series(frame: pd.DataFrame, *, symbol: str = "prices") -> pd.Series:
    """The price of each date: ``adj_close``, or ``close`` where ``adj_close`` is all missing.

    When only some ``adj_close`` values are missing, those dates have no price (they are
    never filled from ``close`` or a neighbour).  The series keeps the frame's date index;
    its name is ``adj_close`` or ``close``, whichever was used.
    """
    for column in ("close", "adj_close"):
        if column not in frame.columns:
            raise DataValidationError(f"{symbol}: price frame lacks column {column}")
    adj = frame["adj_close"]
    chosen = frame["close"] if adj.isna().all() else adj
    return chosen.astype(np.float64)


def _check_dates(index: pd.Index, symbol: str) -> pd.DatetimeIndex:
    if not isinstance(index, pd.DatetimeIndex):
        raise DataValidationError(f"{symbol}: prices must be indexed by date, got {type(index).__name__}")
    if index.tz is not None:
        raise DataValidationError(f"{symbol}: price dates must be tz-naive dates, got {index.dtype}")
    if index.has_duplicates:
        raise _repeated_date(symbol, index[index.duplicated()][0].date())
    if not index.is_monotonic_increasing:
        raise _unsorted(symbol)
    return index


def _repeated_date(symbol: str, day: object) -> DataValidationError:
    return DataValidationError(f"{symbol}: date {day} appears more than once")


def _unsorted(symbol: str) -> DataValidationError:
    return DataValidationError(f"{symbol}: dates are not sorted ascending")


def _not_positive(symbol: str, value: float, day: object) -> DataValidationError:
    return DataValidationError(
        f"{symbol}: price {value!r} on {day} is not a positive number (fix or remove the row in the source)"
    )


def _check_prices(prices: pd.Series, symbol: str) -> pd.Series:
    """The non-missing prices; refuses infinite and non-positive ones (naming the date)."""
    present = prices.dropna()
    values = present.to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
    if bad.size:
        day = present.index[bad[0]]
        raise _not_positive(
            symbol, float(values[bad[0]]), day.date() if isinstance(day, pd.Timestamp) else day
        )
    return present.astype(np.float64)


def simple_returns(prices: pd.Series) -> pd.Series:
    """``P_t / P_{t-1} - 1`` on consecutive rows of ``prices`` after dropping missing prices.

    The first remaining row is NaN; nothing is filled.  The result is indexed by the dates
    that have a price.
    """
    symbol = str(prices.name) if prices.name is not None else "prices"
    if isinstance(prices.index, pd.DatetimeIndex):
        _check_dates(prices.index, symbol)
    present = _check_prices(prices, symbol)
    values = present.to_numpy(dtype=np.float64)
    out = np.full(values.shape, np.nan)
    out[1:] = values[1:] / values[:-1] - 1.0
    return pd.Series(out, index=present.index, name=prices.name)


@dataclass(frozen=True, eq=False)
class AlignedReturns:
    """Stock and index returns aligned per stock, on the index's return calendar.

    Every frame is indexed by :attr:`calendar` (the index's price dates except its first)
    with one column per ticker, in the order given:

    * ``stock_returns``: the stock's return from its previous aligned date to this one;
    * ``index_returns``: the index's return over the same span (NaN exactly where
      ``stock_returns`` is NaN);
    * ``close``: the stock's raw (unadjusted) close on every aligned date;
    * ``prev_close``: the raw close on the stock's previous aligned date (where a return
      exists), the base of the dollar sensitivity;
    * ``market_returns``: the index's own returns from one of its trading days to the next;
    * ``span_days``: how many index trading days each return spans (1, or more after days the
      stock missed; NaN where there is no return).
    """

    calendar: pd.DatetimeIndex
    stock_returns: pd.DataFrame
    index_returns: pd.DataFrame
    close: pd.DataFrame
    prev_close: pd.DataFrame
    market_returns: pd.Series
    span_days: pd.DataFrame | None = None

    @property
    def tickers(self) -> list[str]:
        """The tickers, in column order."""
        return [str(c) for c in self.stock_returns.columns]

    @property
    def n_returns(self) -> pd.Series:
        """How many aligned returns each ticker has."""
        return self.stock_returns.notna().sum().astype(np.int64)


def aligned_returns(
    index_frame: pd.DataFrame,
    stock_frames: Mapping[str, pd.DataFrame],
    *,
    index_symbol: str = "index",
) -> AlignedReturns:
    """Align every stock with the index (inner join on dates both traded) and take returns.

    ``index_frame`` and each of ``stock_frames`` are price frames (see
    :mod:`sensitivity.prices`); prices come from :func:`price_series`.  A stock's dates on
    which the index did not trade are dropped; the index's dates on which the stock did not
    trade are NaN for that stock, and the stock's next return (and the index return on that
    row) spans the gap.  ``index_symbol`` names the index in error messages.
    """
    _check_dates(index_frame.index, index_symbol)
    index_prices = _check_prices(price_series(index_frame, symbol=index_symbol), index_symbol)
    dates = pd.DatetimeIndex(index_prices.index, name="date")

    def placed() -> Iterator[_Placed]:
        for ticker, frame in stock_frames.items():
            _check_dates(frame.index, str(ticker))
            prices = _check_prices(price_series(frame, symbol=str(ticker)), str(ticker))
            yield _Placed(
                dates.get_indexer(prices.index),
                prices.to_numpy(dtype=np.float64),
                dates.get_indexer(frame.index),
                frame["close"].to_numpy(dtype=np.float64),
            )

    return _aligned(
        dates, index_prices.to_numpy(dtype=np.float64), [str(t) for t in stock_frames], placed(), index_symbol
    )


def aligned_returns_from_arrays(
    index: PriceArrays,
    stocks: Mapping[str, PriceArrays],
    *,
    index_symbol: str = "index",
) -> AlignedReturns:
    """:func:`aligned_returns` of prices held as :class:`~sensitivity.prices.PriceArrays`
    (``close`` and ``adj_close`` each): the same checks, messages and results, to the bit,
    without a pandas frame per stock (what the fit reads a universe with)."""
    index_days, index_prices = _array_prices(index, index_symbol)
    dates = date_index(index_days)

    def placed() -> Iterator[_Placed]:
        for ticker, arrays in stocks.items():
            days, prices = _array_prices(arrays, str(ticker))
            yield _Placed(
                _positions(index_days, days),
                prices,
                _positions(index_days, arrays.days),
                arrays.columns["close"],
            )

    return _aligned(dates, index_prices, [str(t) for t in stocks], placed(), index_symbol)


@dataclass(frozen=True, eq=False)
class _Placed:
    """One stock's prices as rows of the index's dates (-1: a date the index lacks)."""

    price_rows: np.ndarray
    prices: np.ndarray
    close_rows: np.ndarray
    close: np.ndarray


_EPOCH = dt.date(1970, 1, 1)


def _day(days: np.ndarray, i: int) -> dt.date:
    """Entry ``i`` of ``days`` (days since 1970-01-01) as a date."""
    return _EPOCH + dt.timedelta(days=int(days[i]))


def _array_prices(arrays: PriceArrays, symbol: str) -> tuple[np.ndarray, np.ndarray]:
    """The days with a price and the prices (:func:`price_series` and :func:`_check_prices`
    on arrays), after the checks of :func:`_check_dates`."""
    for column in ("close", "adj_close"):
        if column not in arrays.columns:
            raise DataValidationError(f"{symbol}: price frame lacks column {column}")
    days = arrays.days
    if days.size > 1 and not bool(np.all(days[1:] > days[:-1])):
        repeated = np.flatnonzero(pd.Index(days).duplicated())
        if repeated.size:
            raise _repeated_date(symbol, _day(days, int(repeated[0])))
        raise _unsorted(symbol)
    adj = arrays.columns["adj_close"]
    chosen = arrays.columns["close"] if bool(np.isnan(adj).all()) else adj
    present = ~np.isnan(chosen)
    values, on = chosen[present], days[present]
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
    if bad.size:
        raise _not_positive(symbol, float(values[bad[0]]), _day(on, int(bad[0])))
    return on, values


def _positions(calendar: np.ndarray, days: np.ndarray) -> np.ndarray:
    """The row of each of ``days`` in the sorted ``calendar``, -1 where it is not there."""
    at = np.searchsorted(calendar, days)
    inside = at < calendar.size
    found = np.zeros(days.shape, dtype=bool)
    found[inside] = calendar[at[inside]] == days[inside]
    return np.where(found, at, -1)


def _aligned(
    dates: pd.DatetimeIndex, idx: np.ndarray, tickers: list[str], placed: Iterable[_Placed], index_symbol: str
) -> AlignedReturns:
    """The aligned returns of stocks placed on the index's price dates (``idx``: its prices).

    ``placed`` yields one stock at a time, in ``tickers`` order, each written into the panel
    before the next is made (a list of them would hold the universe twice over)."""
    calendar = pd.DatetimeIndex(dates[1:], name="date")
    n_dates, n_stocks = len(dates), len(tickers)
    stock = np.full((n_dates, n_stocks), np.nan)
    raw_close = np.full((n_dates, n_stocks), np.nan)
    for j, p in enumerate(placed):
        on = p.price_rows >= 0
        stock[p.price_rows[on], j] = p.prices[on]
        on = p.close_rows >= 0
        raw_close[p.close_rows[on], j] = p.close[on]

    # Every [dates, stocks] array below is written in place where it can be: at universe
    # scale each one is tens of MB, and fresh memory costs more than the arithmetic on it.
    traded = ~np.isnan(stock)  # the index trades on every one of `dates`
    rows = np.arange(n_dates)[:, None]
    # Row of each stock's previous aligned date, strictly before the current row (-1: none).
    prev = np.where(traded, rows, -1)
    np.maximum.accumulate(prev, axis=0, out=prev)  # the last aligned row at or before each row
    prev[1:] = prev[:-1].copy()
    prev[:1] = -1
    has_return = traded & (prev >= 0)
    no_return = ~has_return
    prev[no_return] = 0  # a valid row to gather from; the result is masked there

    with np.errstate(invalid="ignore", divide="ignore"):
        r_stock = np.take_along_axis(stock, prev, axis=0)
        np.divide(stock, r_stock, out=r_stock)
        r_stock -= 1.0
        r_stock[no_return] = np.nan
        r_index = idx[prev]
        np.divide(idx[:, None], r_index, out=r_index)
        r_index -= 1.0
        r_index[no_return] = np.nan
    prev_close = np.take_along_axis(raw_close, prev, axis=0)
    prev_close[no_return] = np.nan
    close = raw_close
    close[~traded] = np.nan
    span = np.subtract(rows, prev, dtype=np.float64)
    span[no_return] = np.nan

    market = np.full(n_dates, np.nan)
    market[1:] = idx[1:] / idx[:-1] - 1.0

    def panel(values: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(values[1:], index=calendar, columns=pd.Index(tickers), copy=False)

    return AlignedReturns(
        calendar=calendar,
        stock_returns=panel(r_stock),
        index_returns=panel(r_index),
        close=panel(close),
        prev_close=panel(prev_close),
        market_returns=pd.Series(market[1:], index=calendar, name=index_symbol),
        span_days=panel(span),
    )


#: Trading days per year of the daily risk-free conversion.
TRADING_DAYS_PER_YEAR: int = 252


def daily_risk_free(annual_rate: pd.Series | float, calendar: pd.DatetimeIndex) -> pd.Series:
    """The risk-free return of one trading day on each date of ``calendar``.

    ``annual_rate`` is a constant annual rate as a decimal fraction (0.04 = 4%) or a series of
    annual rates **in percent** (as Yahoo quotes ``^IRX``), indexed by date.  The daily return
    is ``(1 + r)**(1/252) - 1`` (compounding), with ``r`` the decimal rate quoted on that date;
    a date without a quote is NaN (never filled from a neighbour).
    """
    if isinstance(annual_rate, pd.Series):
        _check_dates(pd.DatetimeIndex(annual_rate.index), str(annual_rate.name or "risk-free rate"))
        decimal = annual_rate.reindex(calendar).to_numpy(dtype=np.float64) / 100.0
    else:
        decimal = np.full(len(calendar), float(annual_rate))
    with np.errstate(invalid="ignore"):
        bad = decimal <= -1.0
        if bad.any():
            raise DataValidationError(
                f"risk-free rate of {float(decimal[bad][0]) * 100!r}% on "
                f"{calendar[np.flatnonzero(bad)[0]].date()} is not above -100%"
            )
        daily = np.expm1(np.log1p(decimal) / TRADING_DAYS_PER_YEAR)
    return pd.Series(daily, index=calendar, name="risk_free")


def period_risk_free(aligned: AlignedReturns, daily: pd.Series) -> pd.DataFrame:
    """The risk-free return over each aligned return's period, per stock.

    ``daily`` holds one trading day's risk-free return per date of ``aligned.calendar``
    (:func:`daily_risk_free`).  A return spanning ``k`` index trading days (after days the
    stock missed) compounds the ``k`` daily returns; if any of them is missing the result is
    NaN (the day has no excess return and is dropped from the fit).  NaN where the stock has
    no return.
    """
    if aligned.span_days is None:
        raise DataValidationError("aligned returns carry no span_days; build them with aligned_returns()")
    values = daily.reindex(aligned.calendar).to_numpy(dtype=np.float64)
    missing = ~np.isfinite(values)
    growth = np.concatenate(([0.0], np.cumsum(np.log1p(np.where(missing, 0.0, values)))))
    holes = np.concatenate(([0], np.cumsum(missing)))
    span = aligned.span_days.to_numpy(dtype=np.float64)
    ok = np.isfinite(span)
    k = np.where(ok, span, 0).astype(np.int64)
    end = np.arange(1, len(values) + 1)[:, None]
    start = np.maximum(end - k, 0)
    out = np.expm1(growth[end] - growth[start])
    out = np.where(ok & (holes[end] - holes[start] == 0), out, np.nan)
    return pd.DataFrame(out, index=aligned.calendar, columns=aligned.stock_returns.columns)
