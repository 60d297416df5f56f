"""The batched fit on a CUDA device: time at universe scale, and agreement with the CPU.

    python benchmarks/bench_gpu.py [--tickers 10000 --days 10000 --window 252 --min-obs 126]
                                   [--repeat 5 --check-tickers 200 --api-tickers 500 --chunk N]
                                   [--json results.json]

Needs only torch (a CUDA build), numpy, pandas and this package.  It prints the card, then:

* **kernel on the device**: :func:`~sensitivity.model.quadratic_fit` (coefficients, classical
  covariance and standard errors, RSS, R^2, linear slope) plus
  :func:`~sensitivity.sensitivity.daily_sensitivity` (autograd sensitivity, its standard
  error and interval) on the whole ``--tickers`` x ``--days`` panel, inputs already on the
  device and results left there (in ticker groups when the card's free memory needs it);
  best and median of ``--repeat`` runs after a warm-up, with ``torch.cuda.synchronize()``;
* **with transfers**: the same, from a host (numpy) panel to host copies of alpha, beta,
  gamma, sensitivity and its standard error;
* **CPU on a subset**: the same kernel on the CPU for ``--check-tickers`` tickers spread
  across the panel (all days), timed and extrapolated linearly to all tickers (said so);
* **agreement**: every fitted quantity of those tickers, CUDA against CPU; the largest
  relative difference must be below 1e-9 (relative to ``max(|value|, its standard error)``
  for coefficients and sensitivities, to the value for standard errors, RSS and R^2); the
  script exits with status 1 if not;
* **API end to end** (``--api-tickers``, 0 to skip): ``quadratic_sensitivity`` on that many
  tickers x ``--days``, with ``device="cuda"`` and ``device="cpu"``; the long table lives in
  host memory (about 45 float64 columns per row), so this runs on a slice of the panel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from sensitivity.model import quadratic_fit
from sensitivity.sensitivity import daily_sensitivity

#: Bytes of device memory per cell (ticker x day) while a group is fitted: the fit's 16 float
#: planes and n_obs, the sensitivity's outputs and temporaries, and headroom.
BYTES_PER_CELL = 40 * 8


def synthetic_panel(tickers: int, days: int, seed: int = 2024) -> tuple[np.ndarray, np.ndarray]:
    """``(market [T], stocks [T, N])`` column-major; ~2% gaps, every tenth stock listed late."""
    rng = np.random.default_rng(seed)
    market = rng.standard_t(4, days) * 0.008 + 0.0003
    stocks = np.empty((days, tickers), order="F")
    beta = rng.uniform(0.4, 1.8, tickers)
    gamma = rng.normal(0.0, 3.0, tickers)
    for j in range(tickers):
        col = stocks[:, j]
        col[:] = rng.normal(0.0, 0.015, days)
        col += 0.0002 + beta[j] * market + gamma[j] * market * market
        col[rng.random(days) < 0.02] = np.nan
        if j % 10 == 0:
            col[: int(rng.integers(0, days // 2))] = np.nan
    return market, stocks


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    result = fn()
    sync()
    times = []
    for _ in range(repeat):
        result = None
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def kernel(
    x: torch.Tensor, y: torch.Tensor, window: int, min_obs: int, group: int, device: str, chunk: int | None
) -> list[tuple[Any, Any]]:
    """Fit + sensitivities over ticker groups of ``group`` columns; every group's results."""
    out = []
    for g0 in range(0, y.shape[1], group):
        xg, yg = x[:, g0 : g0 + group], y[:, g0 : g0 + group]
        fit = quadratic_fit(xg, yg, window=window, min_obs=min_obs, device=device, chunk_size=chunk)
        out.append((fit, daily_sensitivity(fit, xg.to(fit.beta.device))))
    return out


def host_round_trip(
    market: np.ndarray,
    stocks: np.ndarray,
    window: int,
    min_obs: int,
    group: int,
    chunk: int | None,
    device: str,
) -> dict[str, np.ndarray]:
    """Host panel in, host copies of five result planes out."""
    t_rows, n = stocks.shape
    names = ("alpha", "beta", "gamma", "sensitivity", "sensitivity_se")
    out = {k: np.empty((n, t_rows)) for k in names}
    x = torch.from_numpy(market).to(device)[:, None]
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        yg = torch.from_numpy(stocks[:, g0:g1]).to(device)
        xg = x.expand(t_rows, g1 - g0)
        fit = quadratic_fit(xg, yg, window=window, min_obs=min_obs, device=device, chunk_size=chunk)
        sens = daily_sensitivity(fit, xg)
        for k, v in (("alpha", fit.alpha), ("beta", fit.beta), ("gamma", fit.gamma)):
            out[k][g0:g1] = v.T.cpu().numpy()
        out["sensitivity"][g0:g1] = sens.sensitivity.T.cpu().numpy()
        out["sensitivity_se"][g0:g1] = sens.sensitivity_se.T.cpu().numpy()
    return out


