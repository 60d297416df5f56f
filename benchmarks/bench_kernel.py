"""The batched fit against looped statsmodels, a per-window numpy loop and the memory floor.

    python benchmarks/bench_kernel.py                  # the quick grid (a few minutes on 2 cores)
    python benchmarks/bench_kernel.py --full           # every N x T of the grid
    python benchmarks/bench_kernel.py --sizes 500x5000,3000x7500 [--window 252 --min-obs 126]
                                      [--repeat 5 --sample 6 --threads N --api auto|all|none]
                                      [--json results.json]

Each size runs in a fresh subprocess (so peak memory does not mix between sizes) on the same
seeded synthetic returns: a fat-tailed index, a quadratic market model plus noise per stock,
about 2% random gaps, and every tenth stock listed late.  Within that process, side by side:

* **kernel** -- what the issue's targets are about: :func:`~sensitivity.model.quadratic_fit`
  (coefficients, classical covariance and standard errors, RSS, R^2, the linear slope) plus
  :func:`~sensitivity.sensitivity.daily_sensitivity` (autograd sensitivity, its delta-method
  standard error and confidence interval), in groups of at most 2^22 tickers x days, as a
  streaming consumer runs it (the pipeline writes one file per ticker): each group's results
  are written into storage kept from group to group and from run to run (one
  :class:`~sensitivity.buffers.OutputBuffers`), as the floor writes into a buffer it keeps.
  **fresh outputs**: the same with each group's results let go and the next group's in fresh
  memory, which the OS zeroes page by page first, taking turns with the kernel and the floor
  (the kernel's peak memory is read before these runs).
  ``quadratic_sensitivity`` uses groups of 2^20 cells, since each of
  its groups also holds the per-day table's forty planes and two more fits; the kernel alone
  is faster in the larger groups (2.8-2.9 s against 3.5 s at 3,000 x 7,500).  Best and
  median of ``--repeat`` runs after one warm-up, taking turns with the floor's runs (below)
  so that the two are compared at the same moments.
* **floor** -- one pass that reads the x and y panels and writes the cumulative sums of the
  nine moment arrays ``1, x, x^2, x^3, x^4, y, xy, x^2 y, y^2`` (what every cumulative-sum
  method needs at least), in cache-sized chunks on all threads, into a reused buffer.  Also
  shown, for reference: ``torch.cumsum`` of the y panel alone (one array in, one array out).
* **RollingOLS** -- statsmodels ``RollingOLS(y, [1, x, x^2], window, min_nobs=min_obs,
  expanding=True).fit()`` (parameters and covariance), one ticker at a time, on a **sample** of
  ``--sample`` tickers spread across the panel, **extrapolated** linearly to all tickers.
* **lstsq loop** -- ``numpy.linalg.lstsq`` on every window (parameters, and the covariance
  ``s^2 (X'X)^-1``), one window at a time, on a smaller **sample** of tickers, **extrapolated**.
* **API** -- ``quadratic_sensitivity`` end to end (pandas in, the long per-day table out, with
  every column the library computes), where the table fits comfortably in memory
  (``--api auto``: up to 2.5 million cells).

Peak memory is the process's ``ru_maxrss``, read after the data are built, after the kernel's
first run (into its buffers) and after the API runs (in that order, so each reading is that
stage's peak; the runs with fresh outputs come between the last two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from sensitivity.buffers import OutputBuffers
from sensitivity.model import quadratic_fit
from sensitivity.sensitivity import daily_sensitivity
from sensitivity.threads import CHUNK_CELLS, for_each_chunk

QUICK: tuple[tuple[int, int], ...] = ((100, 2500), (500, 5000), (1000, 7500), (3000, 7500))
FULL: tuple[tuple[int, int], ...] = tuple((n, t) for n in (100, 500, 1000, 3000) for t in (2500, 5000, 7500))

#: Tickers x days per kernel group (``sensitivity.api`` uses 2^20 for its heavier groups).
GROUP_CELLS = 1 << 22

#: Cells up to which ``--api auto`` runs the API end to end (its table is ~45 float columns).
API_AUTO_CELLS = 2_500_000


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def synthetic_panel(
    tickers: int, days: int, seed: int = 2024
) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    """``(dates, market [T], stocks [T, N])``; stocks column-major (ticker-major), built in place.

    A quadratic market model plus noise; about 2% random gaps; every tenth stock listed late.
    """
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("1995-01-02", periods=days, name="date")
    market = rng.standard_t(4, days) * 0.008 + 0.0003
    alpha = rng.normal(0.0, 0.0005, tickers)
    beta = rng.uniform(0.4, 1.8, tickers)
    gamma = rng.normal(0.0, 3.0, tickers)
    stocks = np.empty((days, tickers), order="F")
    for j in range(tickers):  # column by column: no panel-sized temporaries
        col = stocks[:, j]
        col[:] = rng.normal(0.0, 0.015, days)
        col += alpha[j] + beta[j] * market + gamma[j] * market * market
        col[rng.random(days) < 0.02] = np.nan
        if j % 10 == 0:
            col[: int(rng.integers(0, days // 2))] = np.nan
    return dates, market, stocks


def synthetic_returns(tickers: int, days: int, seed: int = 2024) -> tuple[pd.DataFrame, pd.Series]:
    """The same data as labelled pandas objects (stock returns, index returns)."""
    dates, market, stocks = synthetic_panel(tickers, days, seed)
    columns = [f"S{i:05d}" for i in range(tickers)]
    frame = pd.DataFrame(stocks, index=dates, columns=columns, copy=False)
    return frame, pd.Series(market, index=dates)


# --------------------------------------------------------------------------------------------
# What is timed
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int, warmup: bool = True) -> tuple[float, float, Any]:
    """(best, median) wall seconds over ``repeat`` runs (after one warm-up run), and the last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeat):
        result = None  # let the previous result go before the next run
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def ticker_groups(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` in groups of whole tickers of at most :data:`GROUP_CELLS` cells (one ticker at least)."""
    t_rows, n_cols = y.shape
    group = max(1, GROUP_CELLS // max(t_rows, 1))
    for g0 in range(0, n_cols, group):
        yield x[:, g0 : g0 + group], y[:, g0 : g0 + group]


def fit_only(x: torch.Tensor, y: torch.Tensor, window: int, min_obs: int, out: OutputBuffers) -> Any:
    """:func:`quadratic_fit` alone over the same ticker groups as :func:`kernel`, into ``out``."""
    fit = None
    for xg, yg in ticker_groups(x, y):
        fit = quadratic_fit(xg, yg, window=window, min_obs=min_obs, out=out)
    return fit


def kernel(
    x: torch.Tensor, y: torch.Tensor, window: int, min_obs: int, out: OutputBuffers | None
) -> tuple[Any, Any]:
    """Fit + autograd sensitivities over ticker groups; returns the last group's results.

    ``out``: every group writes its results into this storage, over the last group's (a
    streaming consumer's loop, and what the floor does with its buffer); None: each group's
    results are let go and the next group's land in fresh memory, which the OS zeroes first.
    """
    fit = sens = None
    for xg, yg in ticker_groups(x, y):
        if out is None:
            fit = sens = None
        fit = quadratic_fit(xg, yg, window=window, min_obs=min_obs, out=out)
        sens = daily_sensitivity(fit, xg, out=out)
    return fit, sens


def floor_pass(x_nt: torch.Tensor, y_nt: torch.Tensor) -> None:
    """Read x and y once and write the cumulative sums of the nine moment arrays.

    Ticker chunks of about 2^17 cells, one per thread at a time, each into the thread's own
    reused ``[9, chunk, T]`` buffer (no page faults), every thread running torch
    single-threaded: the fastest form found here (the kernel's own scheme,
    :func:`sensitivity.threads.for_each_chunk`).  Measured on 2 cores: chunks of 2^15 cells
    (the form used before) took 1.4x as long.
    """
    n, t = y_nt.shape
    chunk = max(1, CHUNK_CELLS // max(t, 1))
    local = threading.local()

    def one(c0: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = torch.empty((9, chunk, t), dtype=torch.float64)
        xs, ys = x_nt[c0 : c0 + chunk], y_nt[c0 : c0 + chunk]
        k = xs.shape[0]
        v = buf[:, :k]
        v[0].copy_(torch.isfinite(ys))
        v[1].copy_(xs)
        v[5].copy_(ys)
        torch.mul(v[1], v[1], out=v[2])
        torch.mul(v[2], v[1], out=v[3])
        torch.mul(v[2], v[2], out=v[4])
        torch.mul(v[1], v[5], out=v[6])
        torch.mul(v[2], v[5], out=v[7])
        torch.mul(v[5], v[5], out=v[8])
        for p in v:
            p.cumsum_(-1)

    with torch.no_grad():
        for_each_chunk(one, range(0, n, chunk), torch.device("cpu"), "floor")


def cumsum_pass(y_nt: torch.Tensor, repeat: int) -> tuple[float, float]:
    """``torch.cumsum`` of the y panel along days into a reused buffer: (best, median) seconds."""
    buffer = torch.empty_like(y_nt)
    best, median, _ = timed(lambda: torch.cumsum(y_nt, -1, out=buffer), repeat)
    return best, median


def rolling_ols(x: np.ndarray, y: np.ndarray, window: int, min_obs: int) -> tuple[np.ndarray, np.ndarray]:
    """statsmodels RollingOLS of one ticker: params [T, 3] and covariance [T, 3, 3]."""
    from statsmodels.regression.rolling import RollingOLS

    exog = np.column_stack([np.ones_like(x), x, x * x])
    res = RollingOLS(y, exog, window=window, min_nobs=min_obs, expanding=True).fit()
    return np.asarray(res.params), np.asarray(res.cov_params())


def lstsq_windows(x: np.ndarray, y: np.ndarray, window: int, min_obs: int) -> np.ndarray:
    """One ``numpy.linalg.lstsq`` per window (and ``s^2 (X'X)^-1``): params [T, 3], NaN below min_obs."""
    t_rows = len(y)
    ok = np.isfinite(x) & np.isfinite(y)
    params = np.full((t_rows, 3), np.nan)
    for t in range(t_rows):
        lo = max(0, t - window + 1)
        sel = ok[lo : t + 1]
        n = int(sel.sum())
        if n < min_obs:
            continue
        xs, ys = x[lo : t + 1][sel], y[lo : t + 1][sel]
        design = np.column_stack([np.ones(n), xs, xs * xs])
        coef, rss, _, _ = np.linalg.lstsq(design, ys, rcond=None)
        s2 = float(rss[0]) / (n - 3) if rss.size else np.nan
        _cov = s2 * np.linalg.inv(design.T @ design)
        params[t] = coef
    return params


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def alternating(fns: Sequence[Callable[[], Any]], repeat: int) -> list[tuple[float, float, float]]:
    """Run ``fns`` in turn, ``repeat`` rounds after one warm-up round: per function (best,
    median) wall seconds and the process CPU seconds (all threads) of its best run, which
    unlike wall time hardly grow when other jobs share the cores.  Each result is let go
    before the next call."""
    for fn in fns:
        fn()
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            cpu = time.process_time()
            start = time.perf_counter()
            fn()
            walls[k].append(time.perf_counter() - start)
            cpus[k].append(time.process_time() - cpu)
    return [(min(w), statistics.median(w), c[w.index(min(w))]) for w, c in zip(walls, cpus, strict=True)]


def measure(tickers: int, days: int, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one size, in this process; returns a JSON-friendly dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    w, m = args.window, args.min_obs
    out: dict[str, Any] = {"tickers": tickers, "days": days, "window": w, "min_obs": m}
    out["load_before"] = os.getloadavg()[0]
    dates, market, stocks = synthetic_panel(tickers, days)
    out["rss_data_mb"] = peak_rss_mb()
    x = torch.from_numpy(market)[:, None].expand(days, tickers)
    y = torch.from_numpy(stocks)  # [T, N], ticker-major memory
    x_nt = x.T  # [N, T] views
    y_nt = y.T

    out["cumsum_best"], out["cumsum_median"] = cumsum_pass(y_nt, args.repeat)
    fresh_best, _, _ = timed(lambda: torch.cumsum(y_nt, -1), args.repeat)
    out["cumsum_fresh_best"] = fresh_best
    # The kernel writes into storage it keeps from run to run, as the floor does; its peak
    # memory is read after its first run, before the runs with fresh outputs (whose memory
    # would add to it while the buffers are held).
    buffers = OutputBuffers()
    kernel(x, y, w, m, buffers)
    out["rss_kernel_mb"] = peak_rss_mb()
    # The floor, the kernel and the kernel with fresh outputs take turns, so that their ratios
    # compare runs made moments apart: this VM's speed drifts by tens of percent within minutes.
    (floor_best, floor_median, _), (best, median, kernel_cpu), (fresh, fresh_median, _) = alternating(
        [
            lambda: floor_pass(x_nt, y_nt),
            lambda: kernel(x, y, w, m, buffers),
            lambda: kernel(x, y, w, m, None),
        ],
        args.repeat,
    )
    out["floor_best"], out["floor_median"] = floor_best, floor_median
    out["kernel_best"], out["kernel_median"] = best, median
    out["kernel_cpu"] = kernel_cpu
    out["kernel_fresh_best"], out["kernel_fresh_median"] = fresh, fresh_median
    out["fit_best"], out["fit_median"], _ = timed(lambda: fit_only(x, y, w, m, buffers), args.repeat)
    buffers.release()

    # statsmodels RollingOLS and the lstsq loop on samples of tickers, extrapolated.
    sample = np.unique(np.linspace(0, tickers - 1, min(args.sample, tickers)).astype(int))
    warm = np.random.default_rng(0).normal(0.0, 0.01, (2, 2 * w))  # warm-up: imports, first calls
    rolling_ols(warm[0], warm[1], w, m)
    lstsq_windows(warm[0, : w + 5], warm[1, : w + 5], w, m)
    start = time.perf_counter()
    ref = {int(i): rolling_ols(market, stocks[:, i], w, m)[0] for i in sample}
    out["rolling_ols_per_ticker"] = (time.perf_counter() - start) / len(sample)
    out["rolling_ols_sample"] = len(sample)
    few = sample[:: max(1, len(sample) // max(1, args.lstsq_sample))][: args.lstsq_sample]
    start = time.perf_counter()
    ls = {int(i): lstsq_windows(market, stocks[:, i], w, m) for i in few}
    out["lstsq_per_ticker"] = (time.perf_counter() - start) / len(few)
    out["lstsq_sample"] = len(few)

    # Sanity: the sampled tickers' coefficients against both references.
    fit, _ = kernel(x[:, sample], y[:, sample], w, m, None)
    worst = 0.0
    for k, i in enumerate(sample):
        ours = fit.params[:, k].numpy()
        for theirs in (ref[int(i)], ls.get(int(i))):
            if theirs is None:
                continue
            ok = np.isfinite(theirs[:, 1])
            if not np.array_equal(ok, np.isfinite(ours[:, 1])):
                raise SystemExit(f"validity differs from the reference for ticker {i}")
            scale = np.maximum(np.abs(theirs[ok]), 1e-3)
            worst = max(worst, float(np.max(np.abs(ours[ok] - theirs[ok]) / scale)))
    out["max_rel_diff"] = worst
    del fit

    cells = tickers * days
    if args.api == "all" or (args.api == "auto" and cells <= API_AUTO_CELLS):
        from sensitivity import quadratic_sensitivity

        columns = [f"S{i:05d}" for i in range(tickers)]
        frame = pd.DataFrame(stocks, index=dates, columns=columns, copy=False)
        series = pd.Series(market, index=dates)
        quadratic_sensitivity(frame.iloc[:300, :3], series.iloc[:300], window=w, min_obs=m)  # warm-up
        b, med, table = timed(
            lambda: quadratic_sensitivity(frame, series, window=w, min_obs=m), args.api_repeat, warmup=False
        )
        out["api_best"], out["api_median"], out["api_rows"] = b, med, len(table)
        out["api_columns"] = len(table.columns)
        del table
        out["rss_api_mb"] = peak_rss_mb()
    out["load_after"] = os.getloadavg()[0]
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def run_child(tickers: int, days: int, argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{tickers}x{days}", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tickers}x{days} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def print_tables(results: list[dict[str, Any]]) -> None:
    def size(r: dict[str, Any]) -> str:
        return f"{r['tickers']} x {r['days']}"

    print("\nTimes, seconds (best / median of the repeats; the references are extrapolated from samples):\n")
    head = (
        f"| {'N x T':>12} | {'kernel':>15} | {'kernel CPU':>10} | {'fresh outputs':>15} | {'fit alone':>9} | "
        f"{'floor':>7} | "
        f"{'cumsum y':>8} | {'RollingOLS':>10} | {'lstsq loop':>10} | {'API end to end':>15} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        api = f"{r['api_best']:.2f} / {r['api_median']:.2f}" if "api_best" in r else "-"
        print(
            f"| {size(r):>12} | {r['kernel_best']:6.3f} / {r['kernel_median']:6.3f} | "
            f"{r['kernel_cpu']:10.3f} | {r['kernel_fresh_best']:6.3f} / {r['kernel_fresh_median']:6.3f} | "
            f"{r['fit_best']:9.3f} | {r['floor_best']:7.4f} | "
            f"{r['cumsum_best']:8.4f} | {r['rolling_ols_per_ticker'] * r['tickers']:10.1f} | "
            f"{r['lstsq_per_ticker'] * r['tickers']:10.1f} | {api:>15} |"
        )
    print(
        "\nkernel = quadratic_fit + daily_sensitivity over ticker groups, written into storage kept from "
        "group to group and run to run (OutputBuffers), as the floor writes into its buffer; kernel CPU = "
        "process CPU seconds of its best run (all threads); fresh outputs = the same kernel with each "
        "group's results let go and the next group's in fresh memory (zeroed by the OS first); floor = one "
        "pass writing the cumulative sums of the nine moment arrays."
    )
    print("\nRatios (best times) and peak memory:\n")
    head = (
        f"| {'N x T':>12} | {'RollingOLS / kernel':>19} | {'lstsq / kernel':>14} | {'kernel / floor':>14} | "
        f"{'kernel / cumsum y':>17} | {'RSS data MB':>11} | {'RSS kernel MB':>13} | {'RSS API MB':>10} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in results:
        k = r["kernel_best"]
        api_rss = f"{r['rss_api_mb']:.0f}" if "rss_api_mb" in r else "-"
        print(
            f"| {size(r):>12} | {r['rolling_ols_per_ticker'] * r['tickers'] / k:19,.0f} | "
            f"{r['lstsq_per_ticker'] * r['tickers'] / k:14,.0f} | {k / r['floor_best']:14.1f} | "
            f"{k / r['cumsum_best']:17.0f} | {r['rss_data_mb']:11.0f} | {r['rss_kernel_mb']:13.0f} | "
            f"{api_rss:>10} |"
        )
    print("\nNotes:")
    for r in results:
        api = (
            f"; API table {r['api_rows']:,} rows x {r['api_columns']} columns"
            if "api_rows" in r
            else "; API not run at this size"
        )
        print(
            f"* {size(r)}: RollingOLS {r['rolling_ols_per_ticker'] * 1e3:.0f} ms/ticker on "
            f"{r['rolling_ols_sample']} tickers, lstsq loop {r['lstsq_per_ticker'] * 1e3:.0f} ms/ticker on "
            f"{r['lstsq_sample']}, both extrapolated to {r['tickers']}; sampled params agree to "
            f"{r['max_rel_diff']:.1e} relative{api}; load average {r['load_before']:.1f} -> "
            f"{r['load_after']:.1f}"
        )


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        n, t = part.lower().split("x")
        sizes.append((int(n), int(t)))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the whole grid (100..3000 x 2500..7500)")
    parser.add_argument("--sizes", type=parse_sizes, default=None, help="e.g. 500x5000,3000x7500")
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--min-obs", type=int, default=126)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sample", type=int, default=6, help="tickers timed with RollingOLS")
    parser.add_argument("--lstsq-sample", type=int, default=2, help="tickers timed with the lstsq loop")
    parser.add_argument("--api", choices=("auto", "all", "none"), default="auto")
    parser.add_argument("--api-repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        ((n, t),) = parse_sizes(args.child)
        print(json.dumps(measure(n, t, args)))
        return

    sizes = args.sizes or (FULL if args.full else QUICK)
    passthrough = [
        f"--window={args.window}",
        f"--min-obs={args.min_obs}",
        f"--repeat={args.repeat}",
        f"--sample={args.sample}",
        f"--lstsq-sample={args.lstsq_sample}",
        f"--api={args.api}",
        f"--api-repeat={args.api_repeat}",
        *([f"--threads={args.threads}"] if args.threads else []),
    ]
    print(f"# window {args.window}, min_obs {args.min_obs}; sizes {', '.join(f'{n}x{t}' for n, t in sizes)}")
    print(
        f"# python {platform.python_version()}, torch {torch.__version__} "
        f"({args.threads or torch.get_num_threads()} "
        f"threads), {os.cpu_count()} CPUs, {platform.machine()}; load average {os.getloadavg()[0]:.2f}"
    )
    results = []
    for n, t in sizes:
        start = time.perf_counter()
        results.append(run_child(n, t, passthrough))
        print(f"  {n} x {t}: done in {time.perf_counter() - start:.0f} s", flush=True)
    print_tables(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
