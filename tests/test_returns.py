"""Returns and alignment: hand-computed cases and the no-filling property (SPEC, "The model")."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity.errors import DataValidationError
from sensitivity.prices import PRICE_COLUMNS, PriceArrays
from sensitivity.returns import (
    AlignedReturns,
    aligned_returns,
    aligned_returns_from_arrays,
    price_series,
    simple_returns,
)

NAN = np.nan
DAYS = pd.bdate_range("2021-01-04", periods=8, name="date")  # Mon 4 .. Wed 13 Jan 2021


def frame(
    dates: pd.DatetimeIndex | list[str],
    adj: list[float] | None,
    close: list[float] | None = None,
) -> pd.DataFrame:
    """A price frame; ``adj=None`` means the source has no adjusted close."""
    index = pd.DatetimeIndex(pd.to_datetime(list(dates)), name="date")
    n = len(index)
    close_values = np.asarray(close if close is not None else (adj if adj is not None else [1.0] * n), float)
    data = {c: np.full(n, NAN) for c in PRICE_COLUMNS}
    data["close"] = close_values
    data["open"] = data["high"] = data["low"] = close_values
    data["adj_close"] = np.asarray(adj, float) if adj is not None else np.full(n, NAN)
    data["volume"] = np.full(n, 1000.0)
    return pd.DataFrame(data, index=index)


def ts(day: str) -> pd.Timestamp:
    return pd.Timestamp(day)


# ------------------------------------------------------------------------------ price_series


def test_price_series_uses_adjusted_close() -> None:
    f = frame(DAYS[:3], adj=[1.0, 2.0, 3.0], close=[10.0, 20.0, 30.0])
    assert price_series(f).tolist() == [1.0, 2.0, 3.0]


def test_price_series_falls_back_to_close_when_adj_close_is_all_missing() -> None:
    f = frame(DAYS[:3], adj=None, close=[10.0, 20.0, 30.0])
    assert price_series(f).tolist() == [10.0, 20.0, 30.0]


def test_price_series_never_fills_a_partially_missing_adj_close() -> None:
    f = frame(DAYS[:3], adj=[1.0, NAN, 3.0], close=[10.0, 20.0, 30.0])
    s = price_series(f)
    assert s.iloc[0] == 1.0
    assert np.isnan(s.iloc[1])
    assert s.iloc[2] == 3.0


def test_price_series_refuses_a_frame_without_prices() -> None:
    with pytest.raises(DataValidationError, match="AAPL: price frame lacks column adj_close"):
        price_series(pd.DataFrame({"close": [1.0]}), symbol="AAPL")


# ------------------------------------------------------------------------------ simple_returns


def test_simple_returns_are_consecutive_ratios_minus_one() -> None:
    p = pd.Series([100.0, 110.0, 99.0], index=DAYS[:3])
    r = simple_returns(p)
    assert np.isnan(r.iloc[0])
    assert r.iloc[1] == 110.0 / 100.0 - 1
    assert r.iloc[2] == 99.0 / 110.0 - 1
    assert r.dtype == np.float64


def test_simple_returns_drop_missing_prices_and_never_fill() -> None:
    p = pd.Series([100.0, NAN, 121.0, 110.0], index=DAYS[:4])
    r = simple_returns(p)
    assert list(r.index) == [DAYS[0], DAYS[2], DAYS[3]]  # the missing day has no row at all
    assert np.isnan(r.iloc[0])
    assert r.iloc[1] == 121.0 / 100.0 - 1  # spans the gap
    assert r.notna().sum() == 2


def test_simple_returns_of_one_price_is_one_nan() -> None:
    r = simple_returns(pd.Series([5.0], index=DAYS[:1]))
    assert len(r) == 1
    assert np.isnan(r.iloc[0])


@pytest.mark.parametrize(
    ("value", "message"),
    [(0.0, "price 0.0 on 2021-01-05"), (-1.0, "price -1.0 on 2021-01-05"), (np.inf, "price inf")],
    ids=["zero", "negative", "infinite"],
)
def test_simple_returns_refuse_impossible_prices(value: float, message: str) -> None:
    p = pd.Series([1.0, value, 2.0], index=DAYS[:3], name="XOM")
    with pytest.raises(DataValidationError, match=f"XOM: {message}"):
        simple_returns(p)


def test_simple_returns_refuse_unsorted_dates() -> None:
    p = pd.Series([1.0, 2.0], index=pd.DatetimeIndex([DAYS[1], DAYS[0]]), name="KO")
    with pytest.raises(DataValidationError, match="KO: dates are not sorted ascending"):
        simple_returns(p)


# ------------------------------------------------------------------------------ aligned_returns

INDEX = frame(DAYS[:6], adj=[100.0, 101.0, 103.0, 102.0, 104.0, 105.0])


def test_aligned_returns_calendar_is_the_index_dates_but_the_first() -> None:
    out = aligned_returns(INDEX, {})
    assert isinstance(out, AlignedReturns)
    assert list(out.calendar) == list(DAYS[1:6])
    assert out.stock_returns.shape == (5, 0)
    i = INDEX["adj_close"].to_numpy()
    np.testing.assert_array_equal(out.market_returns.to_numpy(), i[1:] / i[:-1] - 1)


def test_aligned_returns_full_overlap_matches_plain_returns() -> None:
    stock = frame(DAYS[:6], adj=[10.0, 11.0, 10.5, 10.0, 12.0, 12.5], close=[20, 22, 21, 20, 24, 25])
    out = aligned_returns(INDEX, {"AAA": stock})
    s = stock["adj_close"].to_numpy()
    i = INDEX["adj_close"].to_numpy()
    np.testing.assert_array_equal(out.stock_returns["AAA"].to_numpy(), s[1:] / s[:-1] - 1)
    np.testing.assert_array_equal(out.index_returns["AAA"].to_numpy(), i[1:] / i[:-1] - 1)
    np.testing.assert_array_equal(out.close["AAA"].to_numpy(), [22, 21, 20, 24, 25])
    np.testing.assert_array_equal(out.prev_close["AAA"].to_numpy(), [20, 22, 21, 20, 24])


def test_aligned_returns_gap_spans_the_missed_day_for_stock_and_index() -> None:
    # The stock did not trade on day 2: its day-3 return and the index return on that row both
    # run from day 1 to day 3; day 2 is missing for the stock (never 0, never carried).
    stock = frame([DAYS[0], DAYS[1], DAYS[3], DAYS[4], DAYS[5]], adj=[10.0, 11.0, 12.0, 12.5, 13.0])
    out = aligned_returns(INDEX, {"GAP": stock})
    r, m = out.stock_returns["GAP"], out.index_returns["GAP"]
    assert r[ts("2021-01-05")] == 11.0 / 10.0 - 1
    assert np.isnan(r[ts("2021-01-06")])
    assert np.isnan(m[ts("2021-01-06")])
    assert r[ts("2021-01-07")] == 12.0 / 11.0 - 1
    assert m[ts("2021-01-07")] == 102.0 / 101.0 - 1
    assert out.prev_close["GAP"][ts("2021-01-07")] == 11.0
    # The index's own return on that day is still the one-day return.
    assert out.market_returns[ts("2021-01-07")] == 102.0 / 103.0 - 1


def test_aligned_returns_late_listing_starts_after_its_first_aligned_day() -> None:
    stock = frame(DAYS[3:6], adj=[50.0, 55.0, 60.0])
    out = aligned_returns(INDEX, {"NEW": stock})
    r = out.stock_returns["NEW"]
    assert r.iloc[:3].isna().all()  # days 1..3: day 3 is the first aligned day, no return
    assert r[ts("2021-01-08")] == 55.0 / 50.0 - 1
    assert out.index_returns["NEW"][ts("2021-01-08")] == 104.0 / 102.0 - 1
    assert out.close["NEW"][ts("2021-01-07")] == 50.0  # traded, aligned, no return yet
    assert np.isnan(out.prev_close["NEW"][ts("2021-01-07")])


def test_aligned_returns_delisting_leaves_later_days_missing() -> None:
    stock = frame(DAYS[:3], adj=[10.0, 9.0, 8.0])
    out = aligned_returns(INDEX, {"OLD": stock})
    r = out.stock_returns["OLD"]
    assert r.notna().tolist() == [True, True, False, False, False]
    assert out.index_returns["OLD"].notna().tolist() == [True, True, False, False, False]


def test_aligned_returns_drop_stock_only_days() -> None:
    # The stock trades on a Saturday the index did not; that price is ignored and the
    # Monday return runs from Friday.
    idx = frame(["2021-01-07", "2021-01-08", "2021-01-11"], adj=[100.0, 101.0, 102.0])
    stock = frame(["2021-01-07", "2021-01-08", "2021-01-09", "2021-01-11"], adj=[10.0, 11.0, 50.0, 12.0])
    out = aligned_returns(idx, {"SAT": stock})
    assert list(out.calendar) == [ts("2021-01-08"), ts("2021-01-11")]
    assert out.stock_returns["SAT"][ts("2021-01-11")] == 12.0 / 11.0 - 1
    assert out.index_returns["SAT"][ts("2021-01-11")] == 102.0 / 101.0 - 1


def test_aligned_returns_index_only_days_are_gaps() -> None:
    stock = frame([DAYS[0], DAYS[2], DAYS[4]], adj=[10.0, 12.0, 15.0])
    out = aligned_returns(INDEX, {"SPARSE": stock})
    r, m = out.stock_returns["SPARSE"], out.index_returns["SPARSE"]
    assert r.notna().sum() == 2
    assert r[ts("2021-01-06")] == 12.0 / 10.0 - 1
    assert m[ts("2021-01-06")] == 103.0 / 100.0 - 1
    assert r[ts("2021-01-08")] == 15.0 / 12.0 - 1
    assert m[ts("2021-01-08")] == 104.0 / 103.0 - 1


def test_aligned_returns_nan_price_counts_as_not_traded() -> None:
    # adj_close is missing on day 2 although close exists: the day is not traded.
    stock = frame(DAYS[:4], adj=[10.0, 11.0, NAN, 12.0], close=[20.0, 22.0, 23.0, 24.0])
    out = aligned_returns(INDEX, {"HOLE": stock})
    r = out.stock_returns["HOLE"]
    assert np.isnan(r[ts("2021-01-06")])
    assert r[ts("2021-01-07")] == 12.0 / 11.0 - 1
    assert out.index_returns["HOLE"][ts("2021-01-07")] == 102.0 / 101.0 - 1
    assert np.isnan(out.close["HOLE"][ts("2021-01-06")])
    assert out.prev_close["HOLE"][ts("2021-01-07")] == 22.0


def test_aligned_returns_nan_index_price_removes_the_day_from_the_calendar() -> None:
    idx = frame(DAYS[:4], adj=[100.0, NAN, 102.0, 103.0])
    stock = frame(DAYS[:4], adj=[10.0, 11.0, 12.0, 13.0])
    out = aligned_returns(idx, {"AAA": stock})
    assert list(out.calendar) == [DAYS[2], DAYS[3]]
    assert out.stock_returns["AAA"][DAYS[2]] == 12.0 / 10.0 - 1
    assert out.index_returns["AAA"][DAYS[2]] == 102.0 / 100.0 - 1
    assert out.market_returns[DAYS[2]] == 102.0 / 100.0 - 1


def test_aligned_returns_without_adj_close_use_close() -> None:
    etf = frame(DAYS[:3], adj=None, close=[40.0, 44.0, 42.0])
    out = aligned_returns(INDEX, {"ETF": etf})
    assert out.stock_returns["ETF"].iloc[:2].tolist() == [44.0 / 40.0 - 1, 42.0 / 44.0 - 1]


def test_aligned_returns_keep_the_given_ticker_order() -> None:
    stocks = {t: frame(DAYS[:6], adj=[1.0, 2, 3, 4, 5, 6]) for t in ["ZZZ", "AAA", "MMM"]}
    out = aligned_returns(INDEX, stocks)
    for panel in (out.stock_returns, out.index_returns, out.close, out.prev_close):
        assert list(panel.columns) == ["ZZZ", "AAA", "MMM"]
        assert list(panel.index) == list(out.calendar)
    assert out.tickers == ["ZZZ", "AAA", "MMM"]
    assert out.n_returns.tolist() == [5, 5, 5]


def test_aligned_returns_with_no_overlap_are_all_missing() -> None:
    stock = frame(pd.bdate_range("2022-01-03", periods=3), adj=[1.0, 2.0, 3.0])
    out = aligned_returns(INDEX, {"ELSE": stock})
    assert out.stock_returns["ELSE"].isna().all()
    assert out.index_returns["ELSE"].isna().all()


def test_aligned_returns_name_the_ticker_with_bad_dates() -> None:
    dup = frame([DAYS[0], DAYS[0]], adj=[1.0, 2.0])
    with pytest.raises(DataValidationError, match="DUP: date 2021-01-04 appears more than once"):
        aligned_returns(INDEX, {"DUP": dup})
    with pytest.raises(DataValidationError, match=r"\^GSPC: dates are not sorted"):
        aligned_returns(INDEX.iloc[::-1], {}, index_symbol="^GSPC")


def test_aligned_returns_refuse_non_positive_prices() -> None:
    bad = frame(DAYS[:3], adj=[1.0, -2.0, 3.0])
    with pytest.raises(DataValidationError, match=r"BAD: price -2\.0 on 2021-01-05"):
        aligned_returns(INDEX, {"BAD": bad})


# ------------------------------------------------------------------------------ property


@st.composite
def panels(draw: st.DrawFn) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    n_days = draw(st.integers(min_value=1, max_value=25))
    days = pd.bdate_range("2020-01-01", periods=n_days + 5, name="date")
    prices = st.floats(min_value=0.5, max_value=500.0, allow_nan=False)
    index_mask = draw(st.lists(st.booleans(), min_size=len(days), max_size=len(days)))
    idx_days = days[np.asarray(index_mask)]
    idx = frame(idx_days, adj=draw(st.lists(prices, min_size=len(idx_days), max_size=len(idx_days))))
    stocks: dict[str, pd.DataFrame] = {}
    for k in range(draw(st.integers(min_value=0, max_value=4))):
        mask = draw(st.lists(st.booleans(), min_size=len(days), max_size=len(days)))
        sdays = days[np.asarray(mask)]
        adj = draw(st.lists(st.one_of(prices, st.just(NAN)), min_size=len(sdays), max_size=len(sdays)))
        if adj and all(np.isnan(adj)):
            adj[0] = 1.0  # keep the adjusted close "present" so NaNs mean "not traded"
        stocks[f"S{k}"] = frame(sdays, adj=adj)
    return idx, stocks


@given(panels())
@settings(max_examples=150, deadline=None)
def test_aligned_returns_never_fill_a_value(case: tuple[pd.DataFrame, dict[str, pd.DataFrame]]) -> None:
    idx, stocks = case
    out = aligned_returns(idx, stocks)
    idx_p = idx["adj_close"].dropna()
    for ticker, f in stocks.items():
        s = f["adj_close"].dropna()
        common = idx_p.index.intersection(s.index)
        r, m = out.stock_returns[ticker], out.index_returns[ticker]
        # One return per aligned date but the first: nothing is invented or filled.
        assert int(r.notna().sum()) == max(len(common) - 1, 0)
        np.testing.assert_array_equal(r.isna().to_numpy(), m.isna().to_numpy())
        # Each return is the plain ratio between consecutive aligned dates.
        for prev, cur in itertools.pairwise(common):
            assert r[cur] == s[cur] / s[prev] - 1
            assert m[cur] == idx_p[cur] / idx_p[prev] - 1
            assert out.prev_close[ticker][cur] == f["close"][prev]
        assert set(r.dropna().index) == set(common[1:])


def as_arrays(f: pd.DataFrame) -> PriceArrays:
    """The close and adjusted close of a price frame as the store's fit reads them."""
    days = f.index.to_numpy(dtype="datetime64[D]").astype(np.int64)
    return PriceArrays(days, {c: f[c].to_numpy(dtype=np.float64) for c in ("close", "adj_close")})


