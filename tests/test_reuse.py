"""``quadratic_sensitivity(..., from_date=...)`` and ``fit_anchors``: what lets a daily run
keep its stored per-day rows and fit only the new days (``sensitivity.reuse``; the pipeline's
side is tested in ``test_pipeline_fit.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sensitivity.api import fit_anchors, quadratic_sensitivity
from sensitivity.errors import ConfigError
from sensitivity.model import CENTRE_ROWS
from sensitivity.returns import AlignedReturns
from sensitivity.reuse import FitInputs


def panel(t_rows: int = 900, n: int = 7, seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Stock returns with gaps, a late listing and a delisting; each stock's own index
    returns (NaN where it did not trade); a risk-free rate with a missing day."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2001-01-02", periods=t_rows)
    x = rng.normal(0.0003, 0.011, t_rows)
    y = 0.0002 + 1.1 * x[:, None] + 4.0 * x[:, None] ** 2 + rng.normal(0, 0.012, (t_rows, n))
    y[rng.random((t_rows, n)) < 0.04] = np.nan
    y[: t_rows // 2, 1] = np.nan  # listed late
    y[t_rows - 40 :, 2] = np.nan  # delisted
    cols = [f"S{i}" for i in range(n)]
    stocks = pd.DataFrame(y, index=dates, columns=cols)
    index = pd.DataFrame(np.where(np.isnan(y), np.nan, x[:, None]), index=dates, columns=cols)
    rf = pd.DataFrame(np.full((t_rows, n), 0.00012), index=dates, columns=cols)
    rf.iloc[t_rows - 100, :] = np.nan
    return stocks, index, rf


@pytest.mark.parametrize(
    "options",
    [{}, {"se": "hac"}, {"se": "hc1", "fit": "huber"}, {"risk_free": True}],
    ids=["ols", "hac", "hc1-huber", "excess"],
)
@pytest.mark.parametrize("back", [1, 3, 60, 252, 253, 400])
def test_rows_from_a_date_are_the_whole_tables_rows_to_the_bit(options: dict, back: int) -> None:
    """``from_date`` fits about two windows instead of every row; the rows it returns equal
    those of the whole table exactly (every column, NaN where NaN), at block boundaries too."""
    stocks, index, rf = panel()
    kwargs = dict(options)
    if kwargs.pop("risk_free", False):
        kwargs["risk_free"] = rf
    whole = quadratic_sensitivity(stocks, index, window=100, min_obs=40, **kwargs)
    day = stocks.index[-back]
    part = quadratic_sensitivity(stocks, index, window=100, min_obs=40, from_date=day.date(), **kwargs)
    expected = whole[pd.to_datetime(whole["date"]) >= day].reset_index(drop=True)
    assert len(part) > 0
    pd.testing.assert_frame_equal(part.reset_index(drop=True), expected, check_exact=True)


def test_from_date_needs_a_rolling_window() -> None:
    stocks, index, _ = panel(300)
    with pytest.raises(ConfigError, match="from_date needs a rolling window"):
        quadratic_sensitivity(stocks, index, window=0, min_obs=40, from_date=stocks.index[-1].date())


def test_anchors_come_from_each_tickers_first_rows_only() -> None:
    """What a stored row depends on besides its window: the anchors do not move when rows are
    appended to a ticker that has traded for CENTRE_ROWS rows, and do for a younger one."""
    stocks, index, _ = panel()
    late_start = int(np.flatnonzero(stocks["S1"].notna().to_numpy())[0])
    cut = late_start + CENTRE_ROWS // 2
    short = fit_anchors(stocks.iloc[:cut], index.iloc[:cut])
    full = fit_anchors(stocks, index)
    assert list(full.columns)[:4] == ["quadratic_cx", "quadratic_kx", "quadratic_cy", "quadratic_ky"]
    assert np.array_equal(short.loc["S0"].to_numpy(), full.loc["S0"].to_numpy())
    assert not np.array_equal(short.loc["S1"].to_numpy(), full.loc["S1"].to_numpy())


def _fit_inputs(risk_free: bool) -> FitInputs:
    stocks, index, rf = panel()
    close = (1.0 + stocks.fillna(0.0)).cumprod() * 50.0
    aligned = AlignedReturns(
        calendar=pd.DatetimeIndex(stocks.index),
        stock_returns=stocks,
        index_returns=index,
        close=close,
        prev_close=close.shift(1),
        market_returns=index.iloc[:, 0],
    )
    settings = FitInputs.settings_of(
        index="^X", window=126, min_obs=60, se="classical", hac_lags=None, fit="ols", device="cpu"
    )
    return FitInputs(aligned, rf if risk_free else None, settings)


@pytest.mark.parametrize("risk_free", [False, True], ids=["raw", "excess"])
def test_a_digest_that_goes_on_from_an_earlier_one_equals_one_from_scratch(risk_free: bool) -> None:
    """A daily run checks each stamp at its stored row, then stamps the new last row going on
    from there: the same digest as hashing everything again, for each ticker and row order."""
    fresh, reused = _fit_inputs(risk_free), _fit_inputs(risk_free)
    for inputs in (fresh, reused):
        inputs.prepare()
    tickers = list(fresh.aligned.stock_returns.columns)
    for t in tickers:
        for row in (300, 301, 899, 450, 0):  # on, on, on, back (from scratch), back to the first
            resumed = reused.digest(t, row)
            assert resumed == _fit_inputs(risk_free).digest(t, row)
    # And every row tells the inputs apart: one changed value changes every digest through it.
    stocks = fresh.aligned.stock_returns
    changed = _fit_inputs(risk_free)
    changed.aligned.stock_returns.iloc[500, 3] = stocks.iloc[500, 3] + 1e-12
    assert changed.digest("S3", 499) == fresh.digest("S3", 499)
    assert changed.digest("S3", 500) != fresh.digest("S3", 500)
    assert changed.digest("S3", 899) != fresh.digest("S3", 899)
    # The digest covers each of the other inputs too.
    assert fresh.digest("S0", 899) != fresh.digest("S4", 899)
    stamps = reused.stamps({t: fresh.aligned.calendar[899].date() for t in tickers})
    assert {t: s.digest for t, s in stamps.items()} == {t: fresh.digest(t, 899) for t in tickers}
    # The anchors are hashed too: another ticker's anchors give another digest.
    moved = _fit_inputs(risk_free)
    moved.anchors.loc["S3"] = moved.anchors.loc["S3"] * 2.0
    assert moved.digest("S3", 899) != fresh.digest("S3", 899)
    assert moved.digest("S2", 899) == fresh.digest("S2", 899)


def test_a_stamps_date_is_found_in_the_calendar_or_not_at_all() -> None:
    inputs = _fit_inputs(False)
    inputs.prepare()
    calendar = inputs.aligned.calendar
    assert [inputs.row_of(calendar[r].date()) for r in (0, 1, 450, len(calendar) - 1)] == [
        0,
        1,
        450,
        len(calendar) - 1,
    ]
    before, after = calendar[0] - pd.Timedelta(days=1), calendar[-1] + pd.Timedelta(days=30)
    gap = next(d for d in pd.date_range(calendar[0], calendar[-1]) if d not in calendar)
    assert [inputs.row_of(d.date()) for d in (before, after, gap)] == [-1, -1, -1]
