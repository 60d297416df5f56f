"""The library entry point: labelled returns in, the long per-day sensitivity table out.

``from sensitivity import quadratic_sensitivity``::

    table = quadratic_sensitivity(stock_returns, index_returns, window=252, min_obs=126)

:func:`quadratic_sensitivity` checks its inputs once, at this boundary, and hands arrays to
:func:`sensitivity_frame` -- the function the pipeline calls with numpy or torch panels -- which
runs the batched kernels (:func:`~sensitivity.model.quadratic_fit`,
:func:`~sensitivity.sensitivity.daily_sensitivity`) and puts dates and tickers back on the
result.  There is one implementation; labels live only at these edges.

The output has one row per (ticker, date) on which both the stock's and the index's return
exist -- including days whose window has fewer than ``min_obs`` returns, whose fitted values
are then NaN -- ordered by ticker (in input column order) and then date, with the columns of
:data:`OUTPUT_COLUMNS`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from sensitivity.errors import ConfigError, DataValidationError
from sensitivity.inference import (
    check_hac_lags,
    check_se_type,
    coefficient_tests,
    information_criteria,
    robust_covariance,
)
from sensitivity.model import (
    DeviceLike,
    QuadraticFit,
    check_window,
    quadratic_fit,
    resolve_device,
    rolling_anchors,
)
from sensitivity.robust import huber_cells, huber_rolling
from sensitivity.sensitivity import daily_sensitivity
from sensitivity.store import PIPELINE_COLUMNS, SENSITIVITY_COLUMNS

__all__ = [
    "FITS",
    "FLOAT_COLUMNS",
    "HUBER_COLUMNS",
    "OUTPUT_COLUMNS",
    "fit_anchors",
    "quadratic_sensitivity",
    "sensitivity_frame",
    "up_down_min_obs",
]

#: The model's ``fit`` option: which estimator the headline scenarios use, and with
#: ``"huber"`` a Huber fit of every rolling window (see :func:`quadratic_sensitivity`).
FITS: tuple[str, ...] = ("ols", "huber")

#: Columns of the per-day table, in order: those of the stored table
#: (:data:`sensitivity.store.SENSITIVITY_COLUMNS`, the one list of them) that come from
#: returns alone, without the ones the pipeline adds from the index symbol and the prices
#: (:data:`sensitivity.store.PIPELINE_COLUMNS`).  ``date`` is datetime64[ns] (tz-naive),
#: ``ticker`` and ``se_type`` str, ``window`` and ``n_obs`` int64, every other column float64.
OUTPUT_COLUMNS: tuple[str, ...] = tuple(c for c in SENSITIVITY_COLUMNS if c not in PIPELINE_COLUMNS)

#: The Huber fit's columns (``huber_`` + the OLS column of the same meaning).
HUBER_COLUMNS: tuple[str, ...] = tuple(c for c in OUTPUT_COLUMNS if c.startswith("huber_"))

#: The float64 columns of :data:`OUTPUT_COLUMNS`.
FLOAT_COLUMNS: tuple[str, ...] = tuple(
    c for c in OUTPUT_COLUMNS if c not in ("date", "ticker", "window", "n_obs", "se_type")
)

#: Huber fits: where :func:`sensitivity_frame` computes them (see its ``huber`` argument).
HuberMode = Literal["latest", "all", "none"]

ArrayLike = np.ndarray[Any, Any] | Tensor

#: Tickers x rows fitted per group in :func:`sensitivity_frame`: bounds the memory of the
#: per-day results (about 40 float64 planes of 8 MiB each, and the three fits' outputs)
#: whatever the size of the panel.  Each group reuses the memory the last one freed: at 500
#: tickers x 5,000 days, groups of 2^20 cells instead of 2^22 took 0.4 GB off the peak and
#: 0.8 to 1.5 s of page faults off 4 to 5 s (fresh memory is expensive on a virtual machine).
_GROUP_CELLS: int = 1 << 20
#: The same bound on an accelerator (CUDA), where fewer, larger groups keep the device busy:
#: the size the H100 run of benchmarks/README.md ("GPU") used; the CPU's smaller groups were
#: not compared there.
_DEVICE_GROUP_CELLS: int = 1 << 22


def quadratic_sensitivity(
    stock_returns: pd.DataFrame,
    index_returns: pd.Series | pd.DataFrame,
    *,
    window: int = 252,
    min_obs: int = 126,
    se: str = "classical",
    hac_lags: int | None = None,
    fit: str = "ols",
    risk_free: pd.Series | pd.DataFrame | None = None,
    device: DeviceLike = None,
    from_date: dt.date | str | None = None,
) -> pd.DataFrame:
    """Per-day sensitivity of each stock to the index from a rolling quadratic market model.

    Fits ``r_s = alpha + beta*r_m + gamma*r_m**2 + e`` by OLS for every stock and day (all stocks
    together, in batched torch operations) and returns the long per-day table.

    Parameters
    ----------
    stock_returns
        Simple daily returns: a date index (``DatetimeIndex`` or convertible; unique; sorted
        here if it is not), one column per ticker (``str`` names), NaN where a stock did not
        trade.  Numeric, no infinities.
    index_returns
        The index's returns: a Series on the same dates -- the trading calendar is then the
        dates where it is present, and a window counts those dates -- or a DataFrame with the
        same dates and columns holding each stock's own aligned index returns (a stock's index
        return after a gap spans the gap); the calendar is then all its dates.
    window
        Rolling window in trading days (``>= 0``); 0 fits once over the whole range.
    min_obs
        Fewest stock returns a day's fit needs (``>= 4``; ``<= window`` when ``window > 0``).
    se
        The covariance behind every standard error, interval and test: ``"classical"``
        (``s^2 (X'X)^-1``), ``"hc1"`` (White, ``n/(n-3)`` scaled) or ``"hac"`` (Newey-West,
        Bartlett weights); see :mod:`sensitivity.inference`.
    hac_lags
        For ``se="hac"``: the maximum lag; None (default) uses ``floor(4*(n/100)**(2/9))``
        of each window's ``n_obs``.
    fit
        ``"ols"`` (default): the ``huber_*`` columns hold the Huber fit of each ticker's latest
        window only (every row for ``window=0``); ``"huber"``: of every fitted window.
    risk_free
        Risk-free returns over each row's period (decimal fractions), a Series on the same
        dates or a DataFrame like ``stock_returns``; both returns are taken in excess of it
        before the fit.  NaN drops the day (it has no excess return).  Default: none (0).
    device
        Where the kernels run: ``"cpu"`` (default, also None), ``"cuda"`` or ``"auto"`` (CUDA
        when torch sees one); results agree across devices to 1e-9 relative.  Asking for
        ``"cuda"`` without one raises :class:`~sensitivity.errors.ConfigError`.
    from_date
        Rolling windows only: return just the rows dated ``from_date`` or later, the same to
        the bit as those rows of the whole table, computed from about two windows of rows
        instead of all of them (what a daily update appends to a stored table; the latest
        row of each ticker among them gets its Huber fit, as in the whole table).

    Returns
    -------
    pandas.DataFrame
        One row per (ticker, date) where both returns exist, ordered by ticker (input column
        order) then date, with the columns of :data:`OUTPUT_COLUMNS`; fitted values are NaN
        where the window holds fewer than ``min_obs`` returns or its design is singular.

    Raises
    ------
    ConfigError
        For ``window``, ``min_obs``, ``se``, ``hac_lags`` or ``fit`` out of range.
    DataValidationError
        For inputs that break the contract; the message names the argument, the ticker and
        the date where one applies.
    """
    w, m = check_window(window, min_obs)
    check_se_type(se)
    check_hac_lags(hac_lags)
    huber = _huber_mode(fit)
    dates, tickers, y, x = _validated_panels(stock_returns, index_returns)
    rf = _validated_risk_free(risk_free, stock_returns, dates, tickers)
    return sensitivity_frame(
        y,
        x,
        dates=dates,
        tickers=tickers,
        window=w,
        min_obs=m,
        se=se,
        hac_lags=hac_lags,
        huber=huber,
        risk_free=rf,
        device=resolve_device(device),
        from_date=None if from_date is None else _as_dates([from_date], "from_date")[0].date(),
    )


def _huber_mode(fit: object) -> HuberMode:
    if fit == "ols":
        return "latest"
    if fit == "huber":
        return "all"
    raise ConfigError(f"fit must be one of {', '.join(repr(f) for f in FITS)}, got {fit!r}")


def up_down_min_obs(min_obs: int) -> int:
    """Fewest up (or down) days a window needs for ``up_beta`` (``down_beta``): ``max(4, min_obs // 4)``."""
    return max(4, min_obs // 4)


def sensitivity_frame(
    stock_returns: ArrayLike,
    index_returns: ArrayLike,
    *,
    dates: pd.DatetimeIndex | Sequence[Any] | np.ndarray[Any, Any],
    tickers: Sequence[str],
    window: int,
    min_obs: int,
    level: float = 0.95,
    device: torch.device | str | None = None,
    se: str = "classical",
    hac_lags: int | None = None,
    huber: HuberMode = "latest",
    risk_free: ArrayLike | None = None,
    from_date: dt.date | None = None,
) -> pd.DataFrame:
    """The per-day table from unlabelled panels (the pipeline's entry point).

    Parameters
    ----------
    stock_returns
        ``[T, N]`` stock returns (numpy array or torch tensor), NaN where missing.
    index_returns
        ``[T]``: one index series for every stock (rows where it is NaN are not trading days
        and are left out of the calendar); or ``[T, N]``: each stock's aligned index returns
        (every row is a calendar day).
    dates
        The ``T`` row dates (strictly increasing).
    tickers
        The ``N`` ticker names.
    window, min_obs
        As in :func:`quadratic_sensitivity`.
    level
        Confidence level of ``sensitivity_ci_lower`` / ``sensitivity_ci_upper``.
    device
        Torch device for the kernels: ``"cpu"`` (default, also None), ``"cuda"`` or ``"auto"``
        (see :func:`~sensitivity.model.resolve_device`).
    se, hac_lags
        As in :func:`quadratic_sensitivity`.
    huber
        Which windows get a Huber fit: ``"latest"`` (each ticker's last row; every row when
        ``window == 0``), ``"all"`` (every fitted row) or ``"none"``.
    risk_free
        ``[T]`` or ``[T, N]`` risk-free returns per row (NaN drops the day), or None.
    from_date
        Rolling windows only: return just the rows dated ``from_date`` or later, computed from
        the rows they need (about two windows back) instead of the whole panel, with the
        same bits as the whole table's rows (the fits keep the whole panel's centres and
        block boundaries, :func:`~sensitivity.model.rolling_anchors`).  What a daily run
        appends.  With ``huber="latest"`` each ticker's last row among them gets its Huber
        fit, as in the whole table.

    Returns
    -------
    pandas.DataFrame
        As :func:`quadratic_sensitivity`.
    """
    w, m = check_window(window, min_obs)
    se_type = check_se_type(se)
    lags = check_hac_lags(hac_lags)
    if huber not in ("latest", "all", "none"):
        raise ConfigError(f"huber must be 'latest', 'all' or 'none', got {huber!r}")
    y = _as_float64(stock_returns, "stock_returns")
    x = _as_float64(index_returns, "index_returns")
    if y.ndim != 2:
        raise DataValidationError(f"stock_returns must be 2-dimensional [T, N], got shape {y.shape}")
    t_rows, n_cols = y.shape
    if x.shape not in ((t_rows,), (t_rows, n_cols)):
        raise DataValidationError(
            f"index_returns must have shape ({t_rows},) or ({t_rows}, {n_cols}) to match "
            f"stock_returns, got {x.shape}"
        )
    rf = None if risk_free is None else _as_float64(risk_free, "risk_free")
    if rf is not None and rf.shape not in ((t_rows,), (t_rows, n_cols)):
        raise DataValidationError(
            f"risk_free must have shape ({t_rows},) or ({t_rows}, {n_cols}) to match "
            f"stock_returns, got {rf.shape}"
        )
    date_index = _as_dates(dates, "dates")
    if len(date_index) != t_rows:
        raise DataValidationError(f"dates must have {t_rows} entries (one per row), got {len(date_index)}")
    if not date_index.is_monotonic_increasing or date_index.has_duplicates:
        raise DataValidationError("dates must be strictly increasing (sorted, without duplicates)")
    names = [str(t) for t in tickers]
    if len(names) != n_cols:
        raise DataValidationError(f"tickers must have {n_cols} entries (one per column), got {len(names)}")

    p = _prepare_panels(x, y, rf, date_index)
    x_nt, y_nt, rf_nt, xe_nt, ye_nt = p.x_nt, p.y_nt, p.rf_nt, p.xe_nt, p.ye_nt
    x_panel, y_panel, x_sign, date_index, rf = p.x_panel, p.y_panel, p.x_sign, p.dates, p.rf
    t_rows = len(date_index)

    # Rows: (ticker, date) with both (excess) returns, ticker-major.
    keep = np.isfinite(ye_nt) & np.isfinite(xe_nt)
    anchors: list[Tensor] | None = None
    if from_date is not None:
        if w == 0:
            raise ConfigError(
                "from_date needs a rolling window (window > 0): a full-sample fit changes every row"
            )
        first = int(date_index.searchsorted(pd.Timestamp(from_date)))
        # The fits' centres and scales from the whole panel, then the rows from the block of
        # `w` rows before the first wanted one: the wanted rows' windows lie inside them, and
        # block boundaries stay where the whole panel has them.
        anchors = _window_anchors(x_panel, y_panel, x_sign)
        start = max(0, (first // w - 1) * w)
        x_panel, y_panel, x_sign = x_panel[start:], y_panel[start:], x_sign[start:]
        x_nt, y_nt, xe_nt = x_nt[:, start:], y_nt[:, start:], xe_nt[:, start:]
        if rf is not None:
            rf_nt = rf_nt[:, start:]
        date_index = date_index[start:]
        keep = keep[:, start:].copy()
        keep[:, : first - start] = False
        t_rows -= start
    counts = keep.sum(axis=1)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    n_rows = int(offsets[-1])
    block = np.empty((len(FLOAT_COLUMNS), n_rows), dtype=np.float64)
    n_obs = np.empty(n_rows, dtype=np.int64)
    # Each ticker's last row with a return: its latest fit (-1: none).
    last_row = (
        np.where(counts > 0, t_rows - 1 - np.argmax(keep[:, ::-1], axis=1), -1)
        if t_rows
        else np.full(n_cols, -1, dtype=np.int64)
    )
    # Groups of tickers bound the memory of the per-day [T, N] results (the kernels chunk
    # further, for the cache); the table is filled group by group.
    cells = _GROUP_CELLS if resolve_device(device).type == "cpu" else _DEVICE_GROUP_CELLS
    group = max(1, cells // max(t_rows, 1))
    for g0 in range(0, n_cols, group):
        g1 = min(n_cols, g0 + group)
        lo, hi, k = int(offsets[g0]), int(offsets[g1]), keep[g0:g1]
        columns = _group_columns(
            x_panel[:, g0:g1],
            y_panel[:, g0:g1],
            x_sign[:, g0:g1],
            window=w,
            min_obs=m,
            level=level,
            device=device,
            se=se_type,
            hac_lags=lags,
            huber=huber,
            last_row=torch.from_numpy(last_row[g0:g1].copy()),
            anchors=None if anchors is None else [a[:, g0:g1] for a in anchors],
        )
        columns["index_return"] = x_nt[g0:g1]
        columns["stock_return"] = y_nt[g0:g1]
        columns["risk_free_return"] = np.zeros((g1 - g0, t_rows)) if rf is None else rf_nt[g0:g1]
        rank: np.ndarray[Any, Any] | None = None
        for i, name in enumerate(FLOAT_COLUMNS):
            value = columns[name]
            if isinstance(value, _Cells):
                # Where each cell lands among the group's kept rows (ticker-major).
                if rank is None:
                    c = value.cols.to("cpu").numpy()
                    r = value.rows.to("cpu").numpy()
                    before = np.cumsum(k[c], axis=1)[np.arange(c.size), r] - 1
                    rank = lo + (offsets[g0 + c] - offsets[g0]) + before
                block[i, lo:hi] = np.nan
                block[i, rank] = value.values.to("cpu").numpy()
            else:
                block[i, lo:hi] = _ticker_major_numpy(value)[k]
        n_obs[lo:hi] = _ticker_major_numpy(columns["n_obs"])[k]
        del columns

    frame = pd.DataFrame(block.T, columns=list(FLOAT_COLUMNS), copy=False)
    frame.insert(0, "n_obs", n_obs)
    frame.insert(0, "window", np.full(n_rows, w, dtype=np.int64))
    codes = np.repeat(np.arange(n_cols, dtype=np.int64), counts)
    ticker_col = pa.array(names, type=pa.large_string()).take(pa.array(codes))
    frame.insert(0, "ticker", pd.Series(ticker_col, dtype="str"))
    date_values = date_index.to_numpy(dtype="datetime64[ns]")
    frame.insert(0, "date", np.broadcast_to(date_values[None, :], (n_cols, t_rows))[keep])
    frame.insert(
        OUTPUT_COLUMNS.index("se_type"), "se_type", pd.Series(se_type, index=frame.index, dtype="str")
    )
    return frame


@dataclass(frozen=True, eq=False)
class _Panels:
    """The inputs of the fits, as :func:`sensitivity_frame` lays them out."""

    dates: pd.DatetimeIndex
    rf: np.ndarray[Any, Any] | None  # [T] or [T, N] risk-free returns, or None
    x_nt: np.ndarray[Any, Any]  # [N, T] raw index returns (the table's column)
    y_nt: np.ndarray[Any, Any]  # [N, T] raw stock returns
    rf_nt: np.ndarray[Any, Any]  # [N, T] risk-free returns ([1, 1] zeros without)
    xe_nt: np.ndarray[Any, Any]  # [N, T] excess index returns
    ye_nt: np.ndarray[Any, Any]  # [N, T] excess stock returns
    x_panel: Tensor  # [T, N] what the fits regress on (excess index returns)
    y_panel: Tensor  # [T, N] what they explain (excess stock returns)
    x_sign: Tensor  # [T, N] raw index returns: their sign picks the up and down days


def _prepare_panels(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], rf: np.ndarray[Any, Any] | None, dates: pd.DatetimeIndex
) -> _Panels:
    """The fits' panels from checked float64 arrays (``x`` ``[T]`` or ``[T, N]``, ``y`` ``[T, N]``)."""
    t_rows, n_cols = y.shape
    date_index = dates
    if x.ndim == 1:
        # One index for all stocks: its trading calendar is where it has a return.
        present = np.isfinite(x)
        if not present.all():
            # Drop the rows, keeping the stock panel ticker-major (column-major [T, N]).
            x, y, date_index = x[present], y.T[:, present].T, date_index[present]
            if rf is not None:
                rf = rf[present] if rf.ndim == 1 else rf.T[:, present].T
            t_rows = int(present.sum())
    # [N, T] views of the raw returns (the table's columns) and the risk-free returns.
    x_nt = np.broadcast_to(x[None, :], (n_cols, t_rows)) if x.ndim == 1 else x.T
    y_nt = y.T
    if rf is None:
        rf_nt: np.ndarray[Any, Any] = np.zeros((1, 1))
        xe_nt, ye_nt = x_nt, y_nt
    else:
        rf_nt = np.broadcast_to(rf[None, :], (n_cols, t_rows)) if rf.ndim == 1 else rf.T
        # Excess returns, ticker-major; a missing rate drops the day (NaN).
        xe_nt = np.ascontiguousarray(x_nt - rf_nt)
        ye_nt = np.ascontiguousarray(y_nt - rf_nt)
    x_panel = torch.from_numpy(np.asarray(xe_nt)).T if rf is not None or x.ndim == 2 else None
    if x_panel is None:
        x_panel = torch.from_numpy(x)[:, None].expand(t_rows, n_cols)
    y_panel = torch.from_numpy(np.asarray(ye_nt)).T
    # Up and down days are those the index itself rose or fell (raw returns).
    x_sign = torch.from_numpy(np.array(x_nt, dtype=np.float64, order="C")).T
    return _Panels(date_index, rf, x_nt, y_nt, rf_nt, xe_nt, ye_nt, x_panel, y_panel, x_sign)


def fit_anchors(
    stock_returns: pd.DataFrame,
    index_returns: pd.Series | pd.DataFrame,
    *,
    risk_free: pd.Series | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The centres and scales of the rolling fits of :func:`quadratic_sensitivity` per ticker.

    One row per ticker (the columns of ``stock_returns``), twelve float64 columns: ``cx, kx,
    cy, ky`` (:func:`~sensitivity.model.rolling_anchors`) of the quadratic fit, then of the up
    days' and the down days' fits.  They come from each ticker's first
    :data:`~sensitivity.model.CENTRE_ROWS` rows of data: a row's results depend on its
    window's data and on these, so a store of past rows can tell whether a recomputation
    would give the same bits.  Same inputs as :func:`quadratic_sensitivity`.
    """
    dates, tickers, y, x = _validated_panels(stock_returns, index_returns)
    rf = _validated_risk_free(risk_free, stock_returns, dates, tickers)
    p = _prepare_panels(
        _as_float64(x, "index_returns"),
        _as_float64(y, "stock_returns"),
        None if rf is None else _as_float64(rf, "risk_free"),
        _as_dates(dates, "dates"),
    )
    values = torch.cat(_window_anchors(p.x_panel, p.y_panel, p.x_sign)).T.numpy()
    names = [f"{fit}_{k}" for fit in ("quadratic", "up", "down") for k in ("cx", "kx", "cy", "ky")]
    return pd.DataFrame(values, index=pd.Index(tickers, name="ticker"), columns=names)


def _group_columns(
    xg: Tensor,
    yg: Tensor,
    x_sign: Tensor,
    *,
    window: int,
    min_obs: int,
    level: float,
    device: torch.device | str | None,
    se: str,
    hac_lags: int | None,
    huber: HuberMode,
    last_row: Tensor,
    anchors: Sequence[Tensor] | None = None,
) -> dict[str, Any]:
    """Every fitted ``[T, n]`` column of one group of tickers (``xg``, ``yg``: excess returns).

    ``anchors``: the fits' centres and scales (:func:`_window_anchors`) when the rows are a
    later stretch of a longer panel.
    """
    main, up, down = (None, None, None) if anchors is None else anchors
    fit = quadratic_fit(xg, yg, window=window, min_obs=min_obs, device=device, anchors=main)
    dev = fit.beta.device
    xd = xg.to(dev)
    inference = robust_covariance(xd, yg.to(dev), fit, se=se, hac_lags=hac_lags)
    sens = daily_sensitivity(fit, xd, level=level, inference=inference)
    tests = coefficient_tests(fit, inference)
    crit = information_criteria(fit)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
    # Up / down betas: the plain linear slope over the window's days the index rose / fell.
    # Each side's fit is dropped as soon as its slope is taken, so that the next one reuses
    # its memory (fresh memory costs more than the arithmetic at this size).
    side_min = up_down_min_obs(min_obs)
    signs = x_sign.to(dev)
    side_betas = []
    for side, side_anchors in ((signs > 0, up), (signs < 0, down)):
        one_side = quadratic_fit(
            torch.where(side, xd, nan), yg, window=window, min_obs=side_min, device=dev, anchors=side_anchors
        )
        side_betas.append(torch.where(fit.valid, one_side.linear_beta, nan))
        del one_side
    up_beta, down_beta = side_betas
    cov = inference.cov_unique
    out: dict[str, Any] = {
        "n_obs": fit.n_obs,
        "alpha": fit.alpha,
        "beta": fit.beta,
        "gamma": fit.gamma,
        "sensitivity": sens.sensitivity,
        "sensitivity_se": sens.sensitivity_se,
        "sensitivity_ci_lower": sens.sensitivity_ci_lower,
        "sensitivity_ci_upper": sens.sensitivity_ci_upper,
        "alpha_se": inference.alpha_se,
        "beta_se": inference.beta_se,
        "gamma_se": inference.gamma_se,
        "linear_beta": fit.linear_beta,
        "r2": fit.r2,
        "cov_alpha_beta": cov[..., 1],
        "cov_alpha_gamma": cov[..., 2],
        "cov_beta_gamma": cov[..., 4],
        "gamma_t": tests.gamma_t,
        "gamma_p": tests.gamma_p,
        "aic_linear": crit.aic_linear,
        "aic_quadratic": crit.aic_quadratic,
        "delta_aic": crit.delta_aic,
        "secant_slope": fit.beta + fit.gamma * xd,
        "up_beta": up_beta,
        "down_beta": down_beta,
    }
    out.update(_huber_columns(xd, yg.to(dev), fit, huber=huber, last_row=last_row, level=level))
    return out


def _window_anchors(x: Tensor, y: Tensor, x_sign: Tensor) -> list[Tensor]:
    """:func:`~sensitivity.model.rolling_anchors` of the three rolling fits of
    :func:`_group_columns` (the quadratic fit, the up days' and the down days'), ``[4, N]`` each."""
    nan = torch.tensor(math.nan, dtype=torch.float64)
    x64 = x.to(torch.float64)
    return [
        rolling_anchors(x64, y),
        rolling_anchors(torch.where(x_sign > 0, x64, nan), y),
        rolling_anchors(torch.where(x_sign < 0, x64, nan), y),
    ]


def _huber_columns(
    x: Tensor, y: Tensor, fit: QuadraticFit, *, huber: HuberMode, last_row: Tensor, level: float
) -> dict[str, Any]:
    """The ``huber_*`` columns: Huber fits of the chosen windows, NaN elsewhere."""
    t_rows, n_cols = fit.shape
    if huber == "none" or t_rows == 0 or n_cols == 0:
        empty = torch.full(fit.shape, math.nan, dtype=torch.float64)
        return dict.fromkeys(HUBER_COLUMNS, empty)
    if huber == "latest" and fit.window != 0:
        return _latest_huber_columns(x, y, fit, last_row=last_row, level=level)
    rows = None if huber == "all" else last_row
    alpha, beta, gamma, cov = huber_rolling(x, y, fit, rows=rows)
    return _huber_outputs(fit, x, alpha, beta, gamma, cov, level=level)


def _huber_outputs(
    fit: QuadraticFit, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, cov: Tensor, *, level: float
) -> dict[str, Tensor]:
    """The ``huber_*`` columns from Huber coefficients and covariances in the shape of ``fit``
    (whose ``n_obs`` and ``dof`` the sensitivity's interval uses)."""
    hfit = replace(
        fit,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        cov_unique=cov,
        alpha_se=cov[..., 0].clamp(min=0.0).sqrt(),
        beta_se=cov[..., 3].clamp(min=0.0).sqrt(),
        gamma_se=cov[..., 5].clamp(min=0.0).sqrt(),
    )
    sens = daily_sensitivity(hfit, x, level=level)
    return {
        "huber_alpha": alpha,
        "huber_beta": beta,
        "huber_gamma": gamma,
        "huber_alpha_se": hfit.alpha_se,
        "huber_beta_se": hfit.beta_se,
        "huber_gamma_se": hfit.gamma_se,
        "huber_cov_alpha_beta": cov[..., 1],
        "huber_cov_alpha_gamma": cov[..., 2],
        "huber_cov_beta_gamma": cov[..., 4],
        "huber_sensitivity": sens.sensitivity,
        "huber_sensitivity_se": sens.sensitivity_se,
    }


@dataclass(frozen=True, eq=False)
class _Cells:
    """A column of the table that is NaN but at a few cells: ``values[i]`` at (``rows[i]``,
    ``cols[i]``) of the ``[T, n]`` group (int64 / float64 tensors)."""

    cols: Tensor
    rows: Tensor
    values: Tensor


def _latest_huber_columns(
    x: Tensor, y: Tensor, fit: QuadraticFit, *, last_row: Tensor, level: float
) -> dict[str, Any]:
    """The ``huber_*`` columns of each ticker's last fitted row only, as :class:`_Cells`.

    The same numbers as :func:`~sensitivity.robust.huber_rolling` with ``rows=last_row``
    followed by :func:`~sensitivity.sensitivity.daily_sensitivity`, without ``[T, n]``
    planes that would be NaN but at ``n`` cells.
    """
    dev = fit.beta.device
    rows = last_row.to(dev)
    cols = torch.arange(rows.numel(), device=dev)
    cols, rows = cols[rows >= 0], rows[rows >= 0]
    fitted = fit.valid[rows, cols]
    cols, rows = cols[fitted], rows[fitted]
    h = huber_cells(x, y, fit, cols, rows)  # [9, M]

    def at_cells(v: Tensor) -> Tensor:
        return v[rows, cols][None]  # [1, M]: the cells as a one-row panel

    # The OLS fit at the cells; _huber_outputs replaces its coefficients with the Huber ones.
    cell_fit = replace(
        fit,
        n_obs=at_cells(fit.n_obs),
        alpha=at_cells(fit.alpha),
        beta=at_cells(fit.beta),
        gamma=at_cells(fit.gamma),
        cov_unique=at_cells(fit.cov_unique),
        alpha_se=at_cells(fit.alpha_se),
        beta_se=at_cells(fit.beta_se),
        gamma_se=at_cells(fit.gamma_se),
        rss=at_cells(fit.rss),
        r2=at_cells(fit.r2),
        linear_beta=at_cells(fit.linear_beta),
        dof=at_cells(fit.dof),
    )
    named = _huber_outputs(
        cell_fit, at_cells(x), h[0][None], h[1][None], h[2][None], h[3:].T[None], level=level
    )
    return {name: _Cells(cols, rows, value[0]) for name, value in named.items()}


def _ticker_major_numpy(v: Any) -> np.ndarray[Any, Any]:
    """A ``[T, N]`` tensor (or an ``[N, T]`` numpy array) as an ``[N, T]`` numpy view."""
    if isinstance(v, Tensor):
        return np.asarray(v.detach().to("cpu").T.numpy())
    return np.asarray(v)


def _as_float64(v: object, name: str) -> np.ndarray[Any, Any]:
    """A numpy float64 array from a numpy array or torch tensor (no copy when possible)."""
    if isinstance(v, Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise DataValidationError(f"{name} must hold real numbers, got dtype {v.dtype}")
        arr = v.detach().to("cpu", torch.float64).numpy()
    elif isinstance(v, np.ndarray):
        if v.dtype.kind not in "fiu":
            raise DataValidationError(f"{name} must hold numbers, got dtype {v.dtype}")
        arr = np.asarray(v, dtype=np.float64)
    else:
        raise DataValidationError(f"{name} must be a numpy array or torch tensor, got {type(v).__name__}")
    if not arr.flags.writeable:  # torch.from_numpy needs a writeable buffer
        arr = arr.copy()
    if np.isinf(arr).any():
        raise DataValidationError(f"{name} holds infinite values; returns must be finite or NaN")
    return arr


def _as_dates(v: object, name: str) -> pd.DatetimeIndex:
    """A tz-naive ``DatetimeIndex`` from dates or date-like values (tz-aware: local wall time)."""
    if isinstance(v, pd.DatetimeIndex):
        idx = v
    else:
        try:
            idx = pd.DatetimeIndex(pd.to_datetime(cast(Any, v)))
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataValidationError(
                f"{name} must be dates (a DatetimeIndex or convertible): {exc}"
            ) from exc
    if idx.tz is not None:
        idx = idx.tz_localize(None)
    if idx.hasnans:
        raise DataValidationError(f"{name} contains a missing date (NaT)")
    return idx


def _validated_panels(
    stock_returns: object, index_returns: object
) -> tuple[pd.DatetimeIndex, list[str], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Check the labelled inputs and return (dates, tickers, y [T, N], x [T] or [T, N])."""
    if not isinstance(stock_returns, pd.DataFrame):
        raise DataValidationError(
            f"stock_returns must be a pandas DataFrame (dates x tickers), got {type(stock_returns).__name__}"
        )
    if not isinstance(index_returns, pd.Series | pd.DataFrame):
        raise DataValidationError(
            "index_returns must be a pandas Series (or a DataFrame of per-stock aligned index "
            f"returns), got {type(index_returns).__name__}"
        )
    tickers = _tickers(stock_returns)
    stock = _dated(stock_returns, "stock_returns")
    index = _dated(index_returns, "index_returns")
    if not stock.index.equals(index.index):
        raise DataValidationError(_date_mismatch(stock.index, index.index))
    if isinstance(index, pd.DataFrame):
        itick = _tickers(index, "index_returns")
        if set(itick) != set(tickers):
            missing = [t for t in tickers if t not in set(itick)]
            extra = [t for t in itick if t not in set(tickers)]
            raise DataValidationError(
                "index_returns (a DataFrame) must have the same ticker columns as stock_returns; "
                f"missing: {missing[:5]}, unexpected: {extra[:5]}"
            )
        if itick != tickers:
            index = index[tickers]
    y = _numeric(stock, "stock_returns")
    x = _numeric(index, "index_returns")
    return pd.DatetimeIndex(stock.index), tickers, y, x


def _tickers(frame: pd.DataFrame, name: str = "stock_returns") -> list[str]:
    cols = frame.columns.tolist()
    for c in cols:
        if not isinstance(c, str):
            raise DataValidationError(
                f"{name} column names must be ticker strings, got {c!r} ({type(c).__name__})"
            )
    if len(set(cols)) != len(cols):
        dup = next(c for i, c in enumerate(cols) if c in cols[:i])
        raise DataValidationError(f"{name} has the ticker {dup!r} more than once")
    return cols


def _dated(obj: pd.Series | pd.DataFrame, name: str) -> Any:
    """``obj`` on a sorted, unique, tz-naive DatetimeIndex (sorted here when it is not)."""
    idx = obj.index
    if not isinstance(idx, pd.DatetimeIndex) and (
        pd.api.types.is_numeric_dtype(idx.dtype) or pd.api.types.is_bool_dtype(idx.dtype)
    ):
        # Numbers would "convert" to nanoseconds since 1970: refuse them.
        raise DataValidationError(
            f"{name} index must be dates (a DatetimeIndex or date strings), got {idx.dtype} values"
        )
    idx = _as_dates(idx, f"{name} index")
    if idx.has_duplicates:
        dup = idx[idx.duplicated()][0]
        raise DataValidationError(f"{name} has the date {dup.date()} more than once (dates must be unique)")
    out = obj.set_axis(idx, axis=0) if idx is not obj.index else obj
    if not idx.is_monotonic_increasing:
        out = out.sort_index()
    return out


def _date_mismatch(a: pd.DatetimeIndex, b: pd.DatetimeIndex, other: str = "index_returns") -> str:
    only_a = a.difference(b)
    only_b = b.difference(a)
    parts = []
    if len(only_a):
        parts.append(f"{len(only_a)} date(s) only in stock_returns (first {only_a[0].date()})")
    if len(only_b):
        parts.append(f"{len(only_b)} date(s) only in {other} (first {only_b[0].date()})")
    return f"{other} must have the same dates as stock_returns: " + "; ".join(parts)


def _validated_risk_free(
    risk_free: object, stock_returns: pd.DataFrame, dates: pd.DatetimeIndex, tickers: list[str]
) -> np.ndarray[Any, Any] | None:
    """The risk-free returns as ``[T]`` or ``[T, N]`` float64 on ``dates`` (None if not given)."""
    if risk_free is None:
        return None
    if not isinstance(risk_free, pd.Series | pd.DataFrame):
        raise DataValidationError(
            "risk_free must be a pandas Series (or a DataFrame with the stock columns) of "
            f"risk-free returns, got {type(risk_free).__name__}"
        )
    rf = _dated(risk_free, "risk_free")
    if not rf.index.equals(dates):
        raise DataValidationError(_date_mismatch(dates, pd.DatetimeIndex(rf.index), "risk_free"))
    if isinstance(rf, pd.DataFrame):
        cols = _tickers(rf, "risk_free")
        if set(cols) != set(tickers):
            raise DataValidationError(
                "risk_free (a DataFrame) must have the same ticker columns as stock_returns"
            )
        rf = rf[tickers]
    return _numeric(rf, "risk_free")


def _numeric(obj: pd.Series | pd.DataFrame, name: str) -> np.ndarray[Any, Any]:
    """float64 values of a Series ([T]) or DataFrame ([T, N]); refuse non-numbers and infinities."""
    frame = obj.to_frame() if isinstance(obj, pd.Series) else obj
    for col, dtype in frame.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            where = "" if isinstance(obj, pd.Series) else f" column {col!r}"
            raise DataValidationError(f"{name}{where} must hold numbers, got dtype {dtype}")
    try:
        if all(dtype == np.float64 for dtype in frame.dtypes):
            values = frame.to_numpy(dtype=np.float64)  # NaN already marks missing
        else:
            values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataValidationError(f"{name} cannot be read as float64 numbers: {exc}") from exc
    # Ticker-major memory (column-major [T, N]), the layout of pandas' own blocks and of the
    # kernels; an own, writeable copy only when pandas hands out a read-only view.
    if not values.flags.writeable or not values.flags.f_contiguous:
        values = np.array(values, dtype=np.float64, order="F", copy=True)
    inf = np.isinf(values)
    if inf.any():
        r, c = (int(v[0]) for v in np.nonzero(inf))
        date = frame.index[r].date()
        where = f"on {date}" if isinstance(obj, pd.Series) else f"for {frame.columns[c]} on {date}"
        raise DataValidationError(f"{name} has an infinite value {where} (returns must be finite or NaN)")
    return values[:, 0] if isinstance(obj, pd.Series) else values