def assert_same_alignment(a: AlignedReturns, b: AlignedReturns) -> None:
    """Same calendar, tickers and values, to the bit (NaN where NaN)."""
    assert a.calendar.equals(b.calendar)
    assert a.calendar.dtype == b.calendar.dtype
    for name in ("stock_returns", "index_returns", "close", "prev_close", "span_days"):
        x, y = getattr(a, name), getattr(b, name)
        assert list(x.columns) == list(y.columns), name
        assert x.index.equals(y.index), name
        assert np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True), name
    assert np.array_equal(a.market_returns.to_numpy(), b.market_returns.to_numpy(), equal_nan=True)


@given(panels())
@settings(max_examples=150, deadline=None)
def test_aligned_returns_from_arrays_equal_those_from_frames(
    case: tuple[pd.DataFrame, dict[str, pd.DataFrame]],
) -> None:
    idx, stocks = case
    idx = idx.set_axis(idx.index.as_unit("ns"))  # as the store's frames (an empty list infers "s")
    stocks = {
        **stocks,
        "NOADJ": frame(idx.index[::2], adj=None, close=list(np.arange(1.0, 1.0 + len(idx.index[::2])))),
    }
    from_frames = aligned_returns(idx, stocks, index_symbol="^IDX")
    from_arrays = aligned_returns_from_arrays(
        as_arrays(idx), {t: as_arrays(f) for t, f in stocks.items()}, index_symbol="^IDX"
    )
    assert_same_alignment(from_frames, from_arrays)


