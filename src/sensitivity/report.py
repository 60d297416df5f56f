"""Tables, charts and the HTML report: frames in, frames, figures and bytes out.

Nothing here reads or writes files, talks to the network or imports Prefect; the store writes
what these functions return.  :func:`render_report` may draw ticker sections in worker
processes of its own (:mod:`sensitivity.process_pool`), which do the same.

* :func:`summary_table` picks each (``index_ticker``, ``ticker``, ``window``) combination's
  latest day from the per-day sensitivity table and stamps it with ``as_of``.
* :func:`characteristic_curve` gathers what the scatter chart of one combination shows: the
  returns the latest fit used, the fitted quadratic, the linear fit of the same points and,
  where the table's covariance is stored or can be rebuilt (classical, HC, Newey-West), the
  95% confidence band of the fitted quadratic.
* :func:`gamma_test`, :func:`gamma_significant` and :func:`huber_disagrees` read the test of
  the curvature and the OLS/Huber comparison off a row (``gamma_p`` where the table has it).
* :func:`characteristic_curve_figure`, :func:`sensitivity_history_figure`,
  :func:`gamma_history_figure` and :func:`sparkline_figure` draw one combination,
  :func:`sensitivity_heatmap_figure` all tickers of one (index, window) through time
  (matplotlib ``Figure`` objects, rendered by the Agg canvas; no pyplot global state; the
  heatmap is laid out by constrained layout, the other charts by a cheaper one-pass layout);
  :func:`figure_png` turns a figure into PNG bytes.  The report draws hundreds of charts, so
  it reuses one figure per kind of chart, emptied between tickers (the same pixels as a new
  figure, at a fraction of the cost).
* :func:`render_report` assembles a self-contained HTML page (PNG charts embedded as base64
  data URIs, no external CSS, JS or fonts); every piece of text that comes from data or the
  manifest is HTML-escaped.  :func:`overview_markdown` is its overview as Markdown (the
  Prefect artifact).

Optional columns (``gamma_p``, ``delta_aic``, ``up_beta``/``down_beta``, ``secant_slope``,
``huber_*``, ``cov_*``, ``risk_free_return``) are used where the frames have them and left out
of the page where they do not.  Returns are simple daily returns as decimal fractions in the
frames and are shown in percent in the charts; sensitivity and betas are unitless (stock % per
index %).  docs/methodology.md explains the numbers.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeAlias, cast, runtime_checkable

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
from matplotlib import colormaps, rcParams
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import CenteredNorm
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import FixedLocator
from matplotlib.transforms import Bbox
from PIL import Image

from sensitivity.plan import CHART_LIMIT, SECTION_WORKER, section_workers
from sensitivity.process_pool import ProcessPool

__all__ = [
    "CHART_LIMIT",
    "KEY_COLUMNS",
    "SCENARIO_ALIASES",
    "SCENARIO_COLUMNS",
    "SENSITIVITY_COLUMNS",
    "SIGNIFICANCE_LEVEL",
    "CharacteristicCurve",
    "GammaTest",
    "RowSource",
    "SectionDraft",
    "characteristic_curve",
    "characteristic_curve_figure",
    "draft_sections",
    "figure_png",
    "gamma_history_figure",
    "gamma_significant",
    "gamma_test",
    "huber_disagrees",
    "overview_markdown",
    "render_report",
    "sensitivity_heatmap_figure",
    "sensitivity_history_figure",
    "sparkline_figure",
    "summary_table",
]

FloatArray = npt.NDArray[np.float64]
ChartKind = Literal["sparkline", "characteristic", "sensitivity", "gamma", "heatmap"]

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

#: The columns of a scenario table (the what-if of the latest fit, one row per index move).
SCENARIO_COLUMNS: Final[tuple[str, ...]] = (
    "ticker",
    "index_move",
    "predicted_return",
    "predicted_return_ci_lower",
    "predicted_return_ci_upper",
    "price_move",
)
#: Short names the report also accepts for the scenario intervals (renamed on the way in).
SCENARIO_ALIASES: Final[dict[str, str]] = {
    "lower": "predicted_return_ci_lower",
    "upper": "predicted_return_ci_upper",
    "price_lower": "price_move_ci_lower",
    "price_upper": "price_move_ci_upper",
}

_SUMMARY_REQUIRED: Final[tuple[str, ...]] = ("date", *KEY_COLUMNS, "sensitivity")

#: Two-sided 95% normal quantile; used when the table's intervals do not reveal their own.
_Z95: Final[float] = 1.959963984540054
#: Relative tolerance within which recomputed classical standard errors must match the stored
#: ones before the report draws a confidence band from the recomputed covariance.
_SE_RTOL: Final[float] = 1e-6
#: The level of the report's significance markers (two-sided).
SIGNIFICANCE_LEVEL: Final[float] = 0.05

CHART_DPI: Final[int] = 90
CHART_SIZE: Final[tuple[float, float]] = (6.2, 4.4)
#: Palette size of the embedded PNGs (see :func:`figure_png`).
PNG_COLORS: Final[int] = 128
SPARK_DPI: Final[int] = 100
SPARK_SIZE: Final[tuple[float, float]] = (1.6, 0.36)
#: Calendar days of history a sparkline shows.
SPARK_DAYS: Final[int] = 365
#: zlib level of the embedded PNGs: 7 is within about 6% of the smallest (9) at a sixth of its time.
PNG_COMPRESS_LEVEL: Final[int] = 7
#: Space around a chart's parts (axes, title, labels, legend), in inches: constrained layout's pad.
_PAD_IN: Final[float] = 3.0 / 72.0

_C_POINTS: Final[str] = "#4c72b0"
_C_QUAD: Final[str] = "#c44e52"
_C_LINEAR: Final[str] = "#555555"
_C_TODAY: Final[str] = "#dd8452"
_C_SENS: Final[str] = "#1f5fa8"
_C_HUBER: Final[str] = "#2a9d55"
_C_GAMMA: Final[str] = "#7a4fa0"
_C_SIGNIFICANT: Final[str] = "#f2c14e"


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
    # Row positions sorted by combination, then day (only the keys are sorted: at universe
    # scale a sort of every column cost most of the time); the last of each combination is
    # its latest day.
    combo = frame.groupby(list(KEY_COLUMNS), sort=False).ngroup().to_numpy()
    day = days.to_numpy(dtype="datetime64[ns]").view(np.int64)
    order = np.lexsort((day, combo))
    combo_sorted, day_sorted = combo[order], day[order]
    repeated = (combo_sorted[1:] == combo_sorted[:-1]) & (day_sorted[1:] == day_sorted[:-1])
    if repeated.any():
        at = int(order[np.flatnonzero(repeated) + 1].min())  # the first row repeating an earlier one
        first = frame.iloc[at]
        raise ValueError(
            "sensitivity has more than one row for index_ticker="
            f"{first['index_ticker']!r}, ticker={first['ticker']!r}, window={first['window']!r}, "
            f"date={_to_date(days.iloc[at])}; each combination needs one row per date"
        )
    as_of = _to_date(days.max())
    last = np.r_[combo_sorted[1:] != combo_sorted[:-1], True] & (combo_sorted >= 0)  # -1: a missing key
    latest: pd.DataFrame = (
        frame.iloc[order[last]]
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


@runtime_checkable
class RowSource(Protocol):
    """One combination's per-day rows, read when asked: ``read(columns)`` gives them as an
    Arrow table of those columns, dates increasing (e.g. :class:`sensitivity.store.StoredRows`,
    which reads a file's older rows back only for the columns the page draws)."""

    @property
    def column_names(self) -> list[str]: ...

    def read(self, columns: Sequence[str]) -> pa.Table: ...


class _History:
    """One combination's per-day rows for the page, oldest first.

    Held as the caller gave them (a DataFrame, an Arrow table or a :class:`RowSource`): the
    overview's sparkline reads two columns (:attr:`dates`, :meth:`sensitivity`), and only a
    charted section converts the whole rows (:meth:`frame`, as :func:`_one_combination`
    returns them).
    """

    def __init__(self, rows: pd.DataFrame | pa.Table | RowSource, key: tuple[str, str, int]) -> None:
        if isinstance(rows, RowSource) and not isinstance(rows, pa.Table | pd.DataFrame):
            self._source: RowSource | None = rows
            rows = rows.read(["date", "sensitivity"])
        else:
            self._source = None
        self._rows = rows
        self._frame: pd.DataFrame | None = None
        if isinstance(rows, pa.Table):
            days = rows.column("date").cast(pa.timestamp("ns"))
            self.dates: npt.NDArray[np.datetime64] = np.asarray(days.to_numpy(), dtype="datetime64[ns]")
        else:
            self.dates = _timestamps(rows["date"], "sensitivity.date").to_numpy(dtype="datetime64[ns]")
        if len(self.dates) and not bool(np.all(self.dates[1:] >= self.dates[:-1])):
            raise ValueError(
                f"sensitivity: the rows of {key[1]} against {key[0]} (window {key[2]}) are not in "
                "date order; sort them by date"
            )

    def sensitivity(self, start: int = 0) -> FloatArray:
        """The ``sensitivity`` column from row ``start`` on, as float64 (NaN where missing)."""
        if isinstance(self._rows, pa.Table):
            column = self._rows.column("sensitivity").slice(start).cast(pa.float64())
            return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        return _floats(self._rows["sensitivity"])[start:]

    def frame(self) -> pd.DataFrame:
        """The whole rows as a DataFrame, ``date`` as timestamps, index ``0 .. n-1``."""
        if self._frame is None:
            rows = self._rows if self._source is None else self._source.read(self._source.column_names)
            frame = rows.to_pandas(date_as_object=False) if isinstance(rows, pa.Table) else rows
            self._frame = frame.assign(date=self.dates).reset_index(drop=True)
        return self._frame


#: The per-day rows a page is drawn from: the per-day table, or its rows per combination
#: ``(index_ticker, ticker, window)`` (see :func:`render_report`).
PageRows: TypeAlias = pd.DataFrame | Mapping[tuple[str, str, int], pd.DataFrame | pa.Table | RowSource]


def _histories(
    sensitivity: PageRows,
    known: Mapping[tuple[str, str, int], _History] | None = None,
) -> dict[tuple[str, str, int], _History]:
    """The page's per-combination rows from either form :func:`render_report` takes;
    ``known``: some of them already read from the same rows (a draft's), taken as they are."""
    if not isinstance(sensitivity, Mapping):
        frame = _checked_frame(sensitivity, "sensitivity", SENSITIVITY_COLUMNS)
        out: dict[tuple[str, str, int], _History] = {}
        for key, group in frame.groupby(list(KEY_COLUMNS), sort=False):
            index_ticker, ticker, window = cast(tuple[Any, Any, Any], key)
            combo = (str(index_ticker), str(ticker), int(window))
            out[combo] = _History(group.sort_values("date", kind="stable"), combo)
        return out
    out = {}
    for combo, rows in sensitivity.items():
        key = _checked_rows(combo, rows)
        history = known.get(key) if known is not None else None
        if history is None:
            history = _History(rows, key)
        if len(history.dates):
            out[key] = history
    if not out:
        _checked_frame(pd.DataFrame(), "sensitivity", SENSITIVITY_COLUMNS)  # the "is empty" error
    return out


def _checked_rows(combo: Any, rows: object) -> tuple[str, str, int]:
    """The key of one combination's rows in a mapping given to :func:`render_report`, after
    checking their type and columns."""
    if not isinstance(rows, pa.Table | pd.DataFrame | RowSource):
        raise TypeError(
            f"sensitivity[{combo!r}] must be a pandas DataFrame, an Arrow table or a row "
            f"source, got {type(rows).__name__}"
        )
    names = list(rows.columns) if isinstance(rows, pd.DataFrame) else list(rows.column_names)
    missing = [c for c in SENSITIVITY_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"sensitivity[{combo!r}] lacks column(s) {', '.join(missing)}")
    return (str(combo[0]), str(combo[1]), int(combo[2]))


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

    Returns are decimal fractions.  ``covariance`` is the covariance of (alpha, beta, gamma)
    rebuilt from the sample and the fitted coefficients, of the kind (``covariance_kind``:
    classical OLS, HC1, HC0 or Newey-West HAC) whose standard errors equal the stored ones; it
    is ``None`` (and ``band_note`` says why) when no kind matches, so a band is only drawn when
    it is the band of the fit the table reports.  ``huber`` holds the latest row's Huber
    (alpha, beta, gamma) when the table has them.
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
    covariance_kind: str = ""
    huber: tuple[float, float, float] | None = None
    #: Whether the returns are in excess of a risk-free rate (the table's ``risk_free_return``).
    excess: bool = False

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


def _design_inverse(x: FloatArray) -> tuple[FloatArray, FloatArray] | None:
    """``X = [1, x, x^2]`` and ``(X'X)^-1``; ``None`` when there are too few points or X is singular."""
    if x.size <= 3:
        return None
    design = np.column_stack([np.ones_like(x), x, x * x])
    scale = np.linalg.norm(design, axis=0)
    if not np.all(scale > 0):
        return None
    # (X'X)^-1 = D (R'R)^-1 D with X D = Q R: column scaling keeps the 3x3 inverse accurate.
    _, r = np.linalg.qr(design / scale)
    diag = np.abs(np.diag(r))
    if diag.min() <= 1e-12 * diag.max():
        return None
    r_inv = np.linalg.inv(r)
    return design, np.asarray((r_inv @ r_inv.T) / np.outer(scale, scale), dtype=np.float64)


def _newey_west_lags(n: int) -> tuple[int, ...]:
    """The usual automatic HAC lag rules for ``n`` observations.

    ``floor(4 (n/100)^(2/9))`` (Newey and West 1994; statsmodels' default), ``floor(n^(1/4))``
    and ``floor(0.75 n^(1/3))`` (Stock and Watson).
    """
    return (
        math.floor(4.0 * (n / 100.0) ** (2.0 / 9.0)),
        math.floor(n**0.25),
        math.floor(0.75 * n ** (1.0 / 3.0)),
    )


def _covariance_candidates(
    x: FloatArray, y: FloatArray, coef: FloatArray, hac_lags: Sequence[int] = ()
) -> list[tuple[str, FloatArray]]:
    """Covariances of (alpha, beta, gamma) the table may have used, as (kind, matrix) pairs.

    Classical ``s^2 (X'X)^-1`` (``s^2 = RSS/(n-3)``); the White sandwiches HC1 (``n/(n-3)``
    times HC0) and HC0; and Newey-West HAC sandwiches (Bartlett weights ``1 - l/(L+1)``, as
    statsmodels' ``cov_type="HAC"``) for the lags ``hac_lags`` and the usual automatic rules,
    each without and with the ``n/(n-3)`` correction.  Empty when the design is singular.
    """
    prepared = _design_inverse(x)
    if prepared is None:
        return []
    design, xtx_inv = prepared
    n, k = design.shape
    resid = y - design @ coef
    out: list[tuple[str, FloatArray]] = [("classical OLS", float(resid @ resid) / (n - k) * xtx_inv)]
    scores = design * resid[:, None]
    meat0 = scores.T @ scores
    hc0 = xtx_inv @ meat0 @ xtx_inv
    out += [("HC1", hc0 * (n / (n - k))), ("HC0", hc0)]
    lags = sorted({int(v) for v in (*hac_lags, *_newey_west_lags(n)) if 0 < int(v) < n})
    for lag in lags:
        meat = meat0.copy()
        for ell in range(1, lag + 1):
            s = scores[ell:].T @ scores[:-ell]
            meat += (1.0 - ell / (lag + 1.0)) * (s + s.T)
        hac = xtx_inv @ meat @ xtx_inv
        out += [
            (f"HAC, Newey-West {lag} lags", hac),
            (f"HAC, Newey-West {lag} lags, n/(n-3) corrected", hac * (n / (n - k))),
        ]
    return [(kind, np.asarray(cov, dtype=np.float64)) for kind, cov in out]


#: Names of the table's ``se_type`` values.
_SE_KINDS: Final[dict[str, str]] = {"classical": "classical OLS", "hc1": "HC1", "hac": "HAC, Newey-West"}
_COV_COLUMNS: Final[tuple[str, ...]] = ("cov_alpha_beta", "cov_alpha_gamma", "cov_beta_gamma")


def _stored_covariance(row: Mapping[str, Any]) -> tuple[str, FloatArray] | None:
    """The covariance of (alpha, beta, gamma) the table stores for ``row``, with its kind."""
    se = [_finite(row, c) for c in ("alpha_se", "beta_se", "gamma_se")]
    off = [_finite(row, c) for c in _COV_COLUMNS]
    if not all(math.isfinite(v) for v in (*se, *off)):
        return None
    cov = np.diag(np.square(np.asarray(se, dtype=np.float64)))
    for (i, j), value in zip(((0, 1), (0, 2), (1, 2)), off, strict=True):
        cov[i, j] = cov[j, i] = value
    raw = row.get("se_type")
    se_type = raw if isinstance(raw, str) else ""
    return _SE_KINDS.get(se_type, se_type or "stored"), cov


def _finite(row: Mapping[str, Any], column: str) -> float:
    """``row[column]`` as a float; NaN when the column is absent, null or not a number."""
    try:
        v = float(row[column])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def characteristic_curve(history: pd.DataFrame, *, hac_lags: Sequence[int] = ()) -> CharacteristicCurve:
    """The latest fit of one combination and the sample of returns it was fitted on.

    The sample is the last ``n_obs`` rows with both returns (the stock's returns inside the
    latest window), or every such row for ``window == 0``; when the latest day has no fit,
    the last ``window`` rows (all rows for ``window == 0``) are returned for the scatter.
    Where the table has a ``risk_free_return`` column the model was fitted on excess returns,
    so the sample (and today's point) are ``index_return - risk_free_return`` and
    ``stock_return - risk_free_return``.  The linear fit is ``numpy.polyfit`` of degree 1 on
    the same points (its slope equals the table's ``linear_beta``).  The confidence band's
    covariance is the table's own where it stores the covariances (``cov_alpha_beta``,
    ``cov_alpha_gamma``, ``cov_beta_gamma`` with the standard errors; ``se_type`` names it);
    otherwise it is rebuilt from the sample: classical OLS, HC1, HC0 or Newey-West HAC (lags
    ``hac_lags`` and the usual automatic rules), whichever reproduces the stored ``alpha_se``,
    ``beta_se``, ``gamma_se`` (relative tolerance 1e-6).  Its quantile is the one the table's
    sensitivity interval used.
    """
    return _characteristic_curve(_one_combination(history), hac_lags)


def _characteristic_curve(frame: pd.DataFrame, hac_lags: Sequence[int]) -> CharacteristicCurve:
    """:func:`characteristic_curve` of a history :func:`_one_combination` has checked."""
    last = frame.iloc[-1]
    row = _record(last)
    window = int(last["window"])
    rf = _floats(frame["risk_free_return"]) if "risk_free_return" in frame.columns else None
    excess = rf is not None and bool(np.any(np.nan_to_num(rf) != 0.0))
    x_all = _floats(frame["index_return"])
    y_all = _floats(frame["stock_return"])
    if rf is not None and excess:
        x_all, y_all = x_all - rf, y_all - rf
    usable = np.flatnonzero(np.isfinite(x_all) & np.isfinite(y_all))
    coef = np.array([_finite(row, c) for c in ("alpha", "beta", "gamma")], dtype=np.float64)
    fitted = bool(np.all(np.isfinite(coef)))
    n_obs = _finite(row, "n_obs")
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
    kind = ""
    if not fitted:
        note = "no fit on the latest day"
    else:
        stored = np.array([_finite(row, c) for c in ("alpha_se", "beta_se", "gamma_se")], dtype=np.float64)
        own = _stored_covariance(row)
        if own is not None:
            candidates = [own]
        elif np.all(np.isfinite(stored)):
            candidates = _covariance_candidates(x, y, coef, hac_lags)
        else:
            candidates = []
        match = next(
            (
                (k, c)
                for k, c in candidates
                if np.allclose(np.sqrt(np.diag(c)), stored, rtol=_SE_RTOL, atol=0.0)
            ),
            None,
        )
        if not np.all(np.isfinite(stored)):
            note = "confidence band omitted: the table has no standard errors for this fit"
        elif own is None and _design_inverse(x) is None:
            note = "confidence band omitted: the sample is too small or singular"
        elif match is not None:
            kind, covariance = match
            note = ""
        else:
            note = (
                "confidence band omitted: the stored standard errors are none of the classical, "
                "HC or Newey-West ones of this sample, so the report cannot rebuild their covariance"
            )
    huber_coef = tuple(_finite(row, f"huber_{c}") for c in ("alpha", "beta", "gamma"))
    huber = (huber_coef[0], huber_coef[1], huber_coef[2]) if all(map(math.isfinite, huber_coef)) else None
    dates = pd.DatetimeIndex(frame["date"].to_numpy()[sample])
    return CharacteristicCurve(
        index_ticker=str(last["index_ticker"]),
        ticker=str(last["ticker"]),
        window=window,
        dates=dates,
        index_return=x,
        stock_return=y,
        today=_to_date(last["date"]),
        today_index_return=float(x_all[-1]),
        today_stock_return=float(y_all[-1]),
        alpha=float(coef[0]),
        beta=float(coef[1]),
        gamma=float(coef[2]),
        sensitivity=_finite(row, "sensitivity"),
        linear_slope=slope,
        linear_intercept=intercept,
        covariance=covariance,
        critical_value=_critical_value(row),
        band_note=note,
        covariance_kind=kind,
        huber=huber,
        excess=excess,
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


def _band(ax: Axes, *args: Any, **kwargs: Any) -> PolyCollection:
    """``ax.fill_between(*args, **kwargs)``, drawn as a path.

    Agg draws a collection of one path (a band without gaps) as a "marker": rasterized into a
    scanline cache, then stamped at its offset.  For bands the size of the plot that cost
    8-26 ms a section in that call alone (a section's three charts in a loop: 230-265 against
    320 ms), and the stamp lands half a pixel right of and below where the same polygon drawn
    as a path, and the chart's lines, are.  Two URLs (both None, so nothing is linked) are
    what tells the collection not to take that shortcut.
    """
    band = ax.fill_between(*args, **kwargs)
    band.set_urls([None, None])
    return band


class _Chart:
    """A :data:`CHART_SIZE` figure at :data:`CHART_DPI` on an Agg canvas, with one axes.

    No layout engine: :func:`_fit_axes` places the axes once the chart's artists are added.
    The report draws the same kind of chart for many tickers, and creating a figure, its axes
    and their ticks costs about as much as drawing them; :meth:`take` empties the figure for
    the next chart instead, which draws the same pixels as a new one.
    """

    def __init__(self, *, final: bool = False) -> None:
        self.figure = Figure(figsize=CHART_SIZE, dpi=CHART_DPI)
        FigureCanvasAgg(self.figure)
        self.axes = self.figure.add_subplot()
        #: Each chart is drawn once as built, never changed afterwards (the report's): its
        #: date ticks are then worked out once and its title placed by :func:`_fit_axes`.
        #: A figure handed to a caller, who may change its limits, stays live (False).
        self.final = final
        if final:
            # A title given its height is not moved at draw time: matplotlib would otherwise
            # lay out the y axis once more on every draw (about 9 ms a chart) to see whether
            # its offset text reaches the title.  :func:`_fit_axes` knows and lifts it itself.
            self.axes.set_title("", y=1.0)
        self._used = False

    def take(self) -> tuple[Figure, Axes]:
        """The figure and its axes, without the artists, legend, title and labels of the last chart."""
        fig, ax = self.figure, self.axes
        if self._used:
            for artist in [*ax.lines, *ax.collections, *ax.texts, *ax.patches, *fig.legends]:
                artist.remove()
            ax.relim()
            # A new axes' view limits (not set yet), then the defaults of the axes' units (dates).
            ax.viewLim.set_points(Bbox.unit().get_points())
            ax.xaxis.set_default_intervals()
            ax.yaxis.set_default_intervals()
            ax.set_autoscale_on(True)
            ax.set_title("")
            ax.set_xlabel("")
            ax.set_ylabel("")
        self._used = True
        return fig, ax


def _agg_canvas(fig: Figure) -> FigureCanvasAgg:
    """``fig``'s canvas when it is an Agg one, else a new Agg canvas for it."""
    canvas = fig.canvas
    return canvas if isinstance(canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)


def _tick_labels(ax: Axes, which: Literal["x", "y"]) -> tuple[list[str], str]:
    """The major tick labels ``ax`` will draw on one axis (within the view) and its offset text."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(axis.get_view_interval())
    locs = [v for v in axis.get_major_locator()() if low <= v <= high]
    formatter = axis.get_major_formatter()
    labels = [str(v) for v in formatter.format_ticks(locs)]
    return labels, str(formatter.get_offset())


def _fit_axes(fig: Figure, ax: Axes, *, final: bool = False) -> None:
    """Place ``ax`` so that its title, labels and tick labels and the legend below it fit ``fig``.

    A cheap stand-in for constrained layout on a chart of one axes and an optional figure
    legend at the bottom (``loc="outside lower center"``), with the same look and
    :data:`_PAD_IN` between the parts and around them.  Instead of laying out every tick (which
    constrained layout does twice per draw, about 60 ms a chart), it measures the title, the
    axis labels, the legend and the widest tick label of each axis, whose texts come from the
    axes' own locators and formatters.  ``final`` (:attr:`_Chart.final`): the chart will be
    drawn as it is, so a date axis keeps the ticks measured here and the title, which
    matplotlib then leaves where it is, goes up by a line over a y-axis offset text.
    """
    renderer = _agg_canvas(fig).get_renderer()  # type: ignore[no-untyped-call]
    width, height = fig.bbox.width, fig.bbox.height
    pt = fig.dpi / 72.0
    pad = _PAD_IN * fig.dpi

    def size(text: Text) -> tuple[float, float]:
        if not text.get_visible() or not text.get_text():
            return 0.0, 0.0
        box = text.get_window_extent(renderer)
        return box.width, box.height

    def widest(labels: Sequence[str], fontsize: Any) -> tuple[float, float]:
        """Width of the widest of ``labels`` and the height of a line of them (as ``Text`` lays out)."""
        # Digits have one width: the longest labels are the widest, so only those are measured.
        longest = max(map(len, labels), default=0)
        prop = FontProperties(size=fontsize)
        boxes = [
            renderer.get_text_width_height_descent(t, prop, ismath=False)
            for t in ["lp", *dict.fromkeys(labels)]
            if t == "lp" or (t and len(t) >= longest - 1)
        ]
        width = max((b[0] for b in boxes[1:]), default=0.0)
        return width, max(b[1] for b in boxes)

    legend_top = max((leg.get_window_extent(renderer).y1 for leg in fig.legends), default=0.0)
    title_h = size(ax.title)[1]
    top = pad + (title_h + rcParams["axes.titlepad"] * pt if title_h else 0.0)
    locator = ax.xaxis.get_major_locator()
    if final and isinstance(locator, AutoDateLocator):
        # Its ticks depend on the view alone, not on the axes' size: kept, they are not
        # worked out again at each of the draw's seven tick updates (3-6 ms a date chart).
        ax.xaxis.set_major_locator(FixedLocator(locator()))
    x_labels, x_offset = _tick_labels(ax, "x")
    x_w, x_h = widest([*x_labels, x_offset], rcParams["xtick.labelsize"])
    xlabel_h = size(ax.xaxis.label)[1]
    below = (rcParams["xtick.major.size"] + rcParams["xtick.major.pad"]) * pt + x_h
    below += (xlabel_h + rcParams["axes.labelpad"] * pt) if xlabel_h else 0.0
    below += (x_h + 3.0 * pt) if x_offset else 0.0  # Axis.OFFSETTEXTPAD
    bottom = legend_top + pad + below
    # The y ticks depend on the axes' height: place it vertically before asking for them.
    ax.set_position((0.1, bottom / height, 0.8, max(height - bottom - top, pt) / height))
    y_labels, y_offset = _tick_labels(ax, "y")
    y_w, y_h = widest(y_labels, rcParams["ytick.labelsize"])
    ylabel_w = size(ax.yaxis.label)[0]
    left = pad + (rcParams["ytick.major.size"] + rcParams["ytick.major.pad"]) * pt + y_w
    left += (ylabel_w + rcParams["axes.labelpad"] * pt) if ylabel_w else 0.0
    right = pad + x_w / 2.0  # the last tick label may sit on the right edge
    if y_offset:
        top += y_h
    plot_w, plot_h = width - left - right, height - bottom - top
    if plot_w >= 0.3 * width and plot_h >= 0.3 * height:
        ax.set_position((left / width, bottom / height, plot_w / width, plot_h / height))
    # else: labels too large to fit: leave the plot as wide as placed above, not squashed
    if final and y_offset:
        # The y axis' offset text sits on the plot's top left corner, a line high (OFFSETTEXTPAD
        # below the title's pad): the title goes up by that line, into the space kept above.
        ax.title.set_y(1.0 + y_h / (ax.get_position().height * height))


def characteristic_curve_figure(
    history: pd.DataFrame, *, hac_lags: Sequence[int] = (), curve: CharacteristicCurve | None = None
) -> Figure:
    """Scatter of the stock's against the index's daily returns over the latest window.

    Draws the points of the latest fit's sample, today's point, the fitted quadratic
    (latest alpha, beta, gamma) with its 95% confidence band where :func:`characteristic_curve`
    could rebuild it, the linear fit of the same points (``numpy.polyfit``, degree 1), the
    Huber fit where the table has ``huber_alpha``, ``huber_beta``, ``huber_gamma``, and the
    tangent at today's index return, whose slope is today's sensitivity.  Axes in percent.
    Line ids (``gid``): ``quadratic fit``, ``linear fit``, ``huber fit``, ``tangent``; the
    band's label starts with ``95% CI``.  ``curve``: the :func:`characteristic_curve` of
    ``history`` when the caller has it already.
    """
    if curve is None:
        curve = characteristic_curve(history, hac_lags=hac_lags)
    return _characteristic_curve_figure(curve, _Chart())


def _characteristic_curve_figure(curve: CharacteristicCurve, chart: _Chart) -> Figure:
    """:func:`characteristic_curve_figure` of ``curve``, drawn in ``chart``."""
    fig, ax = chart.take()
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", lw=0.8, zorder=0)
    title = f"{curve.ticker} vs {curve.index_ticker}: characteristic curve"
    span = _window_label(curve.window)
    if curve.n:
        span += f", {curve.dates[0].date()} to {curve.dates[-1].date()}"
    ax.set_title(_mpl_text(f"{title}\n{span}"), fontsize=9.5)
    kind = "daily excess return" if curve.excess else "daily return"
    ax.set_xlabel(_mpl_text(f"{curve.index_ticker} {kind} (%)"))
    ax.set_ylabel(_mpl_text(f"{curve.ticker} {kind} (%)"))
    if curve.n == 0:
        _empty_note(ax, "no daily returns in the latest window")
        _fit_axes(fig, ax, final=chart.final)
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
            _band(
                ax,
                100 * xs,
                100 * band[0],
                100 * band[1],
                color=_C_QUAD,
                alpha=0.18,
                lw=0,
                label=f"95% CI of the quadratic fit ({curve.covariance_kind})",
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
    if curve.huber is not None:
        h_alpha, h_beta, h_gamma = curve.huber
        ax.plot(
            100 * xs,
            100 * (h_alpha + h_beta * xs + h_gamma * xs * xs),
            color=_C_HUBER,
            lw=1.4,
            ls=(0, (1, 1.5)),
            label=f"Huber fit: β = {h_beta:.2f}, γ = {h_gamma:.2f}",
            gid="huber fit",
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
    _fit_axes(fig, ax, final=chart.final)
    return fig


def sensitivity_history_figure(history: pd.DataFrame) -> Figure:
    """The per-day sensitivity of one combination through time, its 95% band and the linear beta.

    Line labels: ``sensitivity`` and ``linear beta``; the band (a ``fill_between`` collection)
    is labelled ``95% CI``.  Days without a fit are gaps.
    """
    return _sensitivity_history_figure(_one_combination(history), _Chart())


def _sensitivity_history_figure(frame: pd.DataFrame, chart: _Chart) -> Figure:
    """:func:`sensitivity_history_figure` of a history :func:`_one_combination` has checked."""
    last = frame.iloc[-1]
    ticker, index_ticker, window = str(last["ticker"]), str(last["index_ticker"]), int(last["window"])
    dates = frame["date"].to_numpy(dtype="datetime64[ns]")
    sens = _floats(frame["sensitivity"])
    fig, ax = chart.take()
    ax.set_title(
        _mpl_text(f"{ticker} vs {index_ticker}: sensitivity per day ({_window_label(window)})"), fontsize=9.5
    )
    ax.set_ylabel("sensitivity (stock % per index %)")
    _date_axis(ax)
    if not np.isfinite(sens).any():
        ax.plot(dates, sens, color=_C_SENS, lw=0.9, label="sensitivity", gid="sensitivity")
        _empty_note(ax, "no fitted value on any day")
        _fit_axes(fig, ax, final=chart.final)
        return fig
    _band(
        ax,
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
    _fit_axes(fig, ax, final=chart.final)
    return fig


def _critical_values(frame: pd.DataFrame) -> FloatArray:
    """Per row, the quantile of the table's sensitivity interval (``_Z95`` where it is unknown)."""
    se = _floats(frame["sensitivity_se"])
    width = _floats(frame["sensitivity_ci_upper"]) - _floats(frame["sensitivity_ci_lower"])
    with np.errstate(divide="ignore", invalid="ignore"):
        crit = width / (2.0 * se)
    return np.where(np.isfinite(crit) & (crit > 0), crit, _Z95)


def gamma_significant(frame: pd.DataFrame) -> npt.NDArray[np.bool_]:
    """Per row of a per-day table, whether gamma differs from 0 at the 5% level (two-sided).

    By ``gamma_p < 0.05`` where the table has a ``gamma_p`` column (the p-value of the
    table's own test, which may use robust standard errors); otherwise by
    ``|gamma / gamma_se| >= q``, ``q`` the quantile of the row's sensitivity interval.  Rows
    without a fit are False.
    """
    if "gamma_p" in frame.columns:
        p = _floats(frame["gamma_p"])
        return np.asarray(np.isfinite(p) & (p < SIGNIFICANCE_LEVEL), dtype=np.bool_)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = _floats(frame["gamma"]) / _floats(frame["gamma_se"])
    return np.asarray(np.isfinite(t) & (np.abs(t) >= _critical_values(frame)), dtype=np.bool_)


def gamma_history_figure(history: pd.DataFrame) -> Figure:
    """The rolling curvature gamma of one combination through time, with its 95% band.

    The band is ``gamma ± q*gamma_se`` (``q`` the quantile of the day's sensitivity interval);
    the shaded background marks the days on which gamma is significant at 5%
    (:func:`gamma_significant`).  Line id (``gid``): ``gamma``; the band's label is ``95% CI``,
    the shading's starts with ``significant``.
    """
    return _gamma_history_figure(_one_combination(history), _Chart())


def _gamma_history_figure(frame: pd.DataFrame, chart: _Chart) -> Figure:
    """:func:`gamma_history_figure` of a history :func:`_one_combination` has checked."""
    last = frame.iloc[-1]
    ticker, index_ticker, window = str(last["ticker"]), str(last["index_ticker"]), int(last["window"])
    dates = frame["date"].to_numpy(dtype="datetime64[ns]")
    gamma = _floats(frame["gamma"])
    fig, ax = chart.take()
    ax.set_title(
        _mpl_text(f"{ticker} vs {index_ticker}: curvature γ per day ({_window_label(window)})"),
        fontsize=9.5,
    )
    ax.set_ylabel("γ (per unit of decimal index return)")
    _date_axis(ax)
    if not np.isfinite(gamma).any():
        ax.plot(dates, gamma, color=_C_GAMMA, lw=0.9, label="γ", gid="gamma")
        _empty_note(ax, "no fitted value on any day")
        _fit_axes(fig, ax, final=chart.final)
        return fig
    ax.axhline(0.0, color="0.55", lw=0.8, zorder=1)
    significant = gamma_significant(frame)
    crit = _critical_values(frame)
    fitted = np.isfinite(gamma)
    test = "p < 0.05" if "gamma_p" in frame.columns else f"|t| ≥ {float(np.median(crit[fitted])):.2f}"
    _band(
        ax,
        dates,
        0.0,
        1.0,
        where=cast(Sequence[bool], significant),  # an array is accepted; 3.10's stubs say Sequence
        step="mid",
        transform=ax.get_xaxis_transform(),
        color=_C_SIGNIFICANT,
        alpha=0.35,
        lw=0,
        label=f"significant at 5% ({test}): {int(significant.sum())} of {int(fitted.sum())} days",
    )
    half = crit * _floats(frame["gamma_se"])
    _band(ax, dates, gamma - half, gamma + half, color=_C_GAMMA, alpha=0.2, lw=0, label="95% CI")
    ax.plot(dates, gamma, color=_C_GAMMA, lw=0.9, label="γ (curvature)", gid="gamma")
    i = int(np.flatnonzero(np.isfinite(gamma))[-1])
    latest = f"latest: {gamma[i]:.2f}"
    ax.plot([dates[i]], [gamma[i]], "o", color=_C_TODAY, ms=5, mec="black", mew=0.6, label=latest)
    fig.legend(loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    _fit_axes(fig, ax, final=chart.final)
    return fig


def _heatmap_freq(dates: pd.Series) -> str:
    """Weekly bins for up to two years of data, monthly up to 25 years, quarterly beyond."""
    span = (dates.max() - dates.min()).days
    if span <= 2 * 366:
        return "W"
    return "M" if span <= 25 * 366 else "Q"


_FREQ_WORDS: Final[dict[str, str]] = {"W": "weekly", "M": "monthly", "Q": "quarterly"}


def sensitivity_heatmap_figure(
    sensitivity: pd.DataFrame, *, tickers: Sequence[str] | None = None, freq: str | None = None
) -> Figure:
    """Mean sensitivity per ticker (rows) and week, month or quarter (columns), one colour each.

    ``sensitivity`` is a per-day table of one (``index_ticker``, ``window``); ``tickers`` the
    rows, top to bottom (default: every ticker, by its latest sensitivity, highest first);
    ``freq`` a pandas period alias (default: weekly up to two years of data, monthly up to
    25 years, quarterly beyond).  The diverging colour scale is centred at 1 (a stock that
    moves one for one with the index is white), red above, blue below, symmetric over the 98th
    percentile of ``|sensitivity - 1|``; bins without a fitted day are grey.  The mesh's
    ``gid`` is ``heatmap``; its array holds the means, one row per ticker.
    """
    frame = _checked_frame(sensitivity, "sensitivity", ("date", "ticker", "sensitivity"))
    groups = frame[[c for c in ("index_ticker", "window") if c in frame.columns]].drop_duplicates()
    if len(groups) > 1:
        raise ValueError(f"sensitivity must hold one (index_ticker, window), got {len(groups)}")
    days = _timestamps(frame["date"], "sensitivity.date")
    frame = frame.assign(date=days.to_numpy(), ticker=frame["ticker"].astype(str))
    if tickers is None:
        latest = frame.sort_values("date", kind="stable").groupby("ticker", sort=False).tail(1)
        order = latest.sort_values(
            ["sensitivity", "ticker"], ascending=[False, True], na_position="last", kind="stable"
        )["ticker"].tolist()
    else:
        order = [str(t) for t in tickers]
    freq = freq or _heatmap_freq(days)
    periods = pd.period_range(days.min(), days.max(), freq=freq)
    means = (
        frame.assign(_period=days.dt.to_period(freq).array)
        .groupby(["ticker", "_period"], sort=False)["sensitivity"]
        .mean()
        .unstack("_period")
        .reindex(index=order, columns=periods)
    )
    values = np.ma.masked_invalid(means.to_numpy(dtype="float64", na_value=np.nan))
    rows = len(order)
    height = min(1.6 + 0.2 * rows, 14.0)
    fig = Figure(figsize=(12.0, height), layout="constrained")
    ax = fig.add_subplot()
    index_ticker = str(frame["index_ticker"].iloc[0]) if "index_ticker" in frame.columns else "the index"
    word = _FREQ_WORDS.get(freq, freq)
    ax.set_title(_mpl_text(f"Sensitivity to {index_ticker} across stocks, {word} means"), fontsize=10)
    finite = values.compressed()
    if rows == 0 or finite.size == 0:
        ax.set_axis_off()
        _empty_note(ax, "no fitted value on any day")
        return fig
    half = float(np.percentile(np.abs(finite - 1.0), 98)) if finite.size else 1.0
    half = max(half, 0.05)
    cmap = colormaps["RdBu_r"].with_extremes(bad="#d9dde2")
    edges = np.append(periods.start_time.to_numpy(), (periods[-1] + 1).start_time.to_datetime64())
    mesh = ax.pcolormesh(
        edges,
        np.arange(rows + 1),
        values,
        cmap=cmap,
        norm=CenteredNorm(vcenter=1.0, halfrange=half),
        shading="flat",
    )
    mesh.set_gid("heatmap")
    ax.set_ylim(rows, 0)
    ax.set_yticks(np.arange(rows) + 0.5, labels=[_mpl_text(t) for t in order])
    ax.tick_params(axis="y", labelsize=max(5.0, min(8.5, 300.0 / max(rows, 1))), length=0)
    _date_axis(ax)
    bar = fig.colorbar(mesh, ax=ax, extend="both", pad=0.01, fraction=0.03)
    bar.set_label("mean sensitivity", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


class _Sparkline:
    """One sparkline figure, redrawn for each combination (the overview draws hundreds).

    Creating a figure and its axes costs more than drawing a line in it, so the overview
    keeps one figure and swaps the data: :meth:`draw` sets the line and the latest point and
    rescales the axes exactly as a fresh figure would (``relim`` and ``autoscale_view`` with
    the same margins), so every PNG equals that of :func:`sparkline_figure`.  No axis, ticks,
    text or layout engine.
    """

    def __init__(self) -> None:
        self.figure = Figure(figsize=SPARK_SIZE, dpi=SPARK_DPI)
        FigureCanvasAgg(self.figure)
        self._ax = self.figure.add_axes((0.02, 0.08, 0.96, 0.84))
        self._ax.set_axis_off()
        self._ax.margins(x=0.01, y=0.12)
        self._line: Line2D | None = None
        self._latest: Line2D | None = None

    def draw(self, dates: npt.NDArray[np.datetime64], sens: FloatArray) -> Figure:
        """The figure showing ``sens`` against ``dates`` and its last finite value as a dot."""
        ax = self._ax
        fitted = np.flatnonzero(np.isfinite(sens))
        last = slice(int(fitted[-1]), int(fitted[-1]) + 1) if fitted.size else slice(0, 0)
        if self._line is None or self._latest is None:
            (self._line,) = ax.plot(dates, sens, color=_C_SENS, lw=0.9, gid="sensitivity")
            (self._latest,) = ax.plot(dates[last], sens[last], "o", color=_C_TODAY, ms=2.5, gid="latest")
        else:
            self._line.set_data(dates, sens)
            self._latest.set_data(dates[last], sens[last])  # one of the line's points, or none
        ax.relim()
        ax.autoscale_view()
        return self.figure


def _recent(dates: npt.NDArray[np.datetime64], days: int) -> int:
    """The first index of sorted ``dates`` later than ``days`` calendar days before the last one."""
    cutoff = dates[-1] - np.timedelta64(days, "D")
    return int(np.searchsorted(dates, cutoff, side="right"))


def sparkline_figure(history: pd.DataFrame, *, days: int = SPARK_DAYS) -> Figure:
    """A tiny line of one combination's sensitivity over its last ``days`` calendar days."""
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    frame = _one_combination(history)
    dates = frame["date"].to_numpy(dtype="datetime64[ns]")
    start = _recent(dates, days)
    return _Sparkline().draw(dates[start:], _floats(frame["sensitivity"])[start:])


def figure_png(fig: Figure, *, dpi: int = CHART_DPI, colors: int | None = PNG_COLORS) -> bytes:
    """``fig`` rendered by the Agg canvas as PNG bytes (no pyplot state, no metadata).

    With ``colors`` (2 to 256) the image is reduced to a palette of that many colors (octree,
    no dithering), which keeps every color a chart uses and makes the PNG 2-4 times smaller;
    ``None`` keeps full RGBA.  zlib level :data:`PNG_COMPRESS_LEVEL`.
    """
    if colors is not None and not 2 <= colors <= 256:
        raise ValueError(f"colors must be between 2 and 256 or None, got {colors}")
    canvas = _agg_canvas(fig)
    buf = io.BytesIO()
    if colors is None:
        fig.savefig(
            buf,
            format="png",
            dpi=dpi,
            metadata={"Software": None},
            pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL},
        )
        return buf.getvalue()
    original_dpi = fig.get_dpi()
    if dpi != original_dpi:
        fig.set_dpi(dpi)
    try:
        canvas.draw()  # type: ignore[no-untyped-call]
        rgb = Image.frombuffer(
            "RGBA",
            canvas.get_width_height(),
            canvas.buffer_rgba(),  # type: ignore[no-untyped-call]
        ).convert("RGB")
    finally:
        if dpi != original_dpi:
            fig.set_dpi(original_dpi)
    palette = rgb.quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
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


def _pvalue(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


@dataclass(frozen=True)
class GammaTest:
    """The convexity (Treynor-Mazuy) test of one row: is gamma different from 0?

    ``t`` is the table's ``gamma_t`` where it has one, else ``gamma / gamma_se``; ``p`` the
    table's ``gamma_p`` (NaN where it has none).  Significance at 5% is ``p < 0.05`` where
    ``p`` is known, else ``|t| >= critical_value`` (the quantile of the row's sensitivity
    interval).
    """

    gamma: float
    t: float
    p: float
    critical_value: float

    @property
    def known(self) -> bool:
        """Whether the row carries a test at all (a fitted gamma with a t or p)."""
        return math.isfinite(self.gamma) and (math.isfinite(self.t) or math.isfinite(self.p))

    @property
    def significant(self) -> bool:
        """Whether gamma differs from 0 at the 5% level (two-sided)."""
        if not self.known:
            return False
        if math.isfinite(self.p):
            return self.p < SIGNIFICANCE_LEVEL
        return abs(self.t) >= self.critical_value

    @property
    def shape(self) -> str:
        """``convex``, ``concave``, ``not significant``, or ``—`` without a test."""
        if not self.known:
            return "—"
        if not self.significant:
            return "not significant"
        return "convex" if self.gamma > 0 else "concave"

    def describe(self) -> str:
        """``p 0.003`` where the p-value is known, else ``t 3.1``."""
        if math.isfinite(self.p):
            return f"p {_pvalue(self.p)}"
        return f"t {_tstat(self.t)}"


def gamma_test(row: Mapping[str, Any]) -> GammaTest:
    """The :class:`GammaTest` of one row of the per-day or summary table."""
    gamma = _finite(row, "gamma")
    t = _finite(row, "gamma_t")
    if not math.isfinite(t):
        se = _finite(row, "gamma_se")
        t = gamma / se if math.isfinite(se) and se > 0 else math.nan
    return GammaTest(gamma=gamma, t=t, p=_finite(row, "gamma_p"), critical_value=_critical_value(row))


def _curve_label(row: Mapping[str, Any]) -> tuple[str, str]:
    """Shape of the curve by the test of gamma: (label, css class)."""
    shape = gamma_test(row).shape
    return shape, {"convex": "convex", "concave": "concave", "not significant": "ns"}.get(shape, "")


def _huber_sensitivity(row: Mapping[str, Any]) -> float:
    """The Huber fit's sensitivity today: ``huber_sensitivity``, else from its beta and gamma."""
    value = _finite(row, "huber_sensitivity")
    if math.isfinite(value):
        return value
    return _finite(row, "huber_beta") + 2.0 * _finite(row, "huber_gamma") * _finite(row, "index_return")


def huber_disagrees(row: Mapping[str, Any]) -> bool | None:
    """Whether the Huber fit falls outside the OLS fit's 95% intervals (``None``: unknown).

    True when the Huber sensitivity lies outside the OLS sensitivity interval, or the Huber
    gamma outside ``gamma ± q*gamma_se``: a few large days (an earnings jump) drive the OLS
    estimate.
    """
    huber = _huber_sensitivity(row)
    lower, upper = _finite(row, "sensitivity_ci_lower"), _finite(row, "sensitivity_ci_upper")
    if not all(math.isfinite(v) for v in (huber, lower, upper)):
        return None
    outside = not lower <= huber <= upper
    h_gamma, gamma, se = _finite(row, "huber_gamma"), _finite(row, "gamma"), _finite(row, "gamma_se")
    if all(math.isfinite(v) for v in (h_gamma, gamma, se)):
        outside = outside or abs(h_gamma - gamma) > _critical_value(row) * se
    return outside


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    return all(c in frame.columns for c in columns)


_CSS: Final[str] = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0 auto; max-width: 1320px; padding: 1rem 1.5rem 3rem; color: #1d232b; line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0.2rem 0; }
h2 { font-size: 1.2rem; margin: 1.6rem 0 0.6rem; border-bottom: 1px solid #d8dde3; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin: 0 0 0.3rem; }
h3 small, .sub { color: #5a6570; font-weight: normal; }
header .sub { margin: 0.1rem 0 0.4rem; }
.headline { background: #f3f7fc; border-left: 4px solid #1f5fa8; padding: 0.45rem 0.9rem;
  margin: 0.4rem 0 0.7rem; font-size: 0.95rem; }
.headline p { margin: 0.15rem 0; }
.howto { background: #f5f7fa; border-left: 4px solid #8aa1b8; padding: 0.6rem 0.9rem; font-size: 0.92rem; }
.howto p { margin: 0.3rem 0; }
.failures { background: #fdecec; border: 1px solid #d9534f; border-left-width: 6px; padding: 0.5rem 0.9rem;
  margin: 0.8rem 0; }
.failures h2 { color: #a12622; border: none; margin: 0.2rem 0; font-size: 1.05rem; }
.failures ul, .warnings ul { margin: 0.3rem 0; }
.warnings { background: #fff8e6; border: 1px solid #e0b040; border-left-width: 6px; padding: 0.4rem 0.9rem;
  margin: 0.8rem 0; font-size: 0.92rem; }
.overview { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.86rem; font-variant-numeric: tabular-nums; }
th, td { padding: 0.2rem 0.45rem; border-bottom: 1px solid #e4e8ec; white-space: nowrap; }
th { background: #eef1f5; text-align: left; position: sticky; top: 0; white-space: normal;
  vertical-align: bottom; }
th[title] { text-decoration: underline dotted #8a96a3; cursor: help; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.convex { color: #1a7f37; font-weight: 600; }
td.concave { color: #b35900; font-weight: 600; }
td.ns { color: #6a737d; }
.ci { color: #4a545e; }
.overview td img { display: block; height: 24px; width: auto; }
.differs { color: #a12622; font-weight: 600; }
.agrees { color: #6a737d; }
.stale { color: #a12622; font-size: 0.75rem; }
.ticker { margin: 1.6rem 0; padding-top: 0.6rem; border-top: 1px solid #e4e8ec; }
.facts { font-size: 0.9rem; margin: 0.2rem 0 0.5rem; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef1f5; }
figcaption { font-size: 0.8rem; color: #4a545e; max-width: 560px; }
figure.wide figcaption { max-width: none; }
table.scenarios caption { caption-side: bottom; text-align: left; font-size: 0.8rem; color: #4a545e;
  max-width: 560px; white-space: normal; padding-top: 0.3rem; }
table.scenarios tr.extrapolated td { color: #6a737d; font-style: italic; }
.note { background: #f5f7fa; padding: 0.5rem 0.8rem; font-size: 0.9rem; }
pre { background: #f5f7fa; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; }
dt { font-weight: 600; margin-top: 0.5rem; }
a { color: #1f5fa8; }
"""


def _howto(crit: float, *, has_p: bool) -> str:
    test = "p &lt; 0.05 (the p-value of γ)" if has_p else f"|t| = |γ / se(γ)| ≥ {crit:.2f}"
    return (
        '<section class="howto" id="howto"><p><strong>How to read this.</strong> For each stock the '
        "quadratic market model r<sub>stock</sub> = α + β·r<sub>index</sub> + "
        "γ·r<sub>index</sub><sup>2</sup> is fitted by least squares on daily simple returns over the "
        "window. <strong>Sensitivity</strong> is the slope of that curve at today's index return, "
        "d r<sub>stock</sub> / d r<sub>index</sub> = β + 2γ·r<sub>index</sub>: the % move of the stock "
        "for a 1% move of the index today (1 = moves one for one with the index, above 1 amplifies it, "
        "below 1 dampens it). The index moves about 1% on a typical day, so sensitivity differs much "
        "from β only on days of large index moves.</p>"
        "<p><strong>Curve.</strong> γ &gt; 0: the stock gains more in large index rises than it loses "
        "in large falls (convex); γ &lt; 0 the reverse (concave). The curve is called convex or "
        f"concave only when {test}; otherwise it is not distinguishable from a straight line. Where "
        "shown, ΔAIC = AIC(quadratic) − AIC(linear) on the same window (&lt; 0 favours the curve), "
        "β up / down are plain slopes on the days the index rose / fell, the secant β + γ·r<sub>index"
        "</sub> is the average slope from a flat day to today's move (Treynor–Mazuy's reading), and "
        "a Huber fit, which down-weights a few extreme days, is flagged where it falls outside the "
        "OLS intervals. For one stock, curvature reflects coskewness or option-like leverage, not "
        "market timing.</p>"
        "<p><strong>Price Δ per +1% index</strong> = 0.01 × sensitivity × previous close: the expected "
        "price move, in the stock's currency, for a +1% index move today. Brackets and bands are 95% "
        "confidence intervals of the fit (they do not include the day's own noise); the linear β is "
        "the plain one-factor slope on the same window, for comparison.</p></section>"
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


def _hac_lags(manifest: Mapping[str, Any]) -> tuple[int, ...]:
    """Positive integers under ``config.model`` keys that name a lag (``hac_lags``, ...)."""
    config = manifest.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping):
        return ()
    return tuple(
        v
        for k, v in model.items()
        if "lag" in str(k) and isinstance(v, int) and not isinstance(v, bool) and v > 0
    )


# --------------------------------------------------------------------------------------------
# The overview
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Column:
    """One optional-aware column of the overview table."""

    head: str
    title: str
    cell: Callable[[Mapping[str, Any]], str]
    needs: tuple[str, ...] = ()
    num: bool = True


def _td(text: str, cls: str = "num") -> str:
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _sens_cell(row: Mapping[str, Any]) -> str:
    if not math.isfinite(_finite(row, "sensitivity")):
        return _td("—")
    ci = f"[{_num(row['sensitivity_ci_lower'])}, {_num(row['sensitivity_ci_upper'])}]"
    return _td(f'<strong>{_num(row["sensitivity"])}</strong> <span class="ci">{ci}</span>')


def _curve_cell(row: Mapping[str, Any]) -> str:
    shape, cls = _curve_label(row)
    text = {"convex": "▲ convex", "concave": "▼ concave", "ns": "○ n.s."}.get(cls, shape)
    return _td(text, cls)


def _gamma_text(row: Mapping[str, Any]) -> str:
    """``40.1 (0.003)``: gamma and its p-value, or its t-statistic where there is no p-value."""
    test = gamma_test(row)
    detail = ""
    if math.isfinite(test.p):
        detail = f" ({_pvalue(test.p)})"
    elif math.isfinite(test.t):
        detail = f" ({_tstat(test.t)})"
    return f"{_num(row.get('gamma'), '.1f')}{detail}"


def _gamma_cell(row: Mapping[str, Any]) -> str:
    return _td(_gamma_text(row))


def _updown_cell(row: Mapping[str, Any]) -> str:
    return _td(f"{_num(row['up_beta'])} / {_num(row['down_beta'])}")


def _huber_cell(row: Mapping[str, Any]) -> str:
    value = _num(_huber_sensitivity(row))
    verdict = huber_disagrees(row)
    if verdict is None:
        return _td(value)
    if verdict:
        return _td(f'{value} <span class="differs" title="outside the OLS 95% intervals">⚠ differs</span>')
    return _td(f'{value} <span class="agrees">≈</span>')


def _overview_columns(table: pd.DataFrame) -> list[_Column]:
    has_p = _has(table, "gamma_p")
    test = "p < 0.05" if has_p else "|t| ≥ q (the interval's quantile)"
    columns = [
        _Column(
            "Sensitivity [95% CI]",
            "Today's slope of the fitted curve, β + 2γ·r_index (stock % per index %), with its 95% "
            "confidence interval (delta method)",
            _sens_cell,
        ),
        _Column(
            "Curve",
            f"Convex (▲) or concave (▼) where γ differs from 0 at 5% ({test}); ○ n.s.: not significant",
            _curve_cell,
            num=False,
        ),
        _Column(
            "γ (p)" if has_p else "γ (t)",
            "Curvature γ and its p-value" if has_p else "Curvature γ and its t-statistic γ / se(γ)",
            _gamma_cell,
        ),
        _Column(
            "ΔAIC",
            "AIC(quadratic) − AIC(linear) on the same window: < 0 favours the curve (below −2 some "
            "support, below −10 strong)",
            lambda r: _td(_num(r["delta_aic"], ".1f")),
            needs=("delta_aic",),
        ),
        _Column("β", "Slope on a flat index day (r_index = 0)", lambda r: _td(_num(r["beta"]))),
        _Column(
            "Secant",
            "β + γ·r_index: average slope from a flat day to today's index move (Treynor–Mazuy's reading)",
            lambda r: _td(_num(r["secant_slope"])),
            needs=("secant_slope",),
        ),
        _Column(
            "β up / down",
            "Linear slopes fitted on the days the index rose / fell",
            _updown_cell,
            needs=("up_beta", "down_beta"),
        ),
        _Column(
            "Huber",
            "Sensitivity of a Huber (outlier-robust) fit; ⚠ where it falls outside the OLS 95% intervals",
            _huber_cell,
            needs=("huber_sensitivity",)
            if _has(table, "huber_sensitivity")
            else ("huber_beta", "huber_gamma"),
        ),
        _Column(
            "Linear β", "Plain OLS slope on [1, r_index], same window", lambda r: _td(_num(r["linear_beta"]))
        ),
        _Column("R²", "R² of the quadratic fit", lambda r: _td(_num(r["r2"]))),
        _Column("n", "Stock returns in the window", lambda r: _td(_int(r["n_obs"]))),
        _Column(
            "Price Δ / +1% index",
            "0.01 × sensitivity × previous close, in the stock's currency",
            lambda r: _td(_num(r["dollar_sensitivity"], ",.4f")),
        ),
    ]
    return [c for c in columns if _has(table, *c.needs)]


def _overview_head(columns: Sequence[_Column]) -> str:
    cells = ["<th>Ticker</th>"]
    for c in columns:
        cls = ' class="num"' if c.num else ""
        cells.append(f'<th{cls} title="{_e(c.title)}">{_e(c.head)}</th>')
    cells.append("<th>Last year</th>")
    return f"<thead><tr>{''.join(cells)}</tr></thead>"


def _overview_row(
    row: Mapping[str, Any], columns: Sequence[_Column], anchor: str, as_of: dt.date, spark: str
) -> str:
    day = _to_date(row["date"])
    stale = f'<br><span class="stale">no data since<br>{_e(day)}</span>' if day < as_of else ""
    cells = [f'<td><a href="#{anchor}">{_e(row["ticker"])}</a>{stale}</td>']
    cells += [c.cell(row) for c in columns]
    cells.append(f"<td>{spark}</td>")
    return f"<tr>{''.join(cells)}</tr>"


def _describe(row: Mapping[str, Any], anchor: str) -> str:
    test = gamma_test(row)
    curve = f"curve {test.shape}" if test.known else "no test of the curve"
    if test.known:
        curve += f" (γ {_num(row['gamma'], '.1f')}, {test.describe()})"
    return (
        f'<a href="#{anchor}"><strong>{_e(row["ticker"])}</strong></a> '
        f"<strong>{_num(row['sensitivity'])}</strong> "
        f"[{_num(row['sensitivity_ci_lower'])}, {_num(row['sensitivity_ci_upper'])}], {_e(curve)}"
    )


#: From this many tested stocks on, the headline says how many significant curves chance alone
#: would produce (the 5% test run on every stock).
_CHANCE_NOTE_MIN: Final[int] = 10


def _ranked(rows: Sequence[Mapping[str, Any]], as_of: dt.date) -> list[Mapping[str, Any]]:
    """The rows with a fitted sensitivity on ``as_of`` (all fitted rows if none is current), in order."""
    fitted = [r for r in rows if math.isfinite(_finite(r, "sensitivity"))]
    current = [r for r in fitted if _to_date(r["date"]) >= as_of]
    return current or fitted


def _headline(rows: Sequence[Mapping[str, Any]], anchors: Mapping[str, str], as_of: dt.date) -> str:
    """The answer to "which stock is most sensitive today, and is its curve significant?"."""
    fitted = _ranked(rows, as_of)
    if not fitted:
        return '<div class="headline"><p>No stock has a fitted sensitivity on its latest day.</p></div>'
    top = fitted[0]
    parts = [f"<p><strong>Most sensitive today:</strong> {_describe(top, anchors[str(top['ticker'])])}.</p>"]
    if len(fitted) > 1:
        low = fitted[-1]
        parts.append(
            f"<p><strong>Least sensitive:</strong> {_describe(low, anchors[str(low['ticker'])])}.</p>"
        )
    tests = [gamma_test(r) for r in fitted]
    known = [t for t in tests if t.known]
    if known:
        convex = sum(t.shape == "convex" for t in known)
        concave = sum(t.shape == "concave" for t in known)
        chance = (
            f"; by chance alone about {SIGNIFICANCE_LEVEL * len(known):.0f} would be"
            if len(known) >= _CHANCE_NOTE_MIN
            else ""
        )
        parts.append(
            f"<p>The curve is significant at 5% for {convex + concave} of {len(known)} stock(s) "
            f"({convex} convex, {concave} concave{chance})."
        )
    differs = [str(r["ticker"]) for r in fitted if huber_disagrees(r)]
    if any(huber_disagrees(r) is not None for r in fitted):
        text = ", ".join(_e(t) for t in differs[:8]) + (" …" if len(differs) > 8 else "")
        parts[-1] += f" OLS and the outlier-robust Huber fit disagree for {len(differs)}" + (
            f": {text}." if differs else "."
        )
    if known:
        parts[-1] += "</p>"
    stale = [r for r in rows if _to_date(r["date"]) < as_of]
    unfitted = sum(not math.isfinite(_finite(r, "sensitivity")) for r in rows)
    notes = []
    if stale:
        notes.append(f"{len(stale)} stock(s) have no data on {as_of}")
    if unfitted:
        notes.append(f"{unfitted} stock(s) have no fit on their latest day")
    if notes:
        parts.append(f'<p class="sub">{_e("; ".join(notes))}.</p>')
    return f'<div class="headline">{"".join(parts)}</div>'


def _facts(row: Mapping[str, Any]) -> str:
    test = gamma_test(row)
    items = [
        f"Latest day {_e(_to_date(row['date']))}: sensitivity <strong>{_num(row['sensitivity'])}</strong> "
        f"[{_num(row['sensitivity_ci_lower'])}, {_num(row['sensitivity_ci_upper'])}]",
        f"index return {_percent(row['index_return'])}",
        f"β {_num(row['beta'])}",
        f"γ {_num(row['gamma'])} ({test.describe()}, {test.shape})"
        if test.known
        else f"γ {_num(row['gamma'])}",
    ]
    if "delta_aic" in row:
        items.append(f"ΔAIC {_num(row['delta_aic'], '.1f')}")
    if "secant_slope" in row:
        items.append(f"secant {_num(row['secant_slope'])}")
    if "up_beta" in row and "down_beta" in row:
        items.append(f"β up {_num(row['up_beta'])} / down {_num(row['down_beta'])}")
    verdict = huber_disagrees(row)
    if verdict is not None:
        items.append(
            f"Huber sensitivity {_num(_huber_sensitivity(row))}"
            + (' <span class="differs">(outside the OLS intervals)</span>' if verdict else "")
        )
    items += [
        f"linear β {_num(row['linear_beta'])}",
        f"R² {_num(row['r2'])}",
        f"n {_int(row['n_obs'])}",
        f"close {_num(row['close'], ',.2f')}",
        f"{_num(row['dollar_sensitivity'], ',.4f')} per +1% index",
    ]
    return f'<p class="facts">{" · ".join(items)}</p>'


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


def _checked_scenarios(scenarios: object) -> pd.DataFrame:
    if not isinstance(scenarios, pd.DataFrame):
        raise TypeError(f"scenarios must be a pandas DataFrame or None, got {type(scenarios).__name__}")
    aliases = {
        a: c for a, c in SCENARIO_ALIASES.items() if a in scenarios.columns and c not in scenarios.columns
    }
    scenarios = scenarios.rename(columns=aliases)
    missing = [c for c in SCENARIO_COLUMNS if c not in scenarios.columns]
    if missing:
        raise ValueError(f"scenarios lacks column(s) {', '.join(missing)}")
    return scenarios


def _scenario_lookup(
    scenarios: pd.DataFrame | None,
) -> Callable[[tuple[str, str, int]], pd.DataFrame | None]:
    """The scenario rows of each (index_ticker, ticker, window), by index move (None if none):
    the rows matching its ticker, and its index and window where the table has those columns,
    in the table's order and with its index, then sorted stably by ``index_move``.  The table
    is grouped once (filtering it for each charted section took 2 ms a section)."""
    if scenarios is None or len(scenarios) == 0:
        return lambda key: None
    by_index, by_window = "index_ticker" in scenarios.columns, "window" in scenarios.columns
    tickers = scenarios["ticker"].astype(str).to_numpy()
    none = [None] * len(tickers)
    indexes = scenarios["index_ticker"].astype(str).to_numpy() if by_index else none
    # Numbers compare by value as keys (252 == 252.0, same hash); a missing window (NaN) is
    # never equal to a key's, as in a comparison.
    windows = pd.to_numeric(scenarios["window"], errors="coerce").to_numpy() if by_window else none
    found: dict[tuple[Any, Any, Any], list[int]] = {}
    for i, group in enumerate(zip(indexes, tickers, windows, strict=True)):
        found.setdefault(group, []).append(i)

    def rows_of(key: tuple[str, str, int]) -> pd.DataFrame | None:
        index_ticker, ticker, window = key
        at = found.get((index_ticker if by_index else None, ticker, window if by_window else None))
        return None if not at else scenarios.iloc[at].sort_values("index_move", kind="stable")

    return rows_of


def _signed(value: Any, spec: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return format(v, "+" + spec) if math.isfinite(v) else "—"


def _move(value: Any) -> str:
    """An index move as a percentage without needless decimals (``-0.05`` -> ``-5%``)."""
    v = _finite({"v": value}, "v")
    return f"{100.0 * v:+g}%" if math.isfinite(v) else "—"


def _scenario_table(rows: pd.DataFrame, curve: CharacteristicCurve) -> str:
    has_price_ci = _has(rows, "price_move_ci_lower", "price_move_ci_upper")
    levels = pd.to_numeric(rows["level"], errors="coerce").dropna() if "level" in rows.columns else None
    level = f"{100 * float(levels.iloc[0]):g}%" if levels is not None and len(levels) else "95%"
    head = (
        "<thead><tr><th class='num'>Index move</th><th class='num'>Expected stock return</th>"
        f"<th class='num'>{level} interval</th><th class='num'>Price move</th>"
        + (f"<th class='num'>{level} interval</th>" if has_price_ci else "")
        + "</tr></thead>"
    )
    fits = {str(v) for v in rows["fit"].dropna()} if "fit" in rows.columns else set()
    estimator = "Huber (outlier-robust) fit" if fits == {"huber"} else "fit"
    lo = float(curve.index_return.min()) if curve.n else math.nan
    hi = float(curve.index_return.max()) if curve.n else math.nan
    body: list[str] = []
    outside_any = False
    for _, series in rows.iterrows():
        r = _record(series)
        move = _finite(r, "index_move")
        outside = math.isfinite(lo) and math.isfinite(move) and not lo <= move <= hi
        outside_any |= outside
        cells = [
            _td(_move(r["index_move"]) + (" †" if outside else "")),
            _td(f"<strong>{_percent(r['predicted_return'])}</strong>"),
            _td(f"[{_percent(r['predicted_return_ci_lower'])}, {_percent(r['predicted_return_ci_upper'])}]"),
            _td(_signed(r["price_move"], ",.2f")),
        ]
        if has_price_ci:
            price_ci = (
                f"[{_signed(r['price_move_ci_lower'], ',.2f')}, {_signed(r['price_move_ci_upper'], ',.2f')}]"
            )
            cells.append(_td(price_ci))
        body.append(f"<tr{' class=extrapolated' if outside else ''}>{''.join(cells)}</tr>")
    caption = (
        f"What if the index moves by x today? The expected return of {_e(curve.ticker)} from the "
        f"latest {estimator} (α + β·x + γ·x²) with the {level} confidence interval of that mean (one "
        "day's own noise comes on top), and the price move it implies in the stock's currency."
    )
    if outside_any:
        caption += (
            f" †: beyond the index returns of the fitted window ({100 * lo:+.1f}% to {100 * hi:+.1f}%); "
            "there the curve is extrapolated and the figures are fragile."
        )
    return (
        f'<table class="scenarios" data-ticker="{_e(curve.ticker)}"><caption>{caption}</caption>'
        f"{head}<tbody>{''.join(body)}</tbody></table>"
    )


# --------------------------------------------------------------------------------------------
# Per ticker and the page
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SectionCharts:
    """The figures the per-ticker sections draw in, one per kind of chart (see :class:`_Chart`)."""

    characteristic: _Chart
    sensitivity: _Chart
    gamma: _Chart

    @classmethod
    def new(cls) -> _SectionCharts:
        """Three new, empty figures, each drawn once per chart as built (``final``)."""
        return cls(_Chart(final=True), _Chart(final=True), _Chart(final=True))


def _ticker_section(
    row: Mapping[str, Any],
    anchor: str,
    history: pd.DataFrame | None,
    min_obs: int | None,
    *,
    scenarios: pd.DataFrame | None = None,
    hac_lags: Sequence[int] = (),
    charts: _SectionCharts | None = None,
) -> str:
    """One ticker's section; ``history`` is its per-day rows as :func:`_one_combination` returns them."""
    ticker, index_ticker, window = str(row["ticker"]), str(row["index_ticker"]), int(row["window"])
    head = (
        f'<section class="ticker" id="{anchor}" data-ticker="{_e(ticker)}"><h3>{_e(ticker)} <small>vs '
        f"{_e(index_ticker)} · {_e(_window_label(window))}</small></h3>"
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
    charts = charts or _SectionCharts.new()
    curve = _characteristic_curve(history, hac_lags)
    scatter = _img(
        _characteristic_curve_figure(curve, charts.characteristic),
        "characteristic",
        f"{ticker} daily returns against {index_ticker} with quadratic and linear fits",
        CHART_DPI,
    )
    timeline = _img(
        _sensitivity_history_figure(history, charts.sensitivity),
        "sensitivity",
        f"{ticker} sensitivity to {index_ticker} per day with 95% band and linear beta",
        CHART_DPI,
    )
    sample = "every aligned day" if window == 0 else "the latest window"
    band = (
        f"with its 95% confidence band ({_e(curve.covariance_kind)} covariance, "
        f"±{curve.critical_value:.2f} standard errors)"
        if curve.covariance is not None
        else f"({_e(curve.band_note)})"
    )
    huber = " Dotted green: the Huber (outlier-robust) fit of the same window." if curve.huber else ""
    cap_scatter = (
        f"Daily simple {'excess ' if curve.excess else ''}returns of {_e(ticker)} against "
        f"{_e(index_ticker)} over {sample} "
        f"(n = {curve.n}), the points of the latest fit. Solid: the fitted quadratic (latest α, β, γ) "
        f"{band}. Dashed: the linear fit of the same points (numpy.polyfit, degree 1; its slope is "
        f"the linear beta).{huber} Orange segment: the tangent at today's index return, whose slope "
        "is today's sensitivity; the orange dot is today's return."
    )
    cap_timeline = (
        "Per-day sensitivity β<sub>t</sub> + 2γ<sub>t</sub>·r<sub>index,t</sub> with its 95% "
        "confidence interval (delta method), and the linear beta of the same window. Gaps are "
        "days without a fit (warm-up or a singular window)."
    )
    figures = [
        f"<figure>{scatter}<figcaption>{cap_scatter}</figcaption></figure>",
        f"<figure>{timeline}<figcaption>{cap_timeline}</figcaption></figure>",
    ]
    if window > 0:
        test = "p &lt; 0.05" if "gamma_p" in history.columns else "|t| ≥ the interval's quantile"
        gamma_img = _img(
            _gamma_history_figure(history, charts.gamma),
            "gamma",
            f"{ticker} curvature gamma per day with 95% band and significance",
            CHART_DPI,
        )
        cap_gamma = (
            "Curvature γ<sub>t</sub> of each day's window with its 95% confidence interval "
            f"(γ ± q·se(γ)). Shaded: days on which γ differs from 0 at 5% ({test}), i.e. the "
            "curve is significantly convex (γ &gt; 0) or concave (γ &lt; 0). Single-stock "
            "estimates of γ are noisy: read the band, not the line."
        )
        figures.append(f"<figure>{gamma_img}<figcaption>{cap_gamma}</figcaption></figure>")
    if scenarios is not None:
        figures.append(f"<div>{_scenario_table(scenarios, curve)}</div>")
    return head + _facts(row) + '<div class="charts">' + "".join(figures) + "</div></section>"


def _charted(ordered: Sequence[Mapping[str, Any]], limit: int, as_of: dt.date) -> set[str]:
    """The tickers that get charts: all up to ``limit``, else the most and least sensitive today."""
    tickers = [str(r["ticker"]) for r in ordered]
    if len(tickers) <= limit:
        return set(tickers)
    fitted = [str(r["ticker"]) for r in _ranked(ordered, as_of)]
    top = limit // 2
    return set(fitted[:top]) | set(fitted[len(fitted) - (limit - top) :] if limit > top else [])


def _omitted_html(omitted: Sequence[str], anchor: str, total: int, limit: int, index_ticker: str) -> str:
    names = ", ".join(_e(t) for t in omitted)
    return (
        f'<section class="ticker omitted" id="{anchor}"><h3>Charts omitted for {len(omitted)} '
        f'ticker(s) <small>vs {_e(index_ticker)}</small></h3><p class="note">This universe has {total} '
        f"tickers; to keep the page small, charts are drawn for the {limit // 2} most and the "
        f"{limit - limit // 2} least sensitive today. Every ticker is in the overview table above and "
        "in <code>reports/sensitivity/</code> and <code>reports/summary/</code>. Without charts, in "
        f"the overview's order: {names}.</p></section>"
    )


def _heatmap_html(
    rows: pd.DataFrame | None,
    span: pd.Series,
    tickers: Sequence[str],
    total: int,
    index_ticker: str,
    n_top: int,
) -> str:
    """The heatmap of ``tickers`` (their per-day ``rows``); when they are a subset, a line
    splits the top ``n_top`` off.  ``span``: the first and last date of the whole group,
    whose length sets the bins (:func:`_heatmap_freq`), named in the caption."""
    if rows is None or not tickers or not np.isfinite(_floats(rows["sensitivity"])).any():
        return '<p class="note">No fitted sensitivity on any day yet: nothing to map.</p>'
    bins = _heatmap_freq(span)
    fig = sensitivity_heatmap_figure(rows, tickers=tickers, freq=bins)
    subset = ""
    if len(tickers) < total and 0 < n_top < len(tickers):
        fig.axes[0].axhline(n_top, color="black", lw=1.5)
        subset = (
            f" Shown: the {n_top} most and {len(tickers) - n_top} least sensitive today of {total} "
            "(a black line between them)."
        )
    elif len(tickers) < total:
        subset = f" Shown: the {len(tickers)} tickers with charts, of {total}."
    freq = _FREQ_WORDS.get(bins, "period")
    img = _img(fig, "heatmap", f"heatmap of {freq} mean sensitivity per ticker to {index_ticker}", CHART_DPI)
    caption = (
        f"Mean sensitivity per ticker (rows, in the overview's order) and {freq.removesuffix('ly')} "
        "(columns). White is 1 (moves one for one with the index), red above, blue below; grey: no "
        f"fitted day (warm-up, or not trading).{subset}"
    )
    return f'<figure class="wide">{img}<figcaption>{caption}</figcaption></figure>'


def render_report(
    sensitivity: PageRows,
    summary: pd.DataFrame,
    manifest: Mapping[str, Any],
    *,
    scenarios: pd.DataFrame | None = None,
    chart_limit: int = CHART_LIMIT,
    workers: int | None = None,
    draft: SectionDraft | None = None,
) -> bytes:
    """The HTML report of one ``as_of``, as UTF-8 bytes; self-contained (charts embedded).

    ``sensitivity`` is the per-day table (the charts' history), or the same rows already split
    by combination: a mapping ``(index_ticker, ticker, window)`` -> that combination's rows
    (a DataFrame, an Arrow table or a :class:`RowSource` with the per-day table's columns,
    dates increasing), as a caller that holds them per combination has them; the page is
    byte for byte the same, a row source is read for the dates and sensitivities only unless
    its combination is charted, and only the charted combinations are converted to pandas
    (a 500-ticker page otherwise grouped and copied 2.5 million rows: about 1 s).  ``summary`` the output of
    :func:`summary_table` (rows of other ``as_of`` dates are ignored; the latest is reported),
    ``manifest`` the run's manifest (``failures``: symbol -> reason and ``warnings`` are shown
    at the top, everything else under "Run details"; ``config.model`` keys naming a lag feed
    the rebuilt HAC band), ``scenarios`` an optional what-if table (columns
    :data:`SCENARIO_COLUMNS` as in ``reports/scenarios/``, optionally ``index_ticker``,
    ``window``, ``as_of``, ``level``, ``fit``, ``price_move_ci_lower``/``_upper``; the short
    names of :data:`SCENARIO_ALIASES` are accepted; rows of another ``as_of`` are ignored).

    The page holds, per (``index_ticker``, ``window``): a headline naming the most and least
    sensitive stock today and whether their curves are significant, the overview sorted by
    today's sensitivity with a sparkline per row (columns the table lacks, such as
    ``gamma_p``, ``delta_aic``, ``up_beta``/``down_beta``, ``secant_slope`` or the Huber fit,
    are left out), and one heatmap of sensitivity across tickers through time; then per ticker
    the characteristic curve, the sensitivity through time, the rolling gamma with its
    significance and the scenario table, or a note when the ticker has no fitted value.  Above
    ``chart_limit`` tickers per (index, window) only the ``chart_limit // 2`` most and least
    sensitive get charts (a note lists the others).  Raises ``ValueError`` for an empty or
    incomplete frame.

    ``workers``: processes that draw ticker sections beside the caller (matplotlib holds the
    GIL, so threads would not help); None picks one per spare CPU, at most
    :data:`~sensitivity.plan.MAX_SECTION_WORKERS` and one per
    :data:`~sensitivity.plan.SECTIONS_PER_WORKER` sections (:func:`sensitivity.plan.section_workers`;
    a worker :func:`sensitivity.process_pool.prestart` started is taken first); 0 draws everything
    here.  The page is byte for byte the same either way (the workers take this process's
    ``sys.path`` and matplotlib ``rcParams``, though not fonts added at run time with
    ``font_manager.fontManager.addfont``: pass 0 then); see :mod:`sensitivity.process_pool`.
    ``draft``: sections :func:`draft_sections` started earlier, taken over (their workers go on
    drawing for this page) when each is the job this page would draw, else closed.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be None or an integer >= 0, got {workers!r}")
    try:
        # The charted rows a draft of the same mapping read already are not read again.
        known = draft.histories if draft is not None and draft.source is sensitivity else None
        inputs = _page_inputs(sensitivity, summary, manifest, scenarios, chart_limit, known)
        layouts = _layouts(inputs)
        jobs = list(_section_jobs(inputs, layouts))
    except BaseException:
        if draft is not None:
            draft.close()
        raise
    if draft is not None and _same_jobs(draft.jobs, [job for _, job in jobs]):
        pool = draft.pool  # its workers have been drawing these sections already
    else:
        if draft is not None:
            draft.close()  # drawn from other inputs: not this page's
        # Started now, so that the workers boot while the overview is drawn here.
        pool = _section_pool(len(jobs), workers)
        for _, job in jobs:
            pool.submit(*job)
    try:
        page = _render_page(inputs, layouts, {key: i for i, (key, _) in enumerate(jobs)}, pool)
    finally:
        pool.close()
    return "\n".join(p for p in page if p).encode("utf-8")


def _page_inputs(
    sensitivity: PageRows,
    summary: pd.DataFrame,
    manifest: Mapping[str, Any],
    scenarios: pd.DataFrame | None,
    chart_limit: int,
    known: Mapping[tuple[str, str, int], _History] | None = None,
    *,
    read_rows: bool = True,
) -> _PageInputs:
    """:func:`render_report`'s inputs, checked and grouped (its ``ValueError``/``TypeError``);
    ``known``: as :func:`_histories` takes it; without ``read_rows`` no rows are read (the
    inputs' ``histories`` are empty: for :func:`draft_sections`, which reads its own)."""
    if isinstance(chart_limit, bool) or not isinstance(chart_limit, int) or chart_limit < 2:
        raise ValueError(f"chart_limit must be an integer >= 2, got {chart_limit!r}")
    histories = _histories(sensitivity, known) if read_rows else {}
    table = _checked_frame(summary, "summary", ("as_of", *SENSITIVITY_COLUMNS))
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a mapping, got {type(manifest).__name__}")
    as_of_days = _timestamps(table["as_of"], "summary.as_of")
    as_of = _to_date(as_of_days.max())
    table = table.loc[(as_of_days == as_of_days.max()).to_numpy()]
    what_if = None if scenarios is None else _checked_scenarios(scenarios)
    if what_if is not None and "as_of" in what_if.columns and len(what_if):
        days = _timestamps(what_if["as_of"], "scenarios.as_of")
        what_if = what_if.loc[(days.dt.date == as_of).to_numpy()]
    groups = [
        (str(cast(tuple[Any, Any], key)[0]), int(cast(tuple[Any, Any], key)[1]), group)
        for key, group in table.groupby(["index_ticker", "window"], sort=True)
    ]
    return _PageInputs(
        table=table,
        groups=groups,
        histories=histories,
        manifest=manifest,
        what_if=what_if,
        min_obs=_min_obs(manifest),
        hac_lags=_hac_lags(manifest),
        chart_limit=chart_limit,
        as_of=as_of,
    )


@dataclass(frozen=True)
class _GroupLayout:
    """One overview group's rows in page order, the tickers it charts and each row's anchor."""

    index_ticker: str
    window: int
    ordered: list[dict[str, Any]]
    charted: set[str]
    anchors: dict[str, str]
    omitted_anchor: str


def _layouts(inputs: _PageInputs) -> list[_GroupLayout]:
    """Each group's :class:`_GroupLayout`; charted sections are anchored ``t1``, ``t2``, ... in
    page order across groups, the others link to their group's list of omitted tickers."""
    out: list[_GroupLayout] = []
    n_anchor = 0
    for n_group, (index_ticker, window, group) in enumerate(inputs.groups, start=1):
        stale = (_timestamps(group["date"], "summary.date").dt.date < inputs.as_of).to_numpy()
        ordered = [
            {str(k): v for k, v in record.items()}
            for record in group.assign(_stale=stale)
            .sort_values(
                ["_stale", "sensitivity", "ticker"],
                ascending=[True, False, True],
                na_position="last",
                kind="stable",
            )
            .drop(columns="_stale")
            .to_dict("records")
        ]
        charted = _charted(ordered, inputs.chart_limit, inputs.as_of)
        omitted_anchor = f"g{n_group}-omitted"
        anchors: dict[str, str] = {}
        for row in ordered:
            if str(row["ticker"]) in charted:
                n_anchor += 1
                anchors[str(row["ticker"])] = f"t{n_anchor}"
            else:
                anchors[str(row["ticker"])] = omitted_anchor
        out.append(_GroupLayout(index_ticker, window, ordered, charted, anchors, omitted_anchor))
    return out


#: A charted section to draw: ``(row, anchor, history, min_obs, scenarios, hac_lags)``.
_SectionJob = tuple[Any, ...]


def _section_jobs(
    inputs: _PageInputs,
    layouts: Sequence[_GroupLayout],
    history_of: Callable[[tuple[str, str, int]], _History | None] | None = None,
) -> Iterator[tuple[tuple[str, str, int], _SectionJob]]:
    """The charted sections of the page, in page order, each with its combination (one at a
    time: a caller can hand each to a worker as it comes); ``history_of``: where a
    combination's rows come from (default: ``inputs.histories``)."""
    lookup = inputs.histories.get if history_of is None else history_of
    scenario_rows_of = _scenario_lookup(inputs.what_if)
    for layout in layouts:
        for row in layout.ordered:
            ticker = str(row["ticker"])
            if ticker not in layout.charted:
                continue
            key = (layout.index_ticker, ticker, layout.window)
            history = lookup(key)
            rows = None if history is None else history.frame()
            scenario_rows = scenario_rows_of(key)
            yield (
                key,
                (row, layout.anchors[ticker], rows, inputs.min_obs, scenario_rows, tuple(inputs.hac_lags)),
            )


def _same_value(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` draw the same section: equal and of one type (1 and 1.0 are
    written differently), NaN equal to NaN, frames equal in columns, types and values."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, pd.DataFrame):
        return (
            list(a.columns) == list(b.columns)
            and a.dtypes.to_dict() == b.dtypes.to_dict()
            and a.index.equals(b.index)
            and a.equals(b)
        )
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | np.floating) and math.isnan(a):
        return bool(math.isnan(b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # pragma: no cover - values without a plain truth
        return False


def _same_jobs(drafted: Sequence[_SectionJob], jobs: Sequence[_SectionJob]) -> bool:
    return _same_value(list(drafted), list(jobs))


@dataclass(eq=False)
class SectionDraft:
    """Charted sections that worker processes started drawing before the report was asked
    for (:func:`draft_sections`); :func:`render_report` takes them over or closes them."""

    pool: ProcessPool
    jobs: list[_SectionJob]
    #: The rows it drew from (``sensitivity``, the object given) and the charted ones as the
    #: page reads them: a page of the same object does not read those again.
    source: object
    histories: Mapping[tuple[str, str, int], _History]

    def close(self) -> None:
        """Stop the workers (what they drew is dropped)."""
        self.pool.close(wait=False)


def draft_sections(
    sensitivity: PageRows,
    summary: pd.DataFrame,
    manifest: Mapping[str, Any],
    *,
    scenarios: pd.DataFrame | None = None,
    chart_limit: int = CHART_LIMIT,
    workers: int | None = None,
) -> SectionDraft | None:
    """Start drawing the charted sections of the page :func:`render_report` would draw from
    these inputs, in worker processes, and return at once (None without workers).

    For a caller that has the page's inputs before it can ask for the page (the daily run's
    fit, before it writes its files: the workers draw while the writes leave a core half
    idle).  Pass the draft to :func:`render_report` (``draft=``): it takes over the sections
    drawn and drawing only if each is the one it would draw itself (the same row, anchor,
    rows, settings and scenarios, compared value by value and type by type), else it closes
    the draft and draws them again; the page is the same either way.  Only ``config.model``
    of ``manifest`` matters here, and only the charted combinations' rows are read (each is
    handed to the workers as soon as it is); ``sensitivity`` must be the mapping form (a
    single table gives None).  Close a draft that is not handed on (:meth:`SectionDraft.close`).
    """
    if not isinstance(sensitivity, Mapping):
        return None  # a table is grouped whole by the page: nothing to start early
    inputs = _page_inputs(sensitivity, summary, manifest, scenarios, chart_limit, read_rows=False)
    layouts = _layouts(inputs)
    pool = _section_pool(sum(len(layout.charted) for layout in layouts), workers)
    if pool.processes == 0:
        pool.close()
        return None
    histories: dict[tuple[str, str, int], _History] = {}

    def history_of(key: tuple[str, str, int]) -> _History | None:
        rows = sensitivity.get(key)
        if rows is None:
            return None
        history = _History(rows, _checked_rows(key, rows))
        if not len(history.dates):
            return None
        histories[key] = history
        return history

    jobs: list[_SectionJob] = []
    try:
        # Only the charted rows are read, each handed to the workers as soon as it is.
        for _, job in _section_jobs(inputs, layouts, history_of):
            pool.submit(*job)
            jobs.append(job)
    except BaseException:
        pool.close(wait=False)
        raise
    return SectionDraft(pool, jobs, sensitivity, histories)


def _section_pool(sections: int, workers: int | None) -> ProcessPool:
    """The worker processes for ``sections`` charted sections (none when too few to pay off)."""
    return ProcessPool(
        SECTION_WORKER,
        section_workers(sections, workers),
        initializer="sensitivity.report:_worker_setup",
        initargs=({k: v for k, v in rcParams.items() if k != "backend"},),
    )


#: A worker process's figures, reused from section to section (see :class:`_Chart`).
_WORKER_CHARTS: _SectionCharts | None = None


def _worker_setup(rc: Mapping[str, Any]) -> None:
    """In a worker process: the caller's matplotlib settings, so the pixels are the same."""
    rcParams.update(cast(dict[Any, Any], rc))


def _worker_section(*job: Any) -> str:
    """In a worker process: :func:`_section_of` the job, in this process's figures."""
    global _WORKER_CHARTS
    if _WORKER_CHARTS is None:
        _WORKER_CHARTS = _SectionCharts.new()
    return _section_of(job, _WORKER_CHARTS)


def _section_of(job: Sequence[Any], charts: _SectionCharts) -> str:
    """:func:`_ticker_section` of a job ``(row, anchor, history, min_obs, scenarios, hac_lags)``."""
    row, anchor, history, min_obs, scenarios, hac_lags = job
    return _ticker_section(
        row, anchor, history, min_obs, scenarios=scenarios, hac_lags=hac_lags, charts=charts
    )


@dataclass(frozen=True)
class _PageInputs:
    """What one report page is drawn from, checked and grouped by :func:`render_report`."""

    #: The summary rows of the page's ``as_of``.
    table: pd.DataFrame
    #: ``(index_ticker, window, summary rows)`` per overview group, in page order.
    groups: list[tuple[str, int, pd.DataFrame]]
    #: Each (index_ticker, ticker, window)'s per-day rows, oldest first.
    histories: Mapping[tuple[str, str, int], _History]
    manifest: Mapping[str, Any]
    #: The what-if rows of ``as_of`` (None without a scenario table).
    what_if: pd.DataFrame | None
    min_obs: int | None
    hac_lags: tuple[int, ...]
    chart_limit: int
    as_of: dt.date


def _render_page(
    inputs: _PageInputs,
    layouts: Sequence[_GroupLayout],
    positions: Mapping[tuple[str, str, int], int],
    pool: ProcessPool,
) -> list[str]:
    """The parts of the page, in order (see :func:`render_report`); the charted sections are
    ``pool``'s jobs, at ``positions`` (by combination)."""
    table, histories = inputs.table, inputs.histories
    manifest, min_obs = inputs.manifest, inputs.min_obs
    chart_limit, as_of = inputs.chart_limit, inputs.as_of
    sparkline = _Sparkline()
    indexes = sorted({g[0] for g in inputs.groups})
    windows = sorted({g[1] for g in inputs.groups})
    fitted_rows = table.loc[table["sensitivity_se"].notna()]
    crit = _critical_value(_record(fitted_rows.iloc[0])) if len(fitted_rows) else _Z95
    title = f"Market sensitivity to {', '.join(indexes)} — as of {as_of}"
    if len(windows) == 1:
        title += f" — {_window_label(windows[0])}"
    first_day = _to_date(min(h.dates[0] for h in histories.values()))
    subtitle = " · ".join(
        [
            f"{table['ticker'].nunique()} stock(s)",
            f"daily data {first_day} to {as_of}",
            *([] if len(windows) == 1 else [f"windows: {'; '.join(_window_label(w) for w in windows)}"]),
            *([] if min_obs is None else [f"min_obs {min_obs} returns"]),
        ]
    )
    columns = _overview_columns(table)
    head = _overview_head(columns)

    overview: list[str] = []
    heatmaps: list[str] = []
    # A charted section is a job of the pool (a worker may draw it while the overview is drawn
    # here; the rest are drawn here and there at the end) until it is drawn.
    sections: list[str | int] = []
    for n_group, layout in enumerate(layouts, start=1):
        index_ticker, window = layout.index_ticker, layout.window
        ordered, charted, anchors = layout.ordered, layout.charted, layout.anchors
        omitted_anchor = layout.omitted_anchor
        body: list[str] = []
        for row in ordered:
            ticker = str(row["ticker"])
            history = histories.get((index_ticker, ticker, window))
            spark = "—"
            if history is not None:
                dates = history.dates
                start = _recent(dates, SPARK_DAYS)
                recent = history.sensitivity(start)
                if np.isfinite(recent).any():
                    spark = _img(
                        sparkline.draw(dates[start:], recent),
                        "sparkline",
                        f"{ticker} sensitivity over the last year",
                        SPARK_DPI,
                    )
            body.append(_overview_row(row, columns, anchors[ticker], as_of, spark))
            if ticker in charted:
                sections.append(positions[(index_ticker, ticker, window)])
        omitted = [str(r["ticker"]) for r in ordered if str(r["ticker"]) not in charted]
        if omitted:
            sections.append(_omitted_html(omitted, omitted_anchor, len(ordered), chart_limit, index_ticker))
        test = "p &lt; 0.05" if _has(table, "gamma_p") else "|t| significant"
        overview.append(
            f'<section class="overview-group" id="overview-{n_group}">'
            f"<h2>Overview: vs {_e(index_ticker)}, {_e(_window_label(window))}</h2>"
            + _headline(ordered, anchors, as_of)
            + f'<div class="overview"><table>{head}<tbody>{"".join(body)}</tbody></table></div>'
            + '<p class="sub">Sorted by today\'s sensitivity (stocks without data today last). Curve: '
            f"▲ convex / ▼ concave where γ differs from 0 at 5% ({test}), ○ n.s.: not significant. "
            "Hover a column header for its definition; click a ticker for its charts.</p></section>"
        )
        shown = [str(r["ticker"]) for r in ordered if str(r["ticker"]) in charted]
        in_group = [h for (i, _, w), h in histories.items() if i == index_ticker and w == window]
        span = pd.Series([min(h.dates[0] for h in in_group), max(h.dates[-1] for h in in_group)])
        drawn_rows = [
            histories[(index_ticker, t, window)] for t in shown if (index_ticker, t, window) in histories
        ]
        rows = pd.concat([h.frame() for h in drawn_rows], ignore_index=True) if drawn_rows else None
        n_top = chart_limit // 2 if len(shown) == chart_limit else len(shown)
        heatmaps.append(_heatmap_html(rows, span, shown, len(ordered), index_ticker, n_top))

    charts = _SectionCharts.new()

    def draw_here(*job: Any) -> str:
        return _section_of(job, charts)

    drawn = pool.gather(draw_here)
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(title)}</h1><p class="sub">{_e(subtitle)}</p></header>',
        _failures_html(manifest.get("failures")),
        _warnings_html(manifest.get("warnings")),
        *overview,
        '<section id="heatmap"><h2>Sensitivity across stocks through time</h2>',
        *heatmaps,
        "</section>",
        _howto(crit, has_p=_has(table, "gamma_p")),
        "<h2>Per ticker</h2>",
        *(drawn[part] if isinstance(part, int) else part for part in sections),
        _manifest_html(manifest),
        "</body></html>",
    ]


# --------------------------------------------------------------------------------------------
# Markdown (the Prefect artifact)
# --------------------------------------------------------------------------------------------


def _md(value: object) -> str:
    """``value`` as one Markdown table cell (pipes escaped, no line breaks)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def overview_markdown(summary: pd.DataFrame | Sequence[Mapping[str, Any]], *, limit: int = 20) -> str:
    """The top of the overview as a Markdown table, for a Prefect markdown artifact.

    ``summary`` is the summary table (or its rows as mappings); it needs ``ticker`` and
    ``sensitivity``, and uses ``sensitivity_ci_lower``/``_upper`` (else ``sensitivity_se``,
    with a normal 95% quantile, flagged ``≈``), ``gamma`` with ``gamma_p`` (else ``gamma_t`` or
    ``gamma / gamma_se``) and ``r2`` where present.  Rows are sorted by sensitivity, highest
    first (missing values last); the first ``limit`` are shown, and a line says how many more
    there are.  Returns an empty string for no rows.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    frame = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(list(summary))
    if len(frame) == 0:
        return ""
    missing = [c for c in ("ticker", "sensitivity") if c not in frame.columns]
    if missing:
        raise ValueError(f"summary lacks column(s) {', '.join(missing)}")
    key = pd.to_numeric(frame["sensitivity"], errors="coerce")
    ordered = frame.assign(_key=key.to_numpy()).sort_values(
        ["_key", "ticker"], ascending=[False, True], na_position="last", kind="stable"
    )
    has_p = "gamma_p" in frame.columns
    has_test = has_p or _has(frame, "gamma_t") or _has(frame, "gamma_se")
    gamma_head = "γ (p)" if has_p else "γ (t)" if has_test else "γ"
    approx = False
    lines = [
        f"| Ticker | Sensitivity [95% CI] | {gamma_head} |{' Curve |' if has_test else ''} R² |",
        f"|---|---:|---:|{'---|' if has_test else ''}---:|",
    ]
    for _, series in ordered.head(limit).iterrows():
        row = _record(series)
        sens = _finite(row, "sensitivity")
        lower, upper = _finite(row, "sensitivity_ci_lower"), _finite(row, "sensitivity_ci_upper")
        mark = ""
        if not (math.isfinite(lower) and math.isfinite(upper)):
            se = _finite(row, "sensitivity_se")
            lower, upper = sens - _Z95 * se, sens + _Z95 * se
            mark = "≈" if math.isfinite(se) else ""
            approx = approx or bool(mark)
        ci = f" {mark}[{_num(lower)}, {_num(upper)}]" if math.isfinite(lower) else ""
        curve = f" {gamma_test(row).shape} |" if has_test else ""
        r2 = _num(row.get("r2"))
        lines.append(f"| {_md(row['ticker'])} | **{_num(sens)}**{ci} | {_gamma_text(row)} |{curve} {r2} |")
    notes = []
    if len(ordered) > limit:
        notes.append(f"{len(ordered) - limit} more ticker(s) in the table artifact and the report.")
    if approx:
        notes.append("≈: interval from the standard error with the normal quantile 1.96.")
    notes.append("Sensitivity: today's slope β + 2γ·r_index (stock % per index %).")
    if has_test:
        notes.append("Curve: convex / concave where γ differs from 0 at 5%.")
    return "\n".join([*lines, "", *notes])
