"""Invariants of the quadratic market model, checked on random panels (hypothesis).

* scaling the stock returns by ``c`` scales alpha, beta, gamma and the sensitivity by ``c``
  (standard errors by ``|c|``) and leaves R^2 alone;
* adding a constant to the stock returns moves only alpha;
* permuting the tickers permutes the output.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from sensitivity import quadratic_sensitivity

SETTINGS = settings(max_examples=20, deadline=None)

COEFFICIENTS = ["alpha", "beta", "gamma", "sensitivity", "linear_beta"]
ERRORS = ["alpha_se", "beta_se", "gamma_se", "sensitivity_se"]


@st.composite
def panels(draw: st.DrawFn) -> tuple[pd.DataFrame, pd.Series, int, int]:
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 4))
    t_rows = draw(st.integers(40, 160))
    window = draw(st.sampled_from([0, 20, 37, 60]))
    min_obs = draw(st.integers(4, 20 if window == 0 else min(window, 20)))
    gap_rate = draw(st.sampled_from([0.0, 0.1, 0.3]))
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2019-01-01", periods=t_rows)
    market = pd.Series(rng.normal(0.0005, 0.012, t_rows), index=dates)
    cols = {}
    for k in range(n):
        r = rng.normal(0, 0.001) + rng.uniform(0.2, 2.0) * market + rng.normal(0, 5) * market**2
        r = r + rng.normal(0, 0.01, t_rows)
        r[rng.random(t_rows) < gap_rate] = np.nan
        cols[f"S{k}"] = r
    return pd.DataFrame(cols, index=dates), market, window, min_obs


def se_of(frame: pd.DataFrame, col: str) -> pd.Series:
    """The standard error that sets the absolute tolerance of a column (values near 0)."""
    return (
        frame["beta_se"] if col in ("linear_beta", "sensitivity") else frame[col.removesuffix("_se") + "_se"]
    )


def close(a: pd.Series, b: pd.Series, scale: pd.Series | float, rtol: float = 1e-9) -> None:
    """``|a - b| <= rtol * max(|b|, scale)`` elementwise, and NaN in the same places."""
    x, y = a.to_numpy(), b.to_numpy()
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), x.shape)
    assert np.array_equal(np.isnan(x), np.isnan(y))
    ok = ~np.isnan(x)
    assert (np.abs(x[ok] - y[ok]) <= rtol * np.maximum(np.abs(y[ok]), s[ok])).all()


@SETTINGS
@given(panels(), st.sampled_from([-3.0, -0.5, 0.01, 2.0, 1e3]))
def test_scaling_stock_returns_scales_coefficients(panel, c):
    stocks, market, window, min_obs = panel
    base = quadratic_sensitivity(stocks, market, window=window, min_obs=min_obs)
    scaled = quadratic_sensitivity(stocks * c, market, window=window, min_obs=min_obs)
    for col in COEFFICIENTS:
        close(scaled[col], c * base[col], abs(c) * se_of(base, col))
    for col in ERRORS:
        close(scaled[col], abs(c) * base[col], 0.0)
    close(scaled["r2"], base["r2"], 1e-6)
    assert scaled["n_obs"].equals(base["n_obs"])


@SETTINGS
@given(panels(), st.sampled_from([-0.02, 0.001, 0.5]))
def test_adding_a_constant_moves_only_alpha(panel, k):
    stocks, market, window, min_obs = panel
    base = quadratic_sensitivity(stocks, market, window=window, min_obs=min_obs)
    moved = quadratic_sensitivity(stocks + k, market, window=window, min_obs=min_obs)
    close(moved["alpha"], base["alpha"] + k, base["alpha_se"] + abs(k))
    for col in ["beta", "gamma", "sensitivity", "linear_beta", *ERRORS]:
        close(moved[col], base[col], se_of(base, col), rtol=1e-8)
    close(moved["r2"], base["r2"], 1e-6, rtol=1e-8)


@SETTINGS
@given(panels(), st.randoms(use_true_random=False))
def test_permuting_tickers_permutes_the_output(panel, random):
    stocks, market, window, min_obs = panel
    order = list(stocks.columns)
    random.shuffle(order)
    base = quadratic_sensitivity(stocks, market, window=window, min_obs=min_obs)
    permuted = quadratic_sensitivity(stocks[order], market, window=window, min_obs=min_obs)
    expected = pd.concat([base[base["ticker"] == t] for t in order], ignore_index=True)
    pd.testing.assert_frame_equal(permuted, expected, check_exact=False, rtol=1e-12, atol=0)