@pytest.mark.parametrize(
    ("stock", "message"),
    [
        (
            frame([DAYS[0], DAYS[1], DAYS[1]], adj=[1.0, 2.0, 3.0]),
            "DUP: date 2021-01-05 appears more than once",
        ),
        (frame([DAYS[2], DAYS[0], DAYS[1]], adj=[1.0, 2.0, 3.0]), "DUP: dates are not sorted ascending"),
        (frame(DAYS[:3], adj=[1.0, -2.0, 3.0]), r"DUP: price -2\.0 on 2021-01-05 is not a positive number"),
        (frame(DAYS[:3], adj=[1.0, np.inf, 3.0]), r"DUP: price inf on 2021-01-05 is not a positive number"),
    ],
    ids=["duplicate", "unsorted", "negative", "infinite"],
)
def test_aligned_returns_from_arrays_refuse_what_frames_refuse(stock: pd.DataFrame, message: str) -> None:
    with pytest.raises(DataValidationError, match=message):
        aligned_returns(INDEX, {"DUP": stock})
    with pytest.raises(DataValidationError, match=message):
        aligned_returns_from_arrays(as_arrays(INDEX), {"DUP": as_arrays(stock)})


# ------------------------------------------------------------------------ risk-free returns


def test_daily_risk_free_from_a_constant_and_from_a_percent_series():
    from sensitivity.returns import daily_risk_free

    cal = pd.DatetimeIndex(DAYS[1:], name="date")
    const = daily_risk_free(0.05, cal)
    np.testing.assert_allclose(const, (1.05) ** (1 / 252) - 1, rtol=1e-12)
    quotes = pd.Series([5.0, 4.0, NAN, 3.0], index=DAYS[[1, 2, 3, 5]])  # percent per year
    daily = daily_risk_free(quotes, cal)
    expected = [1.05 ** (1 / 252) - 1, 1.04 ** (1 / 252) - 1, NAN, NAN, 1.03 ** (1 / 252) - 1, NAN, NAN]
    np.testing.assert_allclose(daily.to_numpy(), expected, rtol=1e-12)  # missing quotes stay missing
    with pytest.raises(DataValidationError, match=r"risk-free rate of -150\.0% on 2021-01-05"):
        daily_risk_free(pd.Series([-150.0], index=DAYS[[1]]), cal)


