"""A universe of 3,000 tickers fitted at once matches per-ticker statsmodels fits to 1e-9.

The universe looks like a real one after alignment: ten years of an index calendar, stocks that
list late, stocks that delist, suspensions and scattered missing days, and -- as the pipeline
aligns each stock with the index on the days both traded -- per-stock index returns that span
each stock's gaps.  The whole ``[T, 3000]`` panel goes through the batched kernels in one call;
a sample of 20 tickers of every kind is then refitted window by window with statsmodels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from sensitivity.model import quadratic_fit
from sensitivity.sensitivity import daily_sensitivity

TICKERS = 3000
DAYS = 2520
WINDOW = 252
MIN_OBS = 126
RTOL = 1e-9

#: Kinds of ticker, by column number modulo 10.
KINDS = {0: "listed late", 1: "delisted", 2: "suspended", 3: "listed late and delisted"}


def aligned_universe(seed: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Per-stock aligned index returns and stock returns ``[DAYS, TICKERS]`` (NaN: no return).

    Prices are simulated on the index's calendar; a stock's return (and the index return on the
    same row) spans the days since it last traded, as :func:`sensitivity.returns.aligned_returns`
    lays them out.
    """
    rng = np.random.default_rng(seed)
    days = DAYS + 1  # prices; the first day has no return
    market = rng.standard_t(4, days) * 0.009 + 0.0003
    market[0] = 0.0
    index = 1000.0 * np.cumprod(1.0 + market)
    beta = rng.uniform(0.3, 1.8, TICKERS)
    gamma = rng.normal(0.0, 4.0, TICKERS)
    noise = rng.standard_t(5, (days, TICKERS)) * 0.012
    stock_ret = 0.0002 + beta * market[:, None] + gamma * market[:, None] ** 2 + noise
    stock_ret[0] = 0.0
    prices = 50.0 * np.cumprod(1.0 + stock_ret, axis=0)
    traded = rng.random((days, TICKERS)) > 0.01  # scattered missing days
    kind = np.arange(TICKERS) % 10
    for j in np.flatnonzero(kind == 0):
        traded[: int(rng.integers(WINDOW, days - WINDOW)), j] = False
    for j in np.flatnonzero(kind == 1):
        traded[int(rng.integers(2 * WINDOW, days - 10)) :, j] = False
    for j in np.flatnonzero(kind == 2):
        start = int(rng.integers(WINDOW, days - 2 * WINDOW))
        traded[start : start + int(rng.integers(20, 300)), j] = False
    for j in np.flatnonzero(kind == 3):
        listed = int(rng.integers(10, days // 2))
        traded[:listed, j] = False
        traded[listed + int(rng.integers(WINDOW // 2, days // 2)) :, j] = False
    rows = np.arange(days)[:, None]
    last = np.maximum.accumulate(np.where(traded, rows, -1), axis=0)
    prev = np.full((days, TICKERS), -1)
    prev[1:] = last[:-1]
    has = traded & (prev >= 0)
    safe = np.where(has, prev, 0)
    cols = np.arange(TICKERS)[None, :]
    with np.errstate(invalid="ignore"):
        y = np.where(has, prices / prices[safe, cols] - 1.0, np.nan)
        x = np.where(has, index[:, None] / index[safe] - 1.0, np.nan)
    return np.asfortranarray(x[1:]), np.asfortranarray(y[1:])


@pytest.fixture(scope="module")
def universe() -> tuple[np.ndarray, np.ndarray]:
    return aligned_universe()


def sample_columns() -> list[int]:
    """20 tickers: four of each special kind and four ordinary ones, spread over the universe."""
    picks = []
    for k in (0, 1, 2, 3, 5):
        picks += [k + 10 * i for i in (0, 77, 151, 299)]
    return picks


def check_rows(present: np.ndarray) -> list[int]:
    """Rows to check for one ticker: first fitted, two inside, the last with a return, and the
    first after a gap of several days (the window's n_obs differs from its length there)."""
    rows = np.flatnonzero(present)
    counts = np.convolve(present.astype(int), np.ones(WINDOW, dtype=int))[: len(present)]
    fitted = rows[counts[rows] >= MIN_OBS]
    if fitted.size == 0:
        return []
    picks = {int(fitted[0]), int(fitted[len(fitted) // 3]), int(fitted[2 * len(fitted) // 3]), int(rows[-1])}
    gaps = np.flatnonzero(np.diff(rows) > 3)
    after = [int(rows[g + 1]) for g in gaps if counts[rows[g + 1]] >= MIN_OBS]
    if after:
        picks.add(after[0])
    return sorted(picks)


@pytest.mark.slow
def test_universe_of_3000_tickers_matches_per_ticker_statsmodels_fits(universe):
    x, y = universe
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit = quadratic_fit(xt, yt, window=WINDOW, min_obs=MIN_OBS)
    sens = daily_sensitivity(fit, xt)
    assert fit.shape == (DAYS, TICKERS)
    checked = 0
    for j in sample_columns():
        present = np.isfinite(x[:, j]) & np.isfinite(y[:, j])
        for t in check_rows(present):
            lo = max(0, t - WINDOW + 1)
            ok = present[lo : t + 1]
            xs, ys = x[lo : t + 1, j][ok], y[lo : t + 1, j][ok]
            assert fit.n_obs[t, j].item() == xs.size
            res = sm.OLS(ys, np.column_stack([np.ones(xs.size), xs, xs * xs])).fit()
            lin = sm.OLS(ys, np.column_stack([np.ones(xs.size), xs])).fit()
            cov = np.asarray(res.cov_params())
            where = f"ticker {j} ({KINDS.get(j % 10, 'ordinary')}), row {t}"
            for k, name in enumerate(("alpha", "beta", "gamma")):
                _close(getattr(fit, name)[t, j].item(), res.params[k], res.bse[k], f"{name} of {where}")
                _close(getattr(fit, f"{name}_se")[t, j].item(), res.bse[k], 0.0, f"{name}_se of {where}")
            _close(fit.r2[t, j].item(), res.rsquared, 1e-3, f"r2 of {where}")
            _close(fit.rss[t, j].item(), res.ssr, 0.0, f"rss of {where}")
            _close(fit.linear_beta[t, j].item(), lin.params[1], lin.bse[1], f"linear_beta of {where}")
            grad = np.array([0.0, 1.0, 2.0 * x[t, j]])
            want_se = math.sqrt(float(grad @ cov @ grad))
            want = res.params[1] + 2.0 * res.params[2] * x[t, j]
            _close(sens.sensitivity[t, j].item(), want, want_se, f"sensitivity of {where}")
            _close(sens.sensitivity_se[t, j].item(), want_se, 0.0, f"sensitivity_se of {where}")
            checked += 1
        # No window reaches back past WINDOW rows: the first fitted day needs MIN_OBS returns.
        counts = fit.n_obs[:, j].numpy()
        assert counts.max() <= WINDOW
        assert np.isnan(fit.beta[:, j].numpy()[counts < MIN_OBS]).all()
    assert checked >= 80


@pytest.mark.slow
def test_universe_results_do_not_depend_on_the_rest_of_the_universe(universe):
    """A ticker fitted inside the universe gets the same numbers, bit for bit, as alone."""
    x, y = universe
    picks = sample_columns()
    whole = quadratic_fit(torch.from_numpy(x), torch.from_numpy(y), window=WINDOW, min_obs=MIN_OBS)
    alone = quadratic_fit(
        torch.from_numpy(np.ascontiguousarray(x[:, picks])),
        torch.from_numpy(np.ascontiguousarray(y[:, picks])),
        window=WINDOW,
        min_obs=MIN_OBS,
    )
    for name in ("alpha", "beta", "gamma", "cov_unique", "rss", "r2", "linear_beta", "n_obs"):
        torch.testing.assert_close(
            getattr(whole, name)[:, picks], getattr(alone, name), rtol=0, atol=0, equal_nan=True
        )


def _close(got: float, expected: float, scale: float, what: str) -> None:
    tol = RTOL * max(abs(expected), scale)
    assert abs(got - expected) <= tol, f"{what}: got {got!r}, expected {expected!r} (tol {tol:.2g})"
