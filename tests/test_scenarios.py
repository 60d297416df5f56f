"""Scenario tables against statsmodels' prediction of the mean (``get_prediction``) and RLM."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats

from sensitivity import quadratic_sensitivity
from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.scenarios import DEFAULT_MOVES, SCENARIO_FRAME_COLUMNS, scenario_table
from sensitivity.store import SCENARIO_COLUMNS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_api import returns

RTOL = 1e-8
WINDOW, MIN_OBS = 60, 30


def summary_of(out: pd.DataFrame, closes: dict[str, float]) -> pd.DataFrame:
    """The latest row per ticker, shaped like ``reports/summary/`` (as_of, index_ticker, close)."""
    latest = out.groupby("ticker", sort=False).tail(1).reset_index(drop=True)
    latest.insert(0, "as_of", out["date"].max().date())
    latest.insert(2, "index_ticker", "^GSPC")
    latest["date"] = latest["date"].dt.date
    latest["close"] = latest["ticker"].map(closes)
    return latest


def window_of(stocks: pd.DataFrame, market: pd.Series, ticker: str, rf: pd.Series | None = None):
    rows = stocks.index[-WINDOW:]
    x = market[rows].to_numpy()
    y = stocks.loc[rows, ticker].to_numpy()
    if rf is not None:
        x, y = x - rf[rows].to_numpy(), y - rf[rows].to_numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


@pytest.mark.parametrize("se", ["classical", "hc1"])
def test_scenario_table_matches_statsmodels_prediction_of_the_mean(se):
    stocks, market = returns(seed=3)
    closes = {"MSFT": 250.0, "AAPL": 130.5, "KO": 61.25}
    out = quadratic_sensitivity(stocks, market, window=WINDOW, min_obs=MIN_OBS, se=se)
    summary = summary_of(out, closes)
    table = scenario_table(summary, DEFAULT_MOVES)
    assert list(table.columns) == list(SCENARIO_FRAME_COLUMNS) == list(SCENARIO_COLUMNS)
    assert len(table) == 3 * len(DEFAULT_MOVES)
    assert (table["fit"] == "ols").all()
    assert (table["se_type"] == se).all()
    for ticker, rows in table.groupby("ticker", sort=False):
        xs, ys = window_of(stocks, market, str(ticker))
        design = np.column_stack([np.ones(xs.size), xs, xs * xs])
        res = sm.OLS(ys, design).fit(cov_type="HC1") if se == "hc1" else sm.OLS(ys, design).fit()
        m = rows["index_move"].to_numpy()
        pred = res.get_prediction(np.column_stack([np.ones(m.size), m, m * m])).summary_frame(alpha=0.05)
        np.testing.assert_allclose(rows["predicted_return"], pred["mean"], rtol=RTOL)
        np.testing.assert_allclose(rows["predicted_return_se"], pred["mean_se"], rtol=RTOL)
        np.testing.assert_allclose(rows["predicted_return_ci_lower"], pred["mean_ci_lower"], rtol=RTOL)
        np.testing.assert_allclose(rows["predicted_return_ci_upper"], pred["mean_ci_upper"], rtol=RTOL)
        close = closes[str(ticker)]
        np.testing.assert_allclose(rows["close"], close)
        np.testing.assert_allclose(rows["price_move"], close * pred["mean"], rtol=RTOL)
        np.testing.assert_allclose(rows["price_move_ci_lower"], close * pred["mean_ci_lower"], rtol=RTOL)
        np.testing.assert_allclose(rows["price_move_ci_upper"], close * pred["mean_ci_upper"], rtol=RTOL)
        assert (rows["n_obs"] == xs.size).all()
    np.testing.assert_array_equal(table["index_move"].to_numpy()[:8], DEFAULT_MOVES)


def test_scenario_table_with_the_huber_fit_uses_its_h1_covariance_and_normal_quantiles():
    stocks, market = returns(seed=6)
    out = quadratic_sensitivity(stocks, market, window=WINDOW, min_obs=MIN_OBS, fit="huber")
    summary = summary_of(out, {"MSFT": 10.0, "AAPL": 20.0, "KO": 30.0})
    table = scenario_table(summary, (-0.03, 0.04), fit="huber")
    assert (table["fit"] == "huber").all()
    assert (table["se_type"] == "h1").all()
    z = stats.norm.ppf(0.975)
    for ticker, rows in table.groupby("ticker", sort=False):
        xs, ys = window_of(stocks, market, str(ticker))
        res = sm.RLM(ys, np.column_stack([np.ones(xs.size), xs, xs * xs]), M=sm.robust.norms.HuberT()).fit()
        m = rows["index_move"].to_numpy()
        g = np.column_stack([np.ones(m.size), m, m * m])
        mean = g @ res.params
        se = np.sqrt(np.einsum("ki,ij,kj->k", g, res.cov_params(), g))
        np.testing.assert_allclose(rows["predicted_return"], mean, rtol=RTOL, atol=1e-8 * se.max())
        np.testing.assert_allclose(rows["predicted_return_se"], se, rtol=RTOL)
        np.testing.assert_allclose(rows["predicted_return_ci_upper"], mean + z * se, rtol=1e-7)


def test_scenario_table_on_excess_returns_adds_back_the_risk_free_return():
    stocks, market = returns(seed=8)
    rf = pd.Series(0.0002, index=stocks.index)
    out = quadratic_sensitivity(stocks, market, window=WINDOW, min_obs=MIN_OBS, risk_free=rf)
    table = scenario_table(summary_of(out, {"MSFT": 1.0, "AAPL": 1.0, "KO": 1.0}), (0.05,))
    for ticker, row in table.set_index("ticker").iterrows():
        xs, ys = window_of(stocks, market, str(ticker), rf)
        res = sm.OLS(ys, np.column_stack([np.ones(xs.size), xs, xs * xs])).fit()
        u = 0.05 - 0.0002
        assert row["risk_free_return"] == 0.0002
        expected = 0.0002 + res.params @ [1.0, u, u * u]
        assert row["predicted_return"] == pytest.approx(expected, rel=RTOL)


def test_scenario_rows_without_a_fit_stay_with_nulls():
    stocks, market = returns(seed=2)
    stocks.iloc[:-10, 1] = np.nan  # AAPL: listed 10 days ago, too few returns for a fit
    out = quadratic_sensitivity(stocks, market, window=WINDOW, min_obs=MIN_OBS)
    table = scenario_table(summary_of(out, {"MSFT": 1.0, "AAPL": 2.0, "KO": 3.0}), (0.01, 0.02))
    aapl = table[table["ticker"] == "AAPL"]
    assert len(aapl) == 2
    assert aapl["predicted_return"].isna().all()
    assert aapl["price_move_ci_upper"].isna().all()
    assert table.loc[table["ticker"] != "AAPL", "predicted_return"].notna().all()


def test_scenario_table_rejects_bad_arguments():
    stocks, market = returns()
    summary = summary_of(quadratic_sensitivity(stocks, market, window=40, min_obs=20), {"MSFT": 1.0})
    with pytest.raises(ConfigError, match=r"moves must be index moves in \(-1, 1\]"):
        scenario_table(summary, (-1.0,))
    with pytest.raises(ConfigError, match="fit must be 'ols' or 'huber', got 'lad'"):
        scenario_table(summary, fit="lad")
    with pytest.raises(ConfigError, match=r"level must be in \(0, 1\), got 1.5"):
        scenario_table(summary, level=1.5)
    with pytest.raises(DataValidationError, match="summary lacks column"):
        scenario_table(summary.drop(columns=["cov_beta_gamma"]))
    assert math.isclose(scenario_table(summary, level=0.9)["level"].iloc[0], 0.9)