def test_period_risk_free_compounds_over_the_days_a_return_spans():
    from sensitivity.returns import period_risk_free

    index = frame(DAYS, [100, 101, 102, 103, 104, 105, 106, 107])
    # The stock misses Jan 6 and 7: its return on Jan 8 spans three index days.
    stock = frame(DAYS[[0, 1, 4, 5, 6, 7]], [10, 11, 12, 13, 14, 15])
    aligned = aligned_returns(index, {"S": stock})
    assert aligned.span_days is not None
    np.testing.assert_array_equal(aligned.span_days["S"].to_numpy(), [1, NAN, NAN, 3, 1, 1, 1])
    daily = pd.Series([0.001, 0.002, 0.003, 0.004, NAN, 0.006, 0.007], index=aligned.calendar)
    rf = period_risk_free(aligned, daily)["S"].to_numpy()
    assert rf[0] == pytest.approx(0.001, rel=1e-14)
    assert rf[3] == pytest.approx(1.002 * 1.003 * 1.004 - 1, rel=1e-14)
    assert np.isnan(rf[1])  # no return on those days
    assert np.isnan(rf[2])
    assert np.isnan(rf[4])  # no rate that day: no excess return (never filled)
    assert rf[6] == pytest.approx(0.007, rel=1e-14)
