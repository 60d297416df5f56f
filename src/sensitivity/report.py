"""Tables, charts and the HTML report: frames in, frames, figures and bytes out.

Nothing here reads or writes files, talks to the network or imports Prefect; the store writes
what these functions return.

* :func:`summary_table` picks each (``index_ticker``, ``ticker``, ``window``) combination's
  latest day from the per-day sensitivity table and stamps it with ``as_of``.
* :func:`characteristic_curve` gathers what the scatter chart of one combination shows: the
  returns the latest fit used, the fitted quadratic, the linear fit of the same points and,
  where the stored standard errors allow it, the 95% confidence band of the fitted quadratic.
* :func:`characteristic_curve_figure`, :func:`sensitivity_history_figure` and
  :func:`sparkline_figure` draw one combination (matplotlib ``Figure`` objects, rendered by the
  Agg canvas; no pyplot global state), :func:`figure_png` turns a figure into PNG bytes.
* :func:`render_report` assembles a self-contained HTML page (PNG charts embedded as base64
  data URIs, no external CSS, JS or fonts); every piece of text that comes from data or the
  manifest is HTML-escaped.

Returns are simple daily returns as decimal fractions in the frames and are shown in percent
in the charts; sensitivity and betas are unitless (stock % per index %).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "KEY_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "CharacteristicCurve",
    "characteristic_curve",
    "characteristic_curve_figure",
    "figure_png",
    "render_report",
    "sensitivity_history_figure",
    "sparkline_figure",
    "summary_table",
]

FloatArray = npt.NDArray[np.float64]
ChartKind = Literal["sparkline", "characteristic", "sensitivity"]

#: The columns that identify one fitted series.
KEY_COLUMNS: Final[tuple[str, ...]] = ("index_ticker", "ticker", "window")

#: The per-day table's columns, in the order of ``reports/sensitivity/`` (docs/schema.md).
SENSITIVITY_COLUMNS: Final[tuple[str, ...]] = (
    "date",
    "index_ticker",
    "ticker",
    "window",
    "n_obs",
    "index_return",
    "stock_return",
    "alpha",
    "beta",
    "gamma",
    "sensitivity",
    "sensitivity_se",
    "sensitivity_ci_lower",
    "sensitivity_ci_upper",
    "alpha_se",
    "beta_se",
    "gamma_se",
    "linear_beta",
    "r2",
    "close",
    "prev_close",
    "dollar_sensitivity",
)

_SUMMARY_REQUIRED: Final[tuple[str, ...]] = ("date", *KEY_COLUMNS, "sensitivity")

#: Two-sided 95% normal quantile; used when the table's intervals do not reveal their own.
_Z95: Final[float] = 1.959963984540054
#: Relative tolerance within which recomputed classical standard errors must match the stored
#: ones before the report draws a confidence band from the recomputed covariance.
_SE_RTOL: Final[float] = 1e-6

CHART_DPI: Final[int] = 90
CHART_SIZE: Final[tuple[float, float]] = (6.2, 4.4)
#: Palette size of the embedded PNGs (see :func:`figure_png`).
PNG_COLORS: Final[int] = 128
SPARK_DPI: Final[int] = 100
SPARK_SIZE: Final[tuple[float, float]] = (1.6, 0.36)
#: Calendar days of history a sparkline shows.
SPARK_DAYS: Final[int] = 365

_C_POINTS: Final[str] = "#4c72b0"
_C_QUAD: Final[str] = "#c44e52"
_C_LINEAR: Final[str] = "#555555"
_C_TODAY: Final[str] = "#dd8452"
_C_SENS: Final[str] = "#1f5fa8"


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _checked_frame(frame: object, name: str, required: Sequence[str]) -> pd.DataFrame:
    """Return ``frame`` if it is a non-empty DataFrame with ``required`` columns; raise otherwise."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ValueError(
            f"{name} is empty: there are no rows to report (did every ticker fail, or is the "
            "date range shorter than two trading days?)"
        )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {', '.join(missing)}")
    return frame


