"""Time the batched quadratic fit against statsmodels' RollingOLS looped over tickers.

    python benchmarks/bench_kernel.py [--tickers 500 --days 5000 --window 252 --min-obs 126]
                                      [--sample 12 --repeat 5 --threads N]

Both sides run in the same process on the same seeded synthetic returns (a quadratic market
model plus noise, with random gaps and late listings).  ``quadratic_sensitivity`` is timed end
to end (DataFrames in, the long per-day table out) and by stage.  statsmodels
``RollingOLS(..., min_nobs, expanding=True).fit()`` (parameters and covariance) is timed on a
sample of tickers and extrapolated linearly to all of them; the output says so.  The sampled
tickers' coefficients are also compared, as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from statsmodels.regression.rolling import RollingOLS

from sensitivity import quadratic_sensitivity
from sensitivity.model import quadratic_fit
from sensitivity.sensitivity import daily_sensitivity


def synthetic_returns(tickers: int, days: int, seed: int = 2024) -> tuple[pd.DataFrame, pd.Series]:
    """Seeded index and stock returns; about 2% random gaps and every tenth stock listed late."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2000-01-03", periods=days, name="date")
    market = rng.standard_t(4, days) * 0.008 + 0.0003
    alpha = rng.normal(0.0, 0.0005, tickers)
    beta = rng.uniform(0.4, 1.8, tickers)
    gamma = rng.normal(0.0, 3.0, tickers)
    noise = rng.normal(0.0, 0.015, (days, tickers))
    stocks = alpha + beta * market[:, None] + gamma * market[:, None] ** 2 + noise
    stocks[rng.random((days, tickers)) < 0.02] = np.nan
    for i in range(0, tickers, 10):
        stocks[: int(rng.integers(0, days // 2)), i] = np.nan
    columns = [f"S{i:05d}" for i in range(tickers)]
    return pd.DataFrame(stocks, index=dates, columns=columns), pd.Series(market, index=dates)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(best, median) wall seconds over ``repeat`` runs after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def rolling_ols(x: np.ndarray, y: np.ndarray, window: int, min_obs: int) -> tuple[np.ndarray, np.ndarray]:
    exog = np.column_stack([np.ones_like(x), x, x * x])
    res = RollingOLS(y, exog, window=window, min_nobs=min_obs, expanding=True).fit()
    return np.asarray(res.params), np.asarray(res.cov_params())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tickers", type=int, default=500)
    parser.add_argument("--days", type=int, default=5000)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--min-obs", type=int, default=126)
    parser.add_argument("--sample", type=int, default=12, help="tickers timed with statsmodels")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    stocks, market = synthetic_returns(args.tickers, args.days)
    n, t, w, m = args.tickers, args.days, args.window, args.min_obs
    print(f"# {n} tickers x {t} days, window {w}, min_obs {m}")
    print(
        f"# python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), {os.cpu_count()} CPUs, {platform.machine()}"
    )

    best_api, med_api, table = timed(
        lambda: quadratic_sensitivity(stocks, market, window=w, min_obs=m), args.repeat
    )
    x = torch.from_numpy(market.to_numpy(copy=True))[:, None].expand(t, n)
    y = torch.from_numpy(stocks.to_numpy(copy=True))
    best_fit, med_fit, fit = timed(lambda: quadratic_fit(x, y, window=w, min_obs=m), args.repeat)
    best_sens, med_sens, _ = timed(lambda: daily_sensitivity(fit, x), args.repeat)

    sample = np.linspace(0, n - 1, min(args.sample, n)).astype(int)
    xs = market.to_numpy()
    start = time.perf_counter()
    ref = {int(i): rolling_ols(xs, stocks.iloc[:, i].to_numpy(), w, m) for i in sample}
    per_ticker = (time.perf_counter() - start) / len(sample)
    sm_total = per_ticker * n

    worst = 0.0
    for i, (params, _) in ref.items():
        ours = fit.params[:, i].numpy()
        ok = np.isfinite(params[:, 1])
        assert np.array_equal(ok, np.isfinite(ours[:, 1])), f"validity differs for ticker {i}"
        worst = max(
            worst, float(np.max(np.abs(ours[ok] - params[ok]) / np.maximum(np.abs(params[ok]), 1e-3)))
        )

    rows = [
        ("quadratic_sensitivity (end to end)", best_api, med_api),
        ("  quadratic_fit (kernel)", best_fit, med_fit),
        ("  daily_sensitivity (autograd)", best_sens, med_sens),
        (f"RollingOLS.fit() x {n} (extrapolated)", sm_total, sm_total),
    ]
    print(f"\n| {'what':<40} | {'best s':>9} | {'median s':>9} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|")
    for name, best, med in rows:
        print(f"| {name:<40} | {best:9.3f} | {med:9.3f} |")
    print(
        f"\nstatsmodels: {per_ticker * 1e3:.1f} ms per ticker, measured on {len(sample)} tickers and "
        f"extrapolated linearly to {n}."
    )
    print(
        f"speed-up, end to end vs RollingOLS: {sm_total / best_api:,.0f}x (median {sm_total / med_api:,.0f}x)"
    )
    print(f"speed-up, kernel vs RollingOLS:     {sm_total / best_fit:,.0f}x")
    print(f"rows in the table: {len(table):,}; max relative difference of the sampled params: {worst:.1e}")


if __name__ == "__main__":
    main()
