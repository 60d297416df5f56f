"""``quadratic_sensitivity``: the labelled boundary, the long output table, and real data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import statsmodels.api as sm
import torch

from sensitivity import api, quadratic_sensitivity
from sensitivity.api import FLOAT_COLUMNS, OUTPUT_COLUMNS, sensitivity_frame
from sensitivity.errors import ConfigError, DataValidationError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"

EXPECTED_COLUMNS = [
    "date", "ticker", "window", "n_obs", "index_return", "stock_return", "alpha", "beta", "gamma",
    "sensitivity", "sensitivity_se", "sensitivity_ci_lower", "sensitivity_ci_upper", "alpha_se",
    "beta_se", "gamma_se", "linear_beta", "r2", "se_type", "risk_free_return", "cov_alpha_beta",
    "cov_alpha_gamma", "cov_beta_gamma", "gamma_t", "gamma_p", "aic_linear", "aic_quadratic",
    "delta_aic", "secant_slope", "up_beta", "down_beta", "huber_alpha", "huber_beta", "huber_gamma",
    "huber_alpha_se", "huber_beta_se", "huber_gamma_se", "huber_cov_alpha_beta",
    "huber_cov_alpha_gamma", "huber_cov_beta_gamma", "huber_sensitivity", "huber_sensitivity_se",
]  # fmt: skip


def returns(seed: int = 0, t_rows: int = 200, tickers: tuple[str, ...] = ("MSFT", "AAPL", "KO")):
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=t_rows, name="date")
    market = pd.Series(rng.normal(0.0004, 0.01, t_rows), index=dates)
    data = {}
    for k, t in enumerate(tickers):
        r = 0.0002 + (0.8 + 0.2 * k) * market + 3.0 * market**2 + rng.normal(0, 0.01, t_rows)
        data[t] = r
    stocks = pd.DataFrame(data, index=dates)
    stocks.iloc[rng.random(t_rows) < 0.1, 0] = np.nan
    stocks.iloc[:80, 2] = np.nan  # listed late
    return stocks, market


def ols_row(x: np.ndarray, y: np.ndarray):
    ok = np.isfinite(x) & np.isfinite(y)
    return sm.OLS(y[ok], np.column_stack([np.ones(ok.sum()), x[ok], x[ok] ** 2])).fit()


def test_quadratic_sensitivity_columns_dtypes_and_order():
    stocks, market = returns()
    out = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    assert list(out.columns) == EXPECTED_COLUMNS == list(OUTPUT_COLUMNS)
    assert out["date"].dtype == np.dtype("datetime64[ns]")
    assert out["ticker"].dtype == pd.Series(["x"]).dtype  # the default str dtype
    assert out["window"].dtype == np.int64
    assert out["n_obs"].dtype == np.int64
    assert out["se_type"].dtype == pd.Series(["x"]).dtype
    assert (out["se_type"] == "classical").all()
    for c in FLOAT_COLUMNS:
        assert out[c].dtype == np.float64, c
    # Ticker in input column order (not alphabetical), then date.
    assert list(dict.fromkeys(out["ticker"])) == ["MSFT", "AAPL", "KO"]
    for _, g in out.groupby("ticker", sort=False):
        assert g["date"].is_monotonic_increasing
    assert (out["window"] == 40).all()
    assert out.index.equals(pd.RangeIndex(len(out)))


def test_quadratic_sensitivity_rows_where_both_returns_exist():
    stocks, market = returns()
    market.iloc[[5, 50]] = np.nan  # index holidays: not calendar days
    out = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    expected = stocks.notna() & market.notna().to_numpy()[:, None]
    assert len(out) == int(expected.to_numpy().sum())
    for t in stocks.columns:
        dates = out.loc[out["ticker"] == t, "date"]
        assert list(dates) == list(stocks.index[expected[t]])
    first = out.groupby("ticker", sort=False).head(1)
    assert first["beta"].isna().all()  # n_obs < min_obs: the row stays, fitted values NaN
    assert (out["n_obs"] < 20).sum() > 0
    assert out.loc[out["n_obs"] >= 20, "beta"].notna().all()
    np.testing.assert_array_equal(out["stock_return"], stocks.T.to_numpy()[expected.T.to_numpy()])


def test_quadratic_sensitivity_window_counts_index_days_not_stock_days():
    stocks, market = returns(t_rows=120)
    market.iloc[30] = np.nan
    out = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    aapl = out[out["ticker"] == "AAPL"].set_index("date")
    calendar = market.dropna().index
    day = calendar[100]
    window = calendar[61:101]  # the 40 index days up to and including `day`
    res = ols_row(market[window].to_numpy(), stocks.loc[window, "AAPL"].to_numpy())
    assert aapl.loc[day, "n_obs"] == 40
    assert aapl.loc[day, "beta"] == pytest.approx(res.params[1], rel=1e-9)
    gappy = out[out["ticker"] == "MSFT"].set_index("date")
    assert gappy.loc[day, "n_obs"] == int(stocks.loc[window, "MSFT"].notna().sum()) < 40


def test_quadratic_sensitivity_matches_statsmodels_per_window():
    stocks, market = returns(seed=4)
    out = quadratic_sensitivity(stocks, market, window=60, min_obs=30).set_index(["ticker", "date"])
    for t in stocks.columns:
        for k in (59, 100, 150, 199):
            rows = stocks.index[k - 59 : k + 1]
            day = stocks.index[k]
            if (t, day) not in out.index:
                continue
            row = out.loc[(t, day)]
            res = ols_row(market[rows].to_numpy(), stocks.loc[rows, t].to_numpy())
            if res.nobs < 30:
                assert math.isnan(row["beta"])
                continue
            for j, name in enumerate(("alpha", "beta", "gamma")):
                assert row[name] == pytest.approx(res.params[j], rel=1e-8, abs=1e-8 * res.bse[j])
                assert row[f"{name}_se"] == pytest.approx(res.bse[j], rel=1e-8)
            assert row["r2"] == pytest.approx(res.rsquared, rel=1e-8)
            x = market[day]
            assert row["sensitivity"] == pytest.approx(res.params[1] + 2 * res.params[2] * x, rel=1e-8)


def test_quadratic_sensitivity_with_per_stock_index_returns():
    stocks, market = returns(seed=5)
    rng = np.random.default_rng(9)
    aligned = pd.DataFrame({t: market + rng.normal(0, 1e-4, len(market)) for t in stocks.columns})
    aligned.iloc[3, 1] = np.nan
    out = quadratic_sensitivity(stocks, aligned, window=50, min_obs=25)
    shuffled = quadratic_sensitivity(stocks, aligned[["KO", "MSFT", "AAPL"]], window=50, min_obs=25)
    pd.testing.assert_frame_equal(out, shuffled)
    assert not ((out["ticker"] == "AAPL") & (out["date"] == stocks.index[3])).any()
    kept = out[out["ticker"] == "MSFT"].set_index("date")
    np.testing.assert_array_equal(kept["index_return"], aligned.loc[kept.index, "MSFT"])
    day = stocks.index[120]
    rows = stocks.index[71:121]
    res = ols_row(aligned.loc[rows, "AAPL"].to_numpy(), stocks.loc[rows, "AAPL"].to_numpy())
    got = out[(out["ticker"] == "AAPL") & (out["date"] == day)].iloc[0]
    assert got["gamma"] == pytest.approx(res.params[2], rel=1e-8, abs=1e-8 * res.bse[2])


def test_quadratic_sensitivity_window_zero_uses_one_fit():
    stocks, market = returns()
    out = quadratic_sensitivity(stocks, market, window=0, min_obs=30)
    assert (out["window"] == 0).all()
    for t, g in out.groupby("ticker", sort=False):
        assert g["beta"].nunique() == 1
        res = ols_row(market.to_numpy(), stocks[t].to_numpy())
        assert g["beta"].iloc[0] == pytest.approx(res.params[1], rel=1e-9)
        assert (g["n_obs"] == res.nobs).all()


def test_sensitivity_frame_is_the_same_implementation():
    stocks, market = returns()
    out = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    from_numpy = sensitivity_frame(
        stocks.to_numpy(), market.to_numpy(), dates=stocks.index, tickers=list(stocks.columns),
        window=40, min_obs=20,
    )  # fmt: skip
    pd.testing.assert_frame_equal(out, from_numpy)
    from_torch = sensitivity_frame(
        torch.from_numpy(stocks.to_numpy(copy=True)), torch.from_numpy(market.to_numpy(copy=True)),
        dates=[d.date() for d in stocks.index], tickers=tuple(stocks.columns), window=40, min_obs=20,
    )  # fmt: skip
    pd.testing.assert_frame_equal(out, from_torch)


def test_sensitivity_frame_in_ticker_groups_gives_the_same_table(monkeypatch):
    stocks, market = returns(seed=8)
    ref = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    monkeypatch.setattr(api, "_GROUP_CELLS", 2 * len(stocks))  # two tickers per group
    pd.testing.assert_frame_equal(quadratic_sensitivity(stocks, market, window=40, min_obs=20), ref)


def test_quadratic_sensitivity_sorts_unsorted_dates_and_accepts_date_like_index():
    stocks, market = returns()
    ref = quadratic_sensitivity(stocks, market, window=40, min_obs=20)
    perm = np.random.default_rng(1).permutation(len(stocks))
    shuffled = quadratic_sensitivity(stocks.iloc[perm], market.iloc[perm], window=40, min_obs=20)
    pd.testing.assert_frame_equal(ref, shuffled)
    as_text = stocks.set_axis(stocks.index.strftime("%Y-%m-%d"), axis=0)
    tz = market.set_axis(market.index.tz_localize("America/New_York"), axis=0)
    pd.testing.assert_frame_equal(ref, quadratic_sensitivity(as_text, tz, window=40, min_obs=20))


def test_quadratic_sensitivity_empty_inputs_give_an_empty_table():
    stocks, market = returns()
    out = quadratic_sensitivity(stocks.iloc[:, :0], market, window=40, min_obs=20)
    assert list(out.columns) == EXPECTED_COLUMNS
    assert len(out) == 0
    out = quadratic_sensitivity(stocks.iloc[:0], market.iloc[:0], window=40, min_obs=20)
    assert len(out) == 0
    assert out["n_obs"].dtype == np.int64


def bad(kind: str):
    stocks, market = returns(t_rows=60)
    if kind == "dup-date":
        stocks = pd.concat([stocks, stocks.iloc[[7]]])
        market = pd.concat([market, market.iloc[[7]]])
    elif kind == "date-mismatch":
        market = market.iloc[1:]
    elif kind == "inf-stock":
        stocks.iloc[10, 1] = np.inf
    elif kind == "inf-index":
        market.iloc[12] = -np.inf
    elif kind == "text-column":
        stocks["AAPL"] = stocks["AAPL"].astype(str)
    elif kind == "int-column-name":
        stocks = stocks.rename(columns={"KO": 7})
    elif kind == "dup-ticker":
        stocks.columns = ["MSFT", "AAPL", "MSFT"]
    elif kind == "not-dates":
        stocks.index = range(60)
        market.index = range(60)
    elif kind == "nat":
        idx = stocks.index.tolist()
        idx[4] = pd.NaT
        stocks.index = market.index = pd.DatetimeIndex(idx)
    elif kind == "not-frame":
        stocks = stocks.to_numpy()
    elif kind == "index-list":
        market = market.tolist()
    elif kind == "index-frame-columns":
        market = pd.DataFrame({"MSFT": market, "AAPL": market, "PEP": market})
    return stocks, market


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dup-date", r"stock_returns has the date 2021-01-13 more than once"),
        ("date-mismatch", r"same dates .* 1 date\(s\) only in stock_returns \(first 2021-01-04\)"),
        ("inf-stock", r"stock_returns has an infinite value for AAPL on 2021-01-18"),
        ("inf-index", r"index_returns has an infinite value on 2021-01-20"),
        ("text-column", r"stock_returns column 'AAPL' must hold numbers, got dtype str"),
        ("int-column-name", r"column names must be ticker strings, got 7 \(int\)"),
        ("dup-ticker", r"has the ticker 'MSFT' more than once"),
        ("not-dates", r"stock_returns index must be dates .*got int64 values"),
        ("nat", r"stock_returns index contains a missing date"),
        ("not-frame", r"stock_returns must be a pandas DataFrame .*got ndarray"),
        ("index-list", r"index_returns must be a pandas Series .*got list"),
        ("index-frame-columns", r"same ticker columns .*missing: \['KO'\], unexpected: \['PEP'\]"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_quadratic_sensitivity_rejects_bad_data(kind, message):
    stocks, market = bad(kind)
    with pytest.raises(DataValidationError, match=message):
        quadratic_sensitivity(stocks, market, window=20, min_obs=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": -5}, "window must be >= 0, got -5"),
        ({"min_obs": 3}, "min_obs must be >= 4, got 3"),
        (
            {"window": 10, "min_obs": 11},
            "min_obs must be <= window when window > 0, got min_obs=11 > window=10",
        ),
        ({"window": "252"}, "window must be an integer >= 0, got '252'"),
    ],
    ids=["negative-window", "small-min-obs", "min-obs-above-window", "text-window"],
)
def test_quadratic_sensitivity_rejects_bad_parameters(kwargs, message):
    stocks, market = returns(t_rows=30)
    with pytest.raises(ConfigError, match=message):
        quadratic_sensitivity(stocks, market, **kwargs)


def test_sensitivity_frame_rejects_inconsistent_panels():
    y = np.zeros((10, 2))
    with pytest.raises(DataValidationError, match=r"index_returns must have shape \(10,\) or \(10, 2\)"):
        sensitivity_frame(y, np.zeros(9), dates=pd.bdate_range("2020-01-01", periods=10), tickers=["A", "B"],
                          window=5, min_obs=4)  # fmt: skip
    with pytest.raises(DataValidationError, match="tickers must have 2 entries"):
        sensitivity_frame(y, np.zeros(10), dates=pd.bdate_range("2020-01-01", periods=10), tickers=["A"],
                          window=5, min_obs=4)  # fmt: skip
    with pytest.raises(DataValidationError, match="dates must be strictly increasing"):
        sensitivity_frame(y, np.zeros(10), dates=pd.bdate_range("2020-01-01", periods=10)[::-1],
                          tickers=["A", "B"], window=5, min_obs=4)  # fmt: skip
    with pytest.raises(
        DataValidationError, match=r"stock_returns must hold real numbers, got dtype torch\.bool"
    ):
        sensitivity_frame(torch.zeros(10, 2, dtype=torch.bool), np.zeros(10),
                          dates=pd.bdate_range("2020-01-01", periods=10), tickers=["A", "B"], window=5,
                          min_obs=4)  # fmt: skip
    with pytest.raises(DataValidationError, match="index_returns holds infinite values"):
        sensitivity_frame(y, np.full(10, np.inf), dates=pd.bdate_range("2020-01-01", periods=10),
                          tickers=["A", "B"], window=5, min_obs=4)  # fmt: skip


def read_adj_close(symbol: str) -> pd.Series:
    table = pq.read_table(SAMPLE / f"{symbol}.parquet", columns=["date", "adj_close"])
    frame = table.to_pandas()
    return frame.set_index(pd.DatetimeIndex(frame["date"]))["adj_close"]


@pytest.mark.skipif(
    not (SAMPLE / "AAPL.parquet").exists() or not (SAMPLE / "^GSPC.parquet").exists(),
    reason="the bundled sample data/sample/{AAPL,^GSPC}.parquet is not present",
)
def test_quadratic_sensitivity_on_bundled_sample_matches_statsmodels():
    stock_px, index_px = read_adj_close("AAPL"), read_adj_close("^GSPC")
    both = pd.concat({"AAPL": stock_px, "index": index_px}, axis=1, join="inner").dropna()
    rets = (both / both.shift(1) - 1.0).iloc[1:]
    window, min_obs = 252, 126
    out = quadratic_sensitivity(rets[["AAPL"]], rets["index"], window=window, min_obs=min_obs)
    assert len(out) == len(rets)
    assert out["n_obs"].iloc[-1] == window
    x, y = rets["index"].to_numpy(), rets["AAPL"].to_numpy()
    rows = [*range(min_obs - 1, len(rets), 50), len(rets) - 1]
    for t in rows:
        lo = max(0, t - window + 1)
        res = ols_row(x[lo : t + 1], y[lo : t + 1])
        got = out.iloc[t]
        assert got["date"] == rets.index[t]
        for j, name in enumerate(("alpha", "beta", "gamma")):
            assert got[name] == pytest.approx(res.params[j], rel=1e-8, abs=1e-8 * res.bse[j]), (t, name)
            assert got[f"{name}_se"] == pytest.approx(res.bse[j], rel=1e-8), (t, name)
        assert got["r2"] == pytest.approx(res.rsquared, rel=1e-8)
        g = np.array([0.0, 1.0, 2.0 * x[t]])
        assert got["sensitivity_se"] == pytest.approx(math.sqrt(g @ res.cov_params() @ g), rel=1e-8)
    assert 0.5 < out["beta"].median() < 2.0  # AAPL moves with the market


# ------------------------------------------------------------------------ issue 5 options


def window_slice(stocks: pd.DataFrame, k: int, window: int) -> pd.DatetimeIndex:
    return stocks.index[max(0, k - window + 1) : k + 1]


@pytest.mark.parametrize("se", ["hc1", "hac"])
def test_quadratic_sensitivity_robust_se_feeds_every_uncertainty_column(se):
    stocks, market = returns(seed=12)
    out = quadratic_sensitivity(stocks, market, window=60, min_obs=30, se=se).set_index(["ticker", "date"])
    assert (out["se_type"] == se).all()
    z = 1.959963984540054
    for t in stocks.columns:
        for k in (80, 140, 199):
            day = stocks.index[k]
            if (t, day) not in out.index:
                continue
            rows = window_slice(stocks, k, 60)
            x, y = market[rows].to_numpy(), stocks.loc[rows, t].to_numpy()
            ok = np.isfinite(x) & np.isfinite(y)
            row = out.loc[(t, day)]
            if ok.sum() < 30:
                assert math.isnan(row["beta_se"])
                continue
            design = np.column_stack([np.ones(ok.sum()), x[ok], x[ok] ** 2])
            kwds = {"maxlags": math.floor(4 * (ok.sum() / 100) ** (2 / 9))} if se == "hac" else None
            res = sm.OLS(y[ok], design).fit(cov_type=se.upper(), cov_kwds=kwds)
            cov = res.cov_params()
            for j, name in enumerate(("alpha", "beta", "gamma")):
                assert row[f"{name}_se"] == pytest.approx(res.bse[j], rel=1e-8)
            assert row["cov_alpha_beta"] == pytest.approx(cov[0, 1], rel=1e-8)
            assert row["cov_alpha_gamma"] == pytest.approx(cov[0, 2], rel=1e-8)
            assert row["cov_beta_gamma"] == pytest.approx(cov[1, 2], rel=1e-8)
            g = np.array([0.0, 1.0, 2.0 * market[day]])
            se_s = math.sqrt(g @ cov @ g)
            assert row["sensitivity_se"] == pytest.approx(se_s, rel=1e-8)
            assert row["sensitivity_ci_upper"] - row["sensitivity"] == pytest.approx(z * se_s, rel=1e-8)
            assert row["gamma_t"] == pytest.approx(res.tvalues[2], rel=1e-8)
            assert row["gamma_p"] == pytest.approx(res.pvalues[2], rel=1e-8)


def test_quadratic_sensitivity_curve_tests_up_down_betas_and_secant():
    stocks, market = returns(seed=13)
    out = quadratic_sensitivity(stocks, market, window=80, min_obs=40).set_index(["ticker", "date"])
    checked = 0
    for t in stocks.columns:
        for k in (100, 150, 199):
            day = stocks.index[k]
            if (t, day) not in out.index:
                continue
            rows = window_slice(stocks, k, 80)
            x, y = market[rows].to_numpy(), stocks.loc[rows, t].to_numpy()
            ok = np.isfinite(x) & np.isfinite(y)
            row = out.loc[(t, day)]
            if ok.sum() < 40:
                assert math.isnan(row["gamma_p"])
                continue
            quad = ols_row(x, y)
            lin = sm.OLS(y[ok], np.column_stack([np.ones(ok.sum()), x[ok]])).fit()
            assert row["gamma_t"] == pytest.approx(quad.tvalues[2], rel=1e-8)
            assert row["gamma_p"] == pytest.approx(quad.pvalues[2], rel=1e-8)
            assert row["aic_quadratic"] == pytest.approx(quad.aic, rel=1e-10)
            assert row["aic_linear"] == pytest.approx(lin.aic, rel=1e-10)
            assert row["delta_aic"] == pytest.approx(quad.aic - lin.aic, rel=1e-7, abs=1e-9)
            for side, keep in (("up_beta", x > 0), ("down_beta", x < 0)):
                sel = ok & keep
                res = sm.OLS(y[sel], np.column_stack([np.ones(sel.sum()), x[sel]])).fit()
                assert row[side] == pytest.approx(res.params[1], rel=1e-8, abs=1e-8 * res.bse[1]), side
            r_m = market[day]
            assert row["secant_slope"] == pytest.approx(row["beta"] + row["gamma"] * r_m, rel=1e-12)
            checked += 1
    assert checked >= 6


def test_quadratic_sensitivity_up_down_betas_need_enough_days_of_that_sign():
    stocks, market = returns(seed=14, t_rows=120)
    market = market.abs() + 0.001  # the index never falls
    out = quadratic_sensitivity(stocks, market, window=60, min_obs=30)
    fitted = out["beta"].notna()
    assert out.loc[fitted, "up_beta"].notna().all()
    assert out["down_beta"].isna().all()
    assert api.up_down_min_obs(126) == 31
    assert api.up_down_min_obs(8) == 4


def test_quadratic_sensitivity_on_excess_returns():
    stocks, market = returns(seed=15)
    rf = pd.Series(np.linspace(0.0001, 0.0003, len(stocks)), index=stocks.index)
    rf.iloc[30] = np.nan  # no rate that day: the day is dropped
    out = quadratic_sensitivity(stocks, market, window=50, min_obs=25, risk_free=rf)
    # The oracle: excess returns fitted directly; a per-stock index frame keeps every date on
    # the calendar (the rate-less day is an index trading day without an observation).
    index_excess = pd.DataFrame({t: market - rf for t in stocks.columns})
    excess = quadratic_sensitivity(stocks.sub(rf, axis=0), index_excess, window=50, min_obs=25)
    assert not (out["date"] == stocks.index[30]).any()
    assert len(out) == len(excess)
    for c in ("alpha", "beta", "gamma", "sensitivity", "sensitivity_se", "gamma_p", "huber_beta"):
        np.testing.assert_allclose(out[c], excess[c], rtol=1e-12, err_msg=c)
    # Up and down days are the days the index itself rose or fell (not its excess return).
    rows = stocks.index[-50:]
    x, y = (market - rf)[rows].to_numpy(), (stocks["KO"] - rf)[rows].to_numpy()
    up = np.isfinite(x) & np.isfinite(y) & (market[rows].to_numpy() > 0)
    res = sm.OLS(y[up], np.column_stack([np.ones(up.sum()), x[up]])).fit()
    assert out["up_beta"].iloc[-1] == pytest.approx(res.params[1], rel=1e-8)
    # The table keeps the raw returns and shows the risk-free return beside them.
    keep = out.set_index(["ticker", "date"])
    raw = stocks.stack().rename_axis(["date", "ticker"]).swaplevel()
    np.testing.assert_array_equal(keep["stock_return"], raw.loc[keep.index])
    np.testing.assert_array_equal(keep["risk_free_return"], rf.loc[keep.index.get_level_values("date")])
    x_excess = keep["index_return"] - keep["risk_free_return"]
    np.testing.assert_allclose(keep["sensitivity"], keep["beta"] + 2 * keep["gamma"] * x_excess, rtol=1e-10)
    plain = quadratic_sensitivity(stocks, market, window=50, min_obs=25)
    assert (plain["risk_free_return"] == 0.0).all()


def test_quadratic_sensitivity_huber_columns_latest_window_or_every_window():
    stocks, market = returns(seed=16)
    stocks.iloc[150, 0] += 0.15  # an earnings-day jump
    latest = quadratic_sensitivity(stocks, market, window=60, min_obs=30)
    every = quadratic_sensitivity(stocks, market, window=60, min_obs=30, fit="huber")
    for t in stocks.columns:
        a = latest[latest["ticker"] == t]
        b = every[every["ticker"] == t]
        assert a["huber_beta"].iloc[:-1].isna().all()  # only the latest window by default
        assert a["huber_beta"].iloc[-1] == b["huber_beta"].iloc[-1]
        assert b.loc[b["beta"].notna(), "huber_beta"].notna().all()
        rows = stocks.index[-60:]
        x, y = market[rows].to_numpy(), stocks.loc[rows, t].to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        design = np.column_stack([np.ones(ok.sum()), x[ok], x[ok] ** 2])
        res = sm.RLM(y[ok], design, M=sm.robust.norms.HuberT()).fit()
        last = a.iloc[-1]
        for j, name in enumerate(("alpha", "beta", "gamma")):
            assert last[f"huber_{name}"] == pytest.approx(res.params[j], rel=1e-8, abs=1e-8 * res.bse[j])
            assert last[f"huber_{name}_se"] == pytest.approx(res.bse[j], rel=1e-8)
        assert last["huber_cov_beta_gamma"] == pytest.approx(res.cov_params()[1, 2], rel=1e-8)
        g = np.array([0.0, 1.0, 2.0 * last["index_return"]])
        assert last["huber_sensitivity"] == pytest.approx(g @ res.params, rel=1e-8, abs=1e-8)
        assert last["huber_sensitivity_se"] == pytest.approx(math.sqrt(g @ res.cov_params() @ g), rel=1e-8)
    full = quadratic_sensitivity(stocks, market, window=0, min_obs=30)
    for _, g in full.groupby("ticker", sort=False):
        assert g["huber_beta"].notna().all()
        assert g["huber_beta"].nunique() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"se": "hc3"}, r"se must be one of 'classical', 'hc1', 'hac', got 'hc3'"),
        ({"se": "hac", "hac_lags": -1}, "hac_lags must be >= 0, got -1"),
        ({"fit": "lad"}, "fit must be one of 'ols', 'huber', got 'lad'"),
    ],
)
def test_quadratic_sensitivity_rejects_bad_inference_options(kwargs, message):
    stocks, market = returns(t_rows=60)
    with pytest.raises(ConfigError, match=message):
        quadratic_sensitivity(stocks, market, window=40, min_obs=20, **kwargs)


def test_quadratic_sensitivity_rejects_a_misaligned_risk_free_series():
    stocks, market = returns(t_rows=60)
    with pytest.raises(DataValidationError, match="risk_free must have the same dates as stock_returns"):
        quadratic_sensitivity(stocks, market, window=40, min_obs=20, risk_free=market.iloc[1:])
    with pytest.raises(DataValidationError, match="risk_free must be a pandas Series"):
        quadratic_sensitivity(stocks, market, window=40, min_obs=20, risk_free=0.01)  # type: ignore[arg-type]


@pytest.mark.parametrize("se", ["classical", "hc1", "hac"])
def test_appending_days_leaves_every_earlier_row_unchanged_to_the_bit(se):
    """A day's numbers depend only on the days up to it once a stock has traded for
    model.CENTRE_ROWS days (every stock here, at each cut): a daily run that adds a day does
    not rewrite history in its last digits.  Only the Huber columns move, by design, from the
    previous latest row to the new one."""
    stocks, market = returns(seed=21, t_rows=700)
    stocks.iloc[300:330, 1] = np.nan  # a suspension well after the first year
    full = quadratic_sensitivity(stocks, market, window=126, min_obs=60, se=se).set_index(["ticker", "date"])
    huber = [c for c in full.columns if c.startswith("huber_")]
    for end in (400, 555, 699):
        head = quadratic_sensitivity(stocks.iloc[:end], market.iloc[:end], window=126, min_obs=60, se=se)
        head = head.set_index(["ticker", "date"])
        later = full.loc[head.index]
        latest = (head.groupby(level="ticker").cumcount(ascending=False) == 0).to_numpy()  # last rows
        for name in head.columns:
            ours = head[name].to_numpy() if name not in huber else head.loc[~latest, name].to_numpy()
            theirs = later[name].to_numpy() if name not in huber else later.loc[~latest, name].to_numpy()
            if ours.dtype.kind == "f":
                assert np.array_equal(ours, theirs, equal_nan=True), (end, name)
            else:
                assert (ours == theirs).all(), (end, name)
        assert head["sensitivity"].notna().sum() > 0.8 * len(head)