def _timestamps(values: pd.Series, name: str) -> pd.Series:
    """``values`` (datetime64 or ``datetime.date`` objects) as tz-naive datetime64 values."""
    try:
        out = pd.to_datetime(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold dates, got dtype {values.dtype}") from exc
    if out.isna().any():
        raise ValueError(f"{name} has {int(out.isna().sum())} missing date(s); every row needs a date")
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_localize(None)
    return out


def _to_date(value: Any) -> dt.date:
    return pd.Timestamp(value).date()


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def summary_table(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """One row per (``index_ticker``, ``ticker``, ``window``): the latest day of each combination.

    ``as_of`` (a :class:`datetime.date`) is the last date of the whole frame and comes first;
    the other columns follow in the order of ``sensitivity``.  A ticker whose last row is
    older than ``as_of`` (it stopped trading) keeps that last row; its ``date`` shows how old
    it is.  Rows are sorted by ``index_ticker``, ``window``, then ``sensitivity`` descending
    (missing values last) and ``ticker``.

    Raises ``ValueError`` when the frame is empty, lacks a column, has a missing date or
    holds two rows for the same combination and date.
    """
    frame = _checked_frame(sensitivity, "sensitivity", _SUMMARY_REQUIRED)
    if "as_of" in frame.columns:
        raise ValueError("sensitivity already has an as_of column; pass the per-day table, not a summary")
    days = _timestamps(frame["date"], "sensitivity.date")
    keyed = frame.assign(_day=days.to_numpy())
    dup = keyed.duplicated([*KEY_COLUMNS, "_day"])
    if dup.any():
        first = keyed.loc[dup].iloc[0]
        raise ValueError(
            "sensitivity has more than one row for index_ticker="
            f"{first['index_ticker']!r}, ticker={first['ticker']!r}, window={first['window']!r}, "
            f"date={_to_date(first['_day'])}; each combination needs one row per date"
        )
    as_of = _to_date(days.max())
    latest = (
        keyed.sort_values([*KEY_COLUMNS, "_day"], kind="stable")
        .groupby(list(KEY_COLUMNS), sort=False)
        .tail(1)
        .drop(columns="_day")
        .sort_values(
            ["index_ticker", "window", "sensitivity", "ticker"],
            ascending=[True, True, False, True],
            na_position="last",
            kind="stable",
        )
        .reset_index(drop=True)
    )
    latest.insert(0, "as_of", pd.Series([as_of] * len(latest), dtype=object))
    return latest


# --------------------------------------------------------------------------------------------
# The characteristic curve of one combination
# --------------------------------------------------------------------------------------------


def _one_combination(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` checked to hold exactly one combination, sorted by date, dates as datetime64."""
    frame = _checked_frame(history, "history", SENSITIVITY_COLUMNS)
    combos = frame[list(KEY_COLUMNS)].drop_duplicates()
    if len(combos) != 1:
        raise ValueError(
            f"history must hold one (index_ticker, ticker, window) combination, got {len(combos)}"
        )
    out = frame.assign(date=_timestamps(frame["date"], "history.date"))
    return out.sort_values("date", kind="stable").reset_index(drop=True)


def _record(row: pd.Series) -> dict[str, Any]:
    """One row as a ``{column: value}`` dict."""
    return {str(k): v for k, v in row.items()}


def _floats(series: pd.Series) -> FloatArray:
    return np.asarray(series.to_numpy(dtype="float64", na_value=np.nan), dtype=np.float64)


def _critical_value(row: Mapping[str, Any]) -> float:
    """The quantile the table's sensitivity interval used (``(upper - lower) / (2 se)``)."""
    try:
        width = float(row["sensitivity_ci_upper"]) - float(row["sensitivity_ci_lower"])
        crit = width / (2.0 * float(row["sensitivity_se"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return _Z95
    return crit if math.isfinite(crit) and crit > 0 else _Z95


@dataclass(frozen=True, eq=False)
class CharacteristicCurve:
    """The latest fit of one combination, with the sample it was fitted on.

    Returns are decimal fractions.  ``covariance`` is the classical OLS covariance of
    (alpha, beta, gamma), rebuilt from the sample and the fitted coefficients; it is ``None``
    (and ``band_note`` says why) unless its standard errors match the stored ones, so a band
    is only drawn when it is the band of the fit the table reports.
    """

    index_ticker: str
    ticker: str
    window: int
    #: Dates, index returns and stock returns of the latest fit's sample.
    dates: pd.DatetimeIndex
    index_return: FloatArray
    stock_return: FloatArray
    #: The latest row's date, index return, stock return and coefficients (NaN: no fit).
    today: dt.date
    today_index_return: float
    today_stock_return: float
    alpha: float
    beta: float
    gamma: float
    sensitivity: float
    #: ``numpy.polyfit(index_return, stock_return, 1)`` of the same sample (NaN: too few points).
    linear_slope: float
    linear_intercept: float
    covariance: FloatArray | None
    critical_value: float
    band_note: str

    @property
    def has_fit(self) -> bool:
        """Whether the latest day has fitted coefficients."""
        return all(math.isfinite(v) for v in (self.alpha, self.beta, self.gamma))

    @property
    def n(self) -> int:
        """Number of points in the sample."""
        return int(self.index_return.size)

    def fitted(self, x: npt.ArrayLike) -> FloatArray:
        """The fitted quadratic ``alpha + beta x + gamma x^2`` at index returns ``x``."""
        xs = np.asarray(x, dtype=np.float64)
        return np.asarray(self.alpha + self.beta * xs + self.gamma * xs * xs, dtype=np.float64)

    def fitted_se(self, x: npt.ArrayLike) -> FloatArray | None:
        """Standard error of the fitted mean at ``x`` (``sqrt(g' C g)``, ``g = (1, x, x^2)``)."""
        if self.covariance is None:
            return None
        xs = np.asarray(x, dtype=np.float64)
        g = np.stack([np.ones_like(xs), xs, xs * xs], axis=-1)
        var = np.einsum("...i,ij,...j->...", g, self.covariance, g)
        return np.asarray(np.sqrt(np.maximum(var, 0.0)), dtype=np.float64)

    def band(self, x: npt.ArrayLike) -> tuple[FloatArray, FloatArray] | None:
        """Lower and upper bounds of the confidence band of the fitted mean at ``x``."""
        se = self.fitted_se(x)
        if se is None:
            return None
        mid = self.fitted(x)
        return mid - self.critical_value * se, mid + self.critical_value * se


def _classical_covariance(x: FloatArray, y: FloatArray, coef: FloatArray) -> FloatArray | None:
    """``s^2 (X'X)^-1`` for ``X = [1, x, x^2]`` and the given coefficients; ``None`` if singular."""
    n = x.size
    if n <= 3:
        return None
    design = np.column_stack([np.ones_like(x), x, x * x])
    resid = y - design @ coef
    s2 = float(resid @ resid) / (n - 3)
    scale = np.linalg.norm(design, axis=0)
    if not np.all(scale > 0):
        return None
    # (X'X)^-1 = D (R'R)^-1 D with X D = Q R: column scaling keeps the 3x3 inverse accurate.
    _, r = np.linalg.qr(design / scale)
    diag = np.abs(np.diag(r))
    if diag.min() <= 1e-12 * diag.max():
        return None
    r_inv = np.linalg.inv(r)
    xtx_inv = (r_inv @ r_inv.T) / np.outer(scale, scale)
    return np.asarray(s2 * xtx_inv, dtype=np.float64)


def characteristic_curve(history: pd.DataFrame) -> CharacteristicCurve:
    """The latest fit of one combination and the sample of returns it was fitted on.

    The sample is the last ``n_obs`` rows with both returns (the stock's returns inside the
    latest window), or every such row for ``window == 0``; when the latest day has no fit,
    the last ``window`` rows (all rows for ``window == 0``) are returned for the scatter.
    The linear fit is ``numpy.polyfit`` of degree 1 on the same points (its slope equals the
    table's ``linear_beta``).  The confidence band is rebuilt from the sample as the classical
    OLS covariance and kept only when its standard errors equal the stored ``alpha_se``,
    ``beta_se``, ``gamma_se`` (relative tolerance 1e-6); its quantile is the one the table's
    sensitivity interval used.
    """
    frame = _one_combination(history)
    last = frame.iloc[-1]
    window = int(last["window"])
    x_all = _floats(frame["index_return"])
    y_all = _floats(frame["stock_return"])
    usable = np.flatnonzero(np.isfinite(x_all) & np.isfinite(y_all))
    coef = np.array([float(last["alpha"]), float(last["beta"]), float(last["gamma"])], dtype=np.float64)
    fitted = bool(np.all(np.isfinite(coef)))
    n_obs = float(last["n_obs"])
    if window == 0:
        sample = usable
    elif fitted and math.isfinite(n_obs) and n_obs > 0:
        sample = usable[-int(n_obs) :]
    else:
        sample = usable[usable >= len(frame) - window]
    x = x_all[sample]
    y = y_all[sample]

    slope = intercept = math.nan
    if x.size >= 2 and np.ptp(x) > 0:
        slope, intercept = (float(v) for v in np.polyfit(x, y, 1))

    covariance: FloatArray | None = None
    if not fitted:
        note = "no fit on the latest day"
    else:
        stored = np.array([float(last[c]) for c in ("alpha_se", "beta_se", "gamma_se")], dtype=np.float64)
        candidate = _classical_covariance(x, y, coef)
        if candidate is None:
            note = "confidence band omitted: the sample is too small or singular"
        elif not np.all(np.isfinite(stored)):
            note = "confidence band omitted: the table has no standard errors for this fit"
        elif np.allclose(np.sqrt(np.diag(candidate)), stored, rtol=_SE_RTOL, atol=0.0):
            covariance = candidate
            note = ""
        else:
            note = (
                "confidence band omitted: the stored standard errors are not the classical OLS "
                "ones of this sample, whose full covariance the report cannot rebuild"
            )
    dates = pd.DatetimeIndex(frame["date"].to_numpy()[sample])
    return CharacteristicCurve(
        index_ticker=str(last["index_ticker"]),
        ticker=str(last["ticker"]),
        window=window,
        dates=dates,
        index_return=x,
        stock_return=y,
        today=_to_date(last["date"]),
        today_index_return=float(last["index_return"]),
        today_stock_return=float(last["stock_return"]),
        alpha=float(coef[0]),
        beta=float(coef[1]),
        gamma=float(coef[2]),
        sensitivity=float(last["sensitivity"]),
        linear_slope=slope,
        linear_intercept=intercept,
        covariance=covariance,
        critical_value=_critical_value(_record(last)),
        band_note=note,
    )


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def _mpl_text(text: object) -> str:
    """``text`` safe for matplotlib (a ``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _window_label(window: int) -> str:
    if window == 0:
        return "full sample"
    return f"rolling {window} index trading days"


def _date_axis(ax: Axes) -> None:
    locator = AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def _empty_note(ax: Axes, text: str) -> None:
    ax.text(
        0.5, 0.5, _mpl_text(text), transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.3"
    )


def characteristic_curve_figure(history: pd.DataFrame) -> Figure:
    """Scatter of the stock's against the index's daily returns over the latest window.

    Draws the points of the latest fit's sample, today's point, the fitted quadratic
    (latest alpha, beta, gamma) with its 95% confidence band where :func:`characteristic_curve`
    could rebuild it, the linear fit of the same points (``numpy.polyfit``, degree 1) and the
    tangent at today's index return, whose slope is today's sensitivity.  Axes in percent.
    Line labels: ``quadratic fit``, ``linear fit``, ``tangent``; the band's label starts with
    ``95% CI``.
    """
    curve = characteristic_curve(history)
    fig = Figure(figsize=CHART_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", lw=0.8, zorder=0)
    title = f"{curve.ticker} vs {curve.index_ticker}: characteristic curve"
    span = _window_label(curve.window)
    if curve.n:
        span += f", {curve.dates[0].date()} to {curve.dates[-1].date()}"
    ax.set_title(_mpl_text(f"{title}\n{span}"), fontsize=9.5)
    ax.set_xlabel(_mpl_text(f"{curve.index_ticker} daily return (%)"))
    ax.set_ylabel(_mpl_text(f"{curve.ticker} daily return (%)"))
    if curve.n == 0:
        _empty_note(ax, "no daily returns in the latest window")
        return fig

    ax.scatter(
        100 * curve.index_return,
        100 * curve.stock_return,
        s=9,
        color=_C_POINTS,
        alpha=0.45,
        edgecolors="none",
        label=f"daily returns, n = {curve.n}",
    )
    if math.isfinite(curve.today_index_return) and math.isfinite(curve.today_stock_return):
        ax.scatter(
            [100 * curve.today_index_return],
            [100 * curve.today_stock_return],
            s=40,
            color=_C_TODAY,
            edgecolors="black",
            linewidths=0.6,
            zorder=5,
            label=f"today ({curve.today})",
        )
    lo, hi = float(curve.index_return.min()), float(curve.index_return.max())
    xs = np.linspace(lo, hi, 200)
    if curve.has_fit:
        band = curve.band(xs)
        if band is not None:
            ax.fill_between(
                100 * xs,
                100 * band[0],
                100 * band[1],
                color=_C_QUAD,
                alpha=0.18,
                lw=0,
                label="95% CI of the quadratic fit",
            )
        ax.plot(
            100 * xs,
            100 * curve.fitted(xs),
            color=_C_QUAD,
            lw=1.8,
            label=f"quadratic fit: β = {curve.beta:.2f}, γ = {curve.gamma:.2f}",
            gid="quadratic fit",
        )
    if math.isfinite(curve.linear_slope):
        ax.plot(
            100 * xs,
            100 * (curve.linear_intercept + curve.linear_slope * xs),
            color=_C_LINEAR,
            lw=1.2,
            ls="--",
            label=f"linear fit (polyfit): slope {curve.linear_slope:.2f}",
            gid="linear fit",
        )
    x0 = curve.today_index_return
    if curve.has_fit and math.isfinite(x0) and math.isfinite(curve.sensitivity):
        half = 0.2 * (hi - lo) if hi > lo else 0.01
        seg = np.array([x0 - half, x0 + half])
        y0 = float(curve.fitted(x0))
        ax.plot(
            100 * seg,
            100 * (y0 + curve.sensitivity * (seg - x0)),
            color=_C_TODAY,
            lw=2.2,
            solid_capstyle="round",
            label=f"tangent today: slope = sensitivity {curve.sensitivity:.2f}",
            gid="tangent",
        )
    if not curve.has_fit:
        ax.text(0.98, 0.03, _mpl_text(curve.band_note), transform=ax.transAxes, ha="right", fontsize=8)
    fig.legend(loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return fig


def sensitivity_history_figure(history: pd.DataFrame) -> Figure:
    """The per-day sensitivity of one combination through time, its 95% band and the linear beta.

    Line labels: ``sensitivity`` and ``linear beta``; the band (a ``fill_between`` collection)
    is labelled ``95% CI``.  Days without a fit are gaps.
    """
    frame = _one_combination(history)
    last = frame.iloc[-1]
    ticker, index_ticker, window = str(last["ticker"]), str(last["index_ticker"]), int(last["window"])
    dates = frame["date"].to_numpy(dtype="datetime64[ns]")
    sens = _floats(frame["sensitivity"])
    fig = Figure(figsize=CHART_SIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(
        _mpl_text(f"{ticker} vs {index_ticker}: sensitivity per day ({_window_label(window)})"), fontsize=9.5
    )
    ax.set_ylabel("sensitivity (stock % per index %)")
    _date_axis(ax)
    if not np.isfinite(sens).any():
        ax.plot(dates, sens, color=_C_SENS, lw=0.9, label="sensitivity", gid="sensitivity")
        _empty_note(ax, "no fitted value on any day")
        return fig
    ax.fill_between(
        dates,
        _floats(frame["sensitivity_ci_lower"]),
        _floats(frame["sensitivity_ci_upper"]),
        color=_C_SENS,
        alpha=0.2,
        lw=0,
        label="95% CI",
    )
    ax.plot(dates, sens, color=_C_SENS, lw=0.9, label="sensitivity β + 2γ·r_index", gid="sensitivity")
    ax.plot(
        dates,
        _floats(frame["linear_beta"]),
        color="#111111",
        lw=1.0,
        ls=(0, (4, 2)),
        zorder=3,
        label="linear beta (same window)",
        gid="linear beta",
    )
    fitted = np.flatnonzero(np.isfinite(sens))
    i = int(fitted[-1])
    ax.plot(
        [dates[i]], [sens[i]], "o", color=_C_TODAY, ms=5, mec="black", mew=0.6, label=f"latest: {sens[i]:.2f}"
    )
    fig.legend(loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return fig


def sparkline_figure(history: pd.DataFrame, *, days: int = SPARK_DAYS) -> Figure:
    """A tiny line of one combination's sensitivity over its last ``days`` calendar days."""
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    frame = _one_combination(history)
    cutoff = frame["date"].iloc[-1] - pd.Timedelta(days=days)
    recent = frame.loc[frame["date"] > cutoff]
    dates = recent["date"].to_numpy(dtype="datetime64[ns]")
    sens = _floats(recent["sensitivity"])
    fig = Figure(figsize=SPARK_SIZE)
    ax = fig.add_axes((0.02, 0.08, 0.96, 0.84))
    ax.set_axis_off()
    ax.plot(dates, sens, color=_C_SENS, lw=0.9, gid="sensitivity")
    fitted = np.flatnonzero(np.isfinite(sens))
    if fitted.size:
        i = int(fitted[-1])
        ax.plot([dates[i]], [sens[i]], "o", color=_C_TODAY, ms=2.5, gid="latest")
    ax.margins(x=0.01, y=0.12)
    return fig


def figure_png(fig: Figure, *, dpi: int = CHART_DPI, colors: int | None = PNG_COLORS) -> bytes:
    """``fig`` rendered by the Agg canvas as PNG bytes (no pyplot state, no metadata).

    With ``colors`` (2 to 256) the image is reduced to a palette of that many colors (octree,
    no dithering), which keeps every color a chart uses and makes the PNG 2-4 times smaller;
    ``None`` keeps full RGBA.
    """
    if colors is not None and not 2 <= colors <= 256:
        raise ValueError(f"colors must be between 2 and 256 or None, got {colors}")
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    if colors is None:
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        return buf.getvalue()
    original_dpi = fig.get_dpi()
    fig.set_dpi(dpi)
    try:
        canvas.draw()  # type: ignore[no-untyped-call]
        rgba = Image.frombuffer(
            "RGBA",
            canvas.get_width_height(),
            canvas.buffer_rgba(),  # type: ignore[no-untyped-call]
        ).copy()
    finally:
        fig.set_dpi(original_dpi)
    palette = rgba.convert("RGB").quantize(
        colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
    )
    palette.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str = ".2f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return format(v, spec) if math.isfinite(v) else "—"


def _percent(value: Any) -> str:
    """A decimal return as a signed percentage (``0.0123`` -> ``+1.23%``)."""
    try:
        v = 100.0 * float(value)
    except (TypeError, ValueError):
        return "—"
    return f"{v:+.2f}%" if math.isfinite(v) else "—"


def _tstat(t: float) -> str:
    """A t-statistic with one decimal, never ``-0.0``."""
    return f"{round(t, 1) or 0.0:.1f}" if math.isfinite(t) else "—"


def _int(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return str(int(v)) if math.isfinite(v) else "—"


def _img(fig: Figure, kind: ChartKind, alt: str, dpi: int) -> str:
    png = figure_png(fig, dpi=dpi)
    width, height = struct.unpack(">II", png[16:24])
    b64 = base64.b64encode(png).decode("ascii")
    return (
        f'<img class="chart-{kind}" data-chart="{kind}" src="data:image/png;base64,{b64}" '
        f'width="{width}" height="{height}" alt="{_e(alt)}">'
    )


def _gamma_t(row: Mapping[str, Any]) -> float:
    try:
        t = float(row["gamma"]) / float(row["gamma_se"])
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan
    return t if math.isfinite(t) else math.nan


def _curve_label(row: Mapping[str, Any]) -> tuple[str, str]:
    """Shape of the curve by the t-statistic of gamma: (label, css class)."""
    t = _gamma_t(row)
    if not math.isfinite(t):
        return "—", ""
    crit = _critical_value(row)
    if t >= crit:
        return "convex", "convex"
    if t <= -crit:
        return "concave", "concave"
    return "not significant", "ns"


_CSS: Final[str] = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0 auto; max-width: 1320px; padding: 1rem 1.5rem 3rem; color: #1d232b; line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0.2rem 0; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.6rem; border-bottom: 1px solid #d8dde3; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin: 0 0 0.3rem; }
h3 small, .sub { color: #5a6570; font-weight: normal; }
.howto { background: #f5f7fa; border-left: 4px solid #8aa1b8; padding: 0.6rem 0.9rem; font-size: 0.92rem; }
.failures { background: #fdecec; border: 1px solid #d9534f; border-left-width: 6px; padding: 0.5rem 0.9rem;
  margin: 0.8rem 0; }
.failures h2 { color: #a12622; border: none; margin: 0.2rem 0; font-size: 1.1rem; }
.warnings { background: #fff8e6; border: 1px solid #e0b040; border-left-width: 6px; padding: 0.4rem 0.9rem;
  margin: 0.8rem 0; font-size: 0.92rem; }
table { border-collapse: collapse; font-size: 0.88rem; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.55rem; border-bottom: 1px solid #e4e8ec; white-space: nowrap; }
th { background: #eef1f5; text-align: left; position: sticky; top: 0; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.convex { color: #1a7f37; font-weight: 600; }
td.concave { color: #b35900; font-weight: 600; }
td.ns { color: #6a737d; }
.stale { color: #a12622; font-size: 0.8rem; }
.ticker { margin: 1.6rem 0; padding-top: 0.6rem; border-top: 1px solid #e4e8ec; }
.facts { font-size: 0.9rem; margin: 0.2rem 0 0.5rem; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef1f5; }
figcaption { font-size: 0.8rem; color: #4a545e; max-width: 560px; }
.note { background: #f5f7fa; padding: 0.5rem 0.8rem; font-size: 0.9rem; }
pre { background: #f5f7fa; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
dt { font-weight: 600; margin-top: 0.5rem; }
a { color: #1f5fa8; }
"""


def _howto(crit: float) -> str:
    return (
        '<p class="howto"><strong>How to read this.</strong> For each stock the quadratic market '
        "model r<sub>stock</sub> = α + β·r<sub>index</sub> + γ·r<sub>index</sub><sup>2</sup> is "
        "fitted by least squares on daily simple returns over the window. <strong>Sensitivity"
        "</strong> is the slope of that curve at today's index return, d r<sub>stock</sub> / d "
        "r<sub>index</sub> = β + 2γ·r<sub>index</sub>: the % move of the stock for a 1% move of the "
        "index today (1 = moves one for one with the index, above 1 amplifies it, below 1 dampens "
        "it). γ &gt; 0 means the stock gains more in large up-moves than it loses in large "
        "down-moves (convex), γ &lt; 0 the reverse (concave); the curve is called convex or concave "
        f"only when |t| = |γ / se(γ)| ≥ {crit:.2f}, otherwise it is not distinguishable from a "
        "straight line. <strong>Dollar sensitivity</strong> = 0.01 × sensitivity × previous close: "
        "the expected price move, in the stock's currency, for a +1% index move today. Brackets "
        "and bands are 95% confidence intervals; the linear beta is the plain one-factor slope on "
        "the same window, for comparison.</p>"
    )


def _failures_html(failures: Any) -> str:
    if not failures:
        return ""
    items: list[tuple[str, str]]
    if isinstance(failures, Mapping):
        items = [(str(k), str(v)) for k, v in failures.items()]
    elif isinstance(failures, Sequence) and not isinstance(failures, str | bytes):
        items = [("", str(v)) for v in failures]
    else:
        items = [("", str(failures))]
    lis = "".join(
        f"<li><strong>{_e(sym)}</strong>: {_e(reason)}</li>" if sym else f"<li>{_e(reason)}</li>"
        for sym, reason in items
    )
    return (
        f'<section class="failures" id="failures"><h2>{len(items)} symbol(s) failed and are not in '
        f"this report</h2><ul>{lis}</ul></section>"
    )


def _warnings_html(warnings: Any) -> str:
    if not warnings:
        return ""
    seq = (
        list(warnings)
        if isinstance(warnings, Sequence) and not isinstance(warnings, str | bytes)
        else [warnings]
    )
    lis = "".join(f"<li>{_e(w)}</li>" for w in seq)
    return f'<section class="warnings" id="warnings"><strong>Warnings</strong><ul>{lis}</ul></section>'


#: Manifest values longer than this many lines of JSON are folded (``<details>``).
_MANIFEST_FOLD_LINES: Final[int] = 12


def _manifest_html(manifest: Mapping[str, Any]) -> str:
    rows: list[str] = []
    for key, value in manifest.items():
        if key in ("failures", "warnings"):
            continue
        if isinstance(value, Mapping | list | tuple):
            text = json.dumps(value, indent=2, default=str, ensure_ascii=False, sort_keys=False)
            body = f"<pre>{_e(text)}</pre>"
            if text.count("\n") > _MANIFEST_FOLD_LINES:
                body = f"<details><summary>{len(value)} entries</summary>{body}</details>"
        else:
            body = f"<span>{_e(value)}</span>"
        rows.append(f"<dt>{_e(key)}</dt><dd>{body}</dd>")
    if not rows:
        return ""
    return f'<section id="run"><h2>Run details</h2><dl>{"".join(rows)}</dl></section>'


def _min_obs(manifest: Mapping[str, Any]) -> int | None:
    config = manifest.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    value = model.get("min_obs") if isinstance(model, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_OVERVIEW_HEAD: Final[str] = (
    "<thead><tr><th>Ticker</th><th>Date</th><th class='num'>Sensitivity</th>"
    "<th class='num'>95% CI</th><th class='num'>β</th><th class='num'>γ (t)</th><th>Curve</th>"
    "<th class='num'>Linear β</th><th class='num'>R²</th><th class='num'>n</th>"
    "<th class='num'>Close</th><th class='num'>Price Δ per +1% index</th><th>Last year</th></tr></thead>"
)


def _overview_row(row: Mapping[str, Any], anchor: str, as_of: dt.date, spark: str) -> str:
    day = _to_date(row["date"])
    stale = ' <span class="stale">(no data since)</span>' if day < as_of else ""
    ci = f"[{_num(row['sensitivity_ci_lower'])}, {_num(row['sensitivity_ci_upper'])}]"
    t = _gamma_t(row)
    gamma = _num(row["gamma"]) + (f" ({_tstat(t)})" if math.isfinite(t) else "")
    shape, shape_cls = _curve_label(row)
    cells = [
        f'<td><a href="#{anchor}">{_e(row["ticker"])}</a></td>',
        f"<td>{_e(day)}{stale}</td>",
        f'<td class="num"><strong>{_num(row["sensitivity"])}</strong></td>',
        f'<td class="num">{ci}</td>',
        f'<td class="num">{_num(row["beta"])}</td>',
        f'<td class="num">{gamma}</td>',
        f'<td class="{shape_cls}">{shape}</td>',
        f'<td class="num">{_num(row["linear_beta"])}</td>',
        f'<td class="num">{_num(row["r2"])}</td>',
        f'<td class="num">{_int(row["n_obs"])}</td>',
        f'<td class="num">{_num(row["close"], ",.2f")}</td>',
        f'<td class="num">{_num(row["dollar_sensitivity"], ",.4f")}</td>',
        f"<td>{spark}</td>",
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _facts(row: Mapping[str, Any]) -> str:
    t = _gamma_t(row)
    shape, _ = _curve_label(row)
    return (
        f'<p class="facts">Latest day {_e(_to_date(row["date"]))}: sensitivity '
        f"<strong>{_num(row['sensitivity'])}</strong> "
        f"[{_num(row['sensitivity_ci_lower'])}, {_num(row['sensitivity_ci_upper'])}] · "
        f"index return {_percent(row['index_return'])} · β {_num(row['beta'])} · "
        f"γ {_num(row['gamma'])} (t {_tstat(t)}, {shape}) · linear β {_num(row['linear_beta'])} · "
        f"R² {_num(row['r2'])} · n {_int(row['n_obs'])} · close {_num(row['close'], ',.2f')} · "
        f"{_num(row['dollar_sensitivity'], ',.4f')} per +1% index</p>"
    )


def _ticker_section(
    row: Mapping[str, Any], anchor: str, history: pd.DataFrame | None, min_obs: int | None
) -> str:
    ticker, index_ticker, window = str(row["ticker"]), str(row["index_ticker"]), int(row["window"])
    head = (
        f'<section class="ticker" id="{anchor}"><h3>{_e(ticker)} <small>vs {_e(index_ticker)} · '
        f"{_e(_window_label(window))}</small></h3>"
    )
    if history is None:
        return head + '<p class="note">No per-day rows were given for this combination.</p></section>'
    sens = _floats(history["sensitivity"])
    if not np.isfinite(sens).any():
        need = f"at least {min_obs} returns" if min_obs is not None else "at least min_obs returns"
        first, last = _to_date(history["date"].iloc[0]), _to_date(history["date"].iloc[-1])
        n_ret = int(np.isfinite(_floats(history["stock_return"])).sum())
        note = (
            f"No fitted value yet: {_e(ticker)} has {n_ret} daily return(s) aligned with "
            f"{_e(index_ticker)} ({first} to {last}), and no window held {_e(need)} (the warm-up has "
            "not ended) or every window was singular. There is nothing to chart."
        )
        return head + f'<p class="note">{note}</p></section>'
    curve = characteristic_curve(history)
    scatter = _img(
        characteristic_curve_figure(history),
        "characteristic",
        f"{ticker} daily returns against {index_ticker} with quadratic and linear fits",
        CHART_DPI,
    )
    timeline = _img(
        sensitivity_history_figure(history),
        "sensitivity",
        f"{ticker} sensitivity to {index_ticker} per day with 95% band and linear beta",
        CHART_DPI,
    )
    sample = "every aligned day" if window == 0 else "the latest window"
    band = (
        f"with its 95% confidence band (classical OLS, ±{curve.critical_value:.2f} standard errors)"
        if curve.covariance is not None
        else f"({_e(curve.band_note)})"
    )
    cap_scatter = (
        f"Daily simple returns of {_e(ticker)} against {_e(index_ticker)} over {sample} "
        f"(n = {curve.n}), the points of the latest fit. Solid: the fitted quadratic (latest α, β, γ) "
        f"{band}. Dashed: the linear fit of the same points (numpy.polyfit, degree 1; its slope is "
        "the linear beta). Orange segment: the tangent at today's index return, whose slope is "
        "today's sensitivity; the orange dot is today's return."
    )
    cap_timeline = (
        "Per-day sensitivity β<sub>t</sub> + 2γ<sub>t</sub>·r<sub>index,t</sub> with its 95% "
        "confidence interval (delta method), and the linear beta of the same window. Gaps are "
        "days without a fit (warm-up or a singular window)."
    )
    return (
        head
        + _facts(row)
        + '<div class="charts">'
        + f"<figure>{scatter}<figcaption>{cap_scatter}</figcaption></figure>"
        + f"<figure>{timeline}<figcaption>{cap_timeline}</figcaption></figure>"
        + "</div></section>"
    )


def render_report(sensitivity: pd.DataFrame, summary: pd.DataFrame, manifest: Mapping[str, Any]) -> bytes:
    """The HTML report of one ``as_of``, as UTF-8 bytes; self-contained (charts embedded).

    ``sensitivity`` is the per-day table (the charts' history), ``summary`` the output of
    :func:`summary_table` (rows of other ``as_of`` dates are ignored; the latest is reported),
    ``manifest`` the run's manifest (``failures``: symbol -> reason and ``warnings`` are shown
    at the top, everything else under "Run details").  The page holds, per (``index_ticker``,
    ``window``), an overview sorted by today's sensitivity with a sparkline per row, then per
    ticker the characteristic-curve scatter and the sensitivity through time, or a note when
    the ticker has no fitted value.  Raises ``ValueError`` for an empty or incomplete frame.
    """
    frame = _checked_frame(sensitivity, "sensitivity", SENSITIVITY_COLUMNS)
    table = _checked_frame(summary, "summary", ("as_of", *SENSITIVITY_COLUMNS))
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a mapping, got {type(manifest).__name__}")
    frame = frame.assign(date=_timestamps(frame["date"], "sensitivity.date"))
    as_of_days = _timestamps(table["as_of"], "summary.as_of")
    as_of = _to_date(as_of_days.max())
    table = table.loc[(as_of_days == as_of_days.max()).to_numpy()]
    histories: dict[tuple[str, str, int], pd.DataFrame] = {}
    for key, group in frame.groupby(list(KEY_COLUMNS), sort=False):
        key_index, key_ticker, key_window = cast(tuple[Any, Any, Any], key)
        histories[(str(key_index), str(key_ticker), int(key_window))] = group.sort_values(
            "date", kind="stable"
        ).reset_index(drop=True)
    min_obs = _min_obs(manifest)

    groups = [
        (str(cast(tuple[Any, Any], key)[0]), int(cast(tuple[Any, Any], key)[1]), group)
        for key, group in table.groupby(["index_ticker", "window"], sort=True)
    ]
    indexes = sorted({g[0] for g in groups})
    windows = sorted({g[1] for g in groups})
    fitted_rows = table.loc[table["sensitivity_se"].notna()]
    crit = _critical_value(_record(fitted_rows.iloc[0])) if len(fitted_rows) else _Z95
    title = f"Market sensitivity to {', '.join(indexes)} — as of {as_of}"
    if len(windows) == 1:
        title += f" — {_window_label(windows[0])}"
    first_day = _to_date(frame["date"].min())
    subtitle = " · ".join(
        [
            f"{table['ticker'].nunique()} stock(s)",
            f"daily data {first_day} to {as_of}",
            *([] if len(windows) == 1 else [f"windows: {'; '.join(_window_label(w) for w in windows)}"]),
            *([] if min_obs is None else [f"min_obs {min_obs} returns"]),
        ]
    )

    overview: list[str] = []
    sections: list[str] = []
    n_anchor = 0
    for index_ticker, window, group in groups:
        ordered = group.sort_values(
            ["sensitivity", "ticker"], ascending=[False, True], na_position="last", kind="stable"
        )
        body: list[str] = []
        for _, series in ordered.iterrows():
            row = _record(series)
            n_anchor += 1
            anchor = f"t{n_anchor}"
            history = histories.get((str(row["index_ticker"]), str(row["ticker"]), int(row["window"])))
            spark = "—"
            if history is not None:
                cutoff = history["date"].iloc[-1] - pd.Timedelta(days=SPARK_DAYS)
                recent = _floats(history.loc[history["date"] > cutoff, "sensitivity"])
                if np.isfinite(recent).any():
                    spark = _img(
                        sparkline_figure(history),
                        "sparkline",
                        f"{row['ticker']} sensitivity over the last year",
                        SPARK_DPI,
                    )
            body.append(_overview_row(row, anchor, as_of, spark))
            sections.append(_ticker_section(row, anchor, history, min_obs))
        overview.append(
            f"<h2>Overview: vs {_e(index_ticker)}, {_e(_window_label(window))}</h2>"
            f'<div class="overview"><table>{_OVERVIEW_HEAD}<tbody>{"".join(body)}</tbody></table></div>'
            '<p class="sub">Sorted by today\'s sensitivity. γ (t): the curvature and its t-statistic; '
            "Curve: convex / concave where |t| is significant at 5%. Click a ticker for its charts.</p>"
        )

    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p></header>',
        _failures_html(manifest.get("failures")),
        _warnings_html(manifest.get("warnings")),
        _howto(crit),
        *overview,
        "<h2>Per ticker</h2>",
        *sections,
        _manifest_html(manifest),
        "</body></html>",
    ]
    return "\n".join(p for p in page if p).encode("utf-8")