#: The fitted quantities compared with the CPU.
FIT_FIELDS = (
    "alpha",
    "beta",
    "gamma",
    "alpha_se",
    "beta_se",
    "gamma_se",
    "rss",
    "r2",
    "linear_beta",
    "n_obs",
)


def device_resident(
    market: np.ndarray,
    stocks: np.ndarray,
    picks: np.ndarray,
    window: int,
    min_obs: int,
    group: int,
    device: str,
    chunk: int | None,
    repeat: int,
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Time the kernel on the device-resident panel; return the times and the picked columns."""
    t, n = stocks.shape
    y_dev = torch.from_numpy(stocks).to(device)
    x_dev = torch.from_numpy(market).to(device)[:, None].expand(t, n)
    best, median, outs = timed(lambda: kernel(x_dev, y_dev, window, min_obs, group, device, chunk), repeat)
    picked: dict[str, list[torch.Tensor]] = {}
    for g, (fit, sens) in enumerate(outs):
        lo = g * group
        local = [int(p) - lo for p in picks if lo <= p < lo + fit.shape[1]]
        if not local:
            continue
        for name in FIT_FIELDS:
            picked.setdefault(name, []).append(getattr(fit, name)[:, local].cpu())
        for name in ("sensitivity", "sensitivity_se"):
            picked.setdefault(name, []).append(getattr(sens, name)[:, local].cpu())
    return best, median, {k: torch.cat(v, dim=1) for k, v in picked.items()}


def relative_difference(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest ``|got - want| / max(|want|, scale)``; inf if the NaN patterns differ."""
    got, want = got.double().cpu(), want.double().cpu()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    ok = ~torch.isnan(want)
    if not bool(ok.any()):
        return 0.0
    denom = want[ok].abs()
    if scale is not None:
        denom = torch.maximum(denom, scale.double().cpu()[ok])
    denom = denom.clamp(min=1e-300)
    return float(((got[ok] - want[ok]).abs() / denom).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tickers", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--min-obs", type=int, default=126)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check-tickers", type=int, default=200, help="tickers also fitted on the CPU")
    parser.add_argument("--api-tickers", type=int, default=500, help="tickers for the API run (0: skip)")
    parser.add_argument(
        "--chunk", type=int, default=None, help="columns per kernel chunk (default: the kernel's)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script itself")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA device: nothing to benchmark here")

    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name(0)
        print(
            f"# device: {name} (compute capability {props.major}.{props.minor}, "
            f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free)"
        )
    else:
        name, free = f"CPU ({platform.processor() or platform.machine()})", 8 * 2**30
        print(f"# device: {name} -- a dry run of the script, not a GPU benchmark")
    print(
        f"# torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {np.__version__}, "
        f"pandas {pd.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch CPU threads {torch.get_num_threads()}"
    )
    n, t, w, m = args.tickers, args.days, args.window, args.min_obs
    print(f"# {n} tickers x {t} days, window {w}, min_obs {m}")

    start = time.perf_counter()
    market, stocks = synthetic_panel(n, t)
    print(
        f"# data built in {time.perf_counter() - start:.1f} s "
        f"({stocks.nbytes / 2**30:.2f} GiB of stock returns)"
    )
    group = max(1, min(n, int((free - stocks.nbytes) * 0.8) // (t * BYTES_PER_CELL)))
    print(f"# kernel groups of {group} tickers ({-(-n // group)} group(s))")
    results: dict[str, Any] = {
        "device": name,
        "tickers": n,
        "days": t,
        "window": w,
        "min_obs": m,
        "group": group,
        "torch": torch.__version__,
    }

    # Kernel, device resident; then agreement with the CPU on a subset of its tickers.
    picks = np.unique(np.linspace(0, n - 1, min(args.check_tickers, n)).astype(int))
    best, median, on_device = device_resident(
        market, stocks, picks, w, m, group, dev, args.chunk, args.repeat
    )
    results["kernel_best"], results["kernel_median"] = best, median
    results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    xs = torch.from_numpy(market)[:, None].expand(t, len(picks))
    ys = torch.from_numpy(np.asfortranarray(stocks[:, picks]))
    cpu_start = time.perf_counter()
    ((cpu_fit, cpu_sens),) = kernel(xs, ys, w, m, len(picks), "cpu", None)
    cpu_seconds = time.perf_counter() - cpu_start
    results["cpu_subset_seconds"] = cpu_seconds
    results["cpu_extrapolated_seconds"] = cpu_seconds * n / len(picks)
    worst: dict[str, float] = {}
    for name in ("alpha", "beta", "gamma"):
        worst[name] = relative_difference(
            on_device[name], getattr(cpu_fit, name), getattr(cpu_fit, f"{name}_se")
        )
    for name in ("alpha_se", "beta_se", "gamma_se", "rss", "r2", "linear_beta"):
        worst[name] = relative_difference(on_device[name], getattr(cpu_fit, name))
    worst["sensitivity"] = relative_difference(
        on_device["sensitivity"], cpu_sens.sensitivity, cpu_sens.sensitivity_se
    )
    worst["sensitivity_se"] = relative_difference(on_device["sensitivity_se"], cpu_sens.sensitivity_se)
    n_obs_equal = torch.equal(on_device["n_obs"], cpu_fit.n_obs)
    results["max_rel_diff"] = worst
    results["n_obs_equal"] = n_obs_equal
    if dev == "cuda":
        torch.cuda.empty_cache()

    # With transfers, host to host.
    best_h, median_h, _ = timed(
        lambda: host_round_trip(market, stocks, w, m, group, args.chunk, dev), max(1, args.repeat // 2)
    )
    results["host_best"], results["host_median"] = best_h, median_h

    # API end to end on a slice.
    if args.api_tickers:
        from sensitivity import quadratic_sensitivity

        k = min(args.api_tickers, n)
        dates = pd.bdate_range("1985-01-01", periods=t)
        frame = pd.DataFrame(stocks[:, :k], index=dates, columns=[f"S{i:05d}" for i in range(k)], copy=False)
        series = pd.Series(market, index=dates)
        for where in dict.fromkeys((dev, "cpu")):
            try:
                quadratic_sensitivity(
                    frame.iloc[:400, :3], series.iloc[:400], window=w, min_obs=m, device=where
                )
                s = time.perf_counter()
                rows = len(quadratic_sensitivity(frame, series, window=w, min_obs=m, device=where))
                sync()
            except Exception as exc:  # report it; the kernel figures above still stand
                results[f"api_{where}_error"] = f"{type(exc).__name__}: {exc}"
                print(f"# quadratic_sensitivity(device={where!r}) failed: {type(exc).__name__}: {exc}")
                continue
            results[f"api_{where}_seconds"] = time.perf_counter() - s
            results["api_rows"] = rows

    print(f"\n| {'what':<58} | {'best s':>9} | {'median s':>9} |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|")
    rows = [
        (f"kernel on {results['device']} ({n} x {t}, device resident)", best, median),
        ("kernel with transfers (numpy in, 5 result planes out)", best_h, median_h),
        (
            f"kernel on the CPU, {len(picks)} tickers measured, x{n / len(picks):.0f} extrapolated",
            results["cpu_extrapolated_seconds"],
            results["cpu_extrapolated_seconds"],
        ),
    ]
    for where in ("cuda", "cpu"):
        if f"api_{where}_seconds" in results:
            v = results[f"api_{where}_seconds"]
            rows.append((f"quadratic_sensitivity, {min(args.api_tickers, n)} x {t}, device={where}", v, v))
    for label, b, med in rows:
        print(f"| {label:<58} | {b:9.3f} | {med:9.3f} |")
    print(
        f"\npeak device memory {results['peak_gib']:.1f} GiB; GPU vs CPU (extrapolated): "
        f"{results['cpu_extrapolated_seconds'] / best:,.0f}x"
    )
    print(
        f"{dev} vs CPU on {len(picks)} tickers x {t} days: n_obs equal: {n_obs_equal}; "
        "max relative difference:"
    )
    for k, v in worst.items():
        print(f"  {k:<15} {v:.2e}")
    ok = n_obs_equal and all(v <= 1e-9 for v in worst.values())
    print("AGREEMENT: " + ("OK (all within 1e-9)" if ok else "FAILED (above 1e-9)"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
