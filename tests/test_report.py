"""The summary table, the charts and the HTML report, on seeded synthetic per-day tables.

The per-day tables are built here with plain numpy (one least-squares fit per day), so these
tests depend on nothing but ``sensitivity.report``: they follow docs/schema.md's contract.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sensitivity import report as report_mod
from sensitivity.report import (
    SCENARIO_ALIASES,
    SENSITIVITY_COLUMNS,
    characteristic_curve,
    characteristic_curve_figure,
    figure_png,
    gamma_history_figure,
    gamma_significant,
    gamma_test,
    huber_disagrees,
    overview_markdown,
    render_report,
    sensitivity_heatmap_figure,
    sensitivity_history_figure,
    sparkline_figure,
    summary_table,
)

Z95 = 1.959963984540054
INDEX = "^GSPC"


# --------------------------------------------------------------------------------------------
# Synthetic per-day tables with known truth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stock:
    ticker: str
    beta: float = 1.0
    gamma: float = 0.0
    first: int = 0  # first index day it trades
    last: int | None = None  # last index day it trades (inclusive); None: to the end
    gaps: tuple[int, ...] = ()  # index days it did not trade


def _fit(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    design = np.column_stack([np.ones_like(x), x, x * x])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    resid = y - design @ coef
    n = x.size
    cov = float(resid @ resid) / (n - 3) * np.linalg.inv(design.T @ design)
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    return {"coef": coef, "cov": cov, "r2": r2, "linear_beta": float(np.polyfit(x, y, 1)[0])}


def make_sensitivity(
    stocks: Sequence[Stock],
    *,
    n_days: int = 260,
    window: int = 60,
    min_obs: int = 30,
    seed: int = 7,
    index: str = INDEX,
) -> pd.DataFrame:
    """The per-day table docs/schema.md describes, for ``stocks`` against a simulated index."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2023-01-02", periods=n_days)
    r_index = rng.normal(0.0004, 0.01, n_days)
    r_index[0] = 0.0
    p_index = 4000.0 * np.cumprod(1.0 + r_index)
    rows: list[dict[str, Any]] = []
    for stock in stocks:
        traded = np.zeros(n_days, dtype=bool)
        traded[stock.first : n_days if stock.last is None else stock.last + 1] = True
        traded[list(stock.gaps)] = False
        r_true = 0.0002 + stock.beta * r_index + stock.gamma * r_index**2 + rng.normal(0, 0.012, n_days)
        p_stock = 50.0 * np.cumprod(1.0 + r_true)
        pos = np.flatnonzero(traded)
        days, prev = pos[1:], pos[:-1]
        x = p_index[days] / p_index[prev] - 1.0
        y = p_stock[days] / p_stock[prev] - 1.0
        full = _fit(x, y) if window == 0 and x.size >= min_obs else None
        for k, t in enumerate(days):
            if window == 0:
                n_obs, fit = x.size, full
            else:
                inside = (days > t - window) & (days <= t)
                n_obs = int(inside.sum())
                fit = _fit(x[inside], y[inside]) if n_obs >= min_obs else None
            row: dict[str, Any] = {
                "date": dates[t],
                "index_ticker": index,
                "ticker": stock.ticker,
                "window": window,
                "n_obs": n_obs,
                "index_return": x[k],
                "stock_return": y[k],
                "close": p_stock[t],
                "prev_close": p_stock[prev[k]],
            }
            if fit is None:
                row.update(
                    {c: np.nan for c in SENSITIVITY_COLUMNS if c not in row and c != "dollar_sensitivity"}
                )
            else:
                a, b, c = fit["coef"]
                grad = np.array([0.0, 1.0, 2.0 * x[k]])
                sens = b + 2.0 * c * x[k]
                se = float(np.sqrt(grad @ fit["cov"] @ grad))
                alpha_se, beta_se, gamma_se = np.sqrt(np.diag(fit["cov"]))
                row.update(
                    alpha=a,
                    beta=b,
                    gamma=c,
                    sensitivity=sens,
                    sensitivity_se=se,
                    sensitivity_ci_lower=sens - Z95 * se,
                    sensitivity_ci_upper=sens + Z95 * se,
                    alpha_se=alpha_se,
                    beta_se=beta_se,
                    gamma_se=gamma_se,
                    linear_beta=fit["linear_beta"],
                    r2=fit["r2"],
                )
            row["dollar_sensitivity"] = 0.01 * row["sensitivity"] * row["prev_close"]
            rows.append(row)
    frame = pd.DataFrame(rows)[list(SENSITIVITY_COLUMNS)]
    frame["n_obs"] = frame["n_obs"].astype("int64")
    frame["window"] = frame["window"].astype("int64")
    return frame


def with_inference(frame: pd.DataFrame, huber_gamma_shift: dict[str, float] | None = None) -> pd.DataFrame:
    """``frame`` plus the optional columns of the inference options, from each row's own fit.

    ``gamma_t``, ``gamma_p`` (normal approximation), ``delta_aic`` = AIC(quadratic) -
    AIC(linear) (for OLS, ``2 - n log(1 + t^2/(n-3))``), ``secant_slope`` and a Huber fit
    equal to the OLS one except that gamma moves by ``huber_gamma_shift[ticker]`` standard
    errors.
    """
    shift = huber_gamma_shift or {}
    out = frame.copy()
    t = out["gamma"] / out["gamma_se"]
    n = out["n_obs"].astype(float)
    out["gamma_t"] = t
    out["gamma_p"] = [math.erfc(abs(v) / math.sqrt(2.0)) if np.isfinite(v) else np.nan for v in t]
    out["delta_aic"] = 2.0 - n * np.log1p(t**2 / (n - 3.0))
    out["secant_slope"] = out["beta"] + out["gamma"] * out["index_return"]
    out["huber_alpha"] = out["alpha"]
    out["huber_beta"] = out["beta"]
    out["huber_gamma"] = out["gamma"] + out["ticker"].map(shift).fillna(0.0) * out["gamma_se"]
    out["huber_sensitivity"] = out["huber_beta"] + 2.0 * out["huber_gamma"] * out["index_return"]
    return out


def with_up_down(summary: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """``summary`` plus ``up_beta`` / ``down_beta``: slopes on the latest window's up / down days."""
    up, down = [], []
    for ticker in summary["ticker"]:
        curve = characteristic_curve(history_of(frame, ticker))
        x, y = curve.index_return, curve.stock_return
        fits = [np.polyfit(x[m], y[m], 1)[0] if curve.has_fit else np.nan for m in (x > 0, x < 0)]
        up.append(fits[0])
        down.append(fits[1])
    return summary.assign(up_beta=up, down_beta=down)


MOVES = (-0.10, -0.05, -0.02, -0.01, 0.01, 0.02, 0.05, 0.10)


def make_scenarios(frame: pd.DataFrame) -> pd.DataFrame:
    """The what-if table (``reports/scenarios/``) of each combination's latest fit, for ``MOVES``."""
    rows: list[dict[str, Any]] = []
    for ticker in frame["ticker"].unique():
        history = history_of(frame, ticker)
        curve = characteristic_curve(history)
        if not curve.has_fit or curve.covariance is None:
            continue
        x = np.array(MOVES)
        mid = curve.fitted(x)
        band = curve.band(x)
        assert band is not None
        close = float(history["close"].iloc[-1])
        for k, move in enumerate(MOVES):
            rows.append(
                {
                    "as_of": frame["date"].max().date(),
                    "index_ticker": INDEX,
                    "ticker": ticker,
                    "window": int(history["window"].iloc[0]),
                    "index_move": move,
                    "fit": "ols",
                    "level": 0.95,
                    "predicted_return": mid[k],
                    "predicted_return_ci_lower": band[0][k],
                    "predicted_return_ci_upper": band[1][k],
                    "close": close,
                    "price_move": mid[k] * close,
                    "price_move_ci_lower": band[0][k] * close,
                    "price_move_ci_upper": band[1][k] * close,
                }
            )
    return pd.DataFrame(rows)


STOCKS = (
    Stock("AAA", beta=1.3, gamma=40.0),
    Stock("BBB", beta=0.6, gamma=-30.0, gaps=(100, 101, 150, 240)),
    Stock("CCC", beta=0.9, last=200),  # stopped trading
    Stock("NEW", beta=1.0, first=250),  # listed 10 days before the end: never warms up
)
MANIFEST: dict[str, Any] = {
    "config": {"universe": {"index": INDEX, "tickers": [s.ticker for s in STOCKS]}, "model": {"min_obs": 30}},
    "source": "synthetic",
    "failures": {"BADX": "Yahoo has no prices for this symbol (check the ticker)"},
    "warnings": ["NEW: fewer than min_obs returns; no fit yet"],
    "versions": {"python": "3.11"},
}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_sensitivity(STOCKS)


@pytest.fixture(scope="module")
def page(table: pd.DataFrame) -> str:
    return render_report(table, summary_table(table), MANIFEST).decode("utf-8")


@dataclass(frozen=True)
class Rich:
    """A run with every optional column (BBB's Huber fit disagrees) and scenarios."""

    table: pd.DataFrame
    summary: pd.DataFrame
    scenarios: pd.DataFrame
    page: str


@pytest.fixture(scope="module")
def rich(table: pd.DataFrame) -> Rich:
    full = with_inference(table, {"BBB": 6.0})
    summary = with_up_down(summary_table(full), full)
    scenarios = make_scenarios(full)
    page = render_report(full, summary, MANIFEST, scenarios=scenarios).decode("utf-8")
    return Rich(full, summary, scenarios, page)


def history_of(frame: pd.DataFrame, ticker: str) -> pd.DataFrame:
    return frame.loc[frame["ticker"] == ticker].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# An HTML checker
# --------------------------------------------------------------------------------------------

VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    return checker


def charts(checker: _Checker, kind: str) -> list[dict[str, str | None]]:
    return [img for img in checker.images if img.get("data-chart") == kind]


# --------------------------------------------------------------------------------------------
# summary_table
# --------------------------------------------------------------------------------------------


def test_summary_table_picks_latest_row_per_combination(table: pd.DataFrame) -> None:
    both = pd.concat([table, make_sensitivity(STOCKS[:2], window=0)], ignore_index=True)
    summary = summary_table(both)

    assert list(summary.columns) == ["as_of", *SENSITIVITY_COLUMNS]
    assert len(summary) == 6
    as_of = both["date"].max().date()
    assert all(type(v) is dt.date and v == as_of for v in summary["as_of"])
    for _, row in summary.iterrows():
        combo = both.loc[(both["ticker"] == row["ticker"]) & (both["window"] == row["window"])]
        expected = combo.loc[combo["date"].idxmax()]
        pd.testing.assert_series_equal(
            row[list(SENSITIVITY_COLUMNS)], expected, check_names=False, check_dtype=False
        )
    stopped = summary.loc[summary["ticker"] == "CCC"].iloc[0]
    assert stopped["date"].date() < as_of


def test_summary_table_sorts_by_index_window_then_sensitivity(table: pd.DataFrame) -> None:
    both = pd.concat([make_sensitivity(STOCKS[:2], window=0), table], ignore_index=True)
    summary = summary_table(both)

    assert summary["window"].tolist() == [0, 0, 60, 60, 60, 60]
    rolling = summary.loc[summary["window"] == 60]
    assert rolling["ticker"].iloc[-1] == "NEW"  # no fit: last
    fitted = rolling["sensitivity"].dropna().to_numpy()
    assert np.all(np.diff(fitted) <= 0)


def test_summary_table_accepts_date_objects(table: pd.DataFrame) -> None:
    as_dates = table.assign(date=[d.date() for d in table["date"]])
    summary = summary_table(as_dates)

    assert summary["as_of"].iloc[0] == table["date"].max().date()
    assert summary["ticker"].tolist() == summary_table(table)["ticker"].tolist()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(lambda f: f.iloc[0:0], r"sensitivity is empty", id="empty"),
        pytest.param(lambda f: f.drop(columns="sensitivity"), r"lacks column\(s\) sensitivity", id="missing"),
        pytest.param(lambda f: pd.concat([f, f.iloc[[3]]]), r"more than one row .*AAA", id="duplicate"),
    ],
)
def test_summary_table_rejects_bad_input(table: pd.DataFrame, mutate: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summary_table(mutate(table))


# --------------------------------------------------------------------------------------------
# characteristic_curve
# --------------------------------------------------------------------------------------------


def test_characteristic_curve_uses_the_latest_fits_sample(table: pd.DataFrame) -> None:
    history = history_of(table, "BBB")  # has gaps: the window holds fewer than 60 returns
    curve = characteristic_curve(history)
    last = history.iloc[-1]

    n_obs = int(last["n_obs"])
    assert curve.n == n_obs < 60
    np.testing.assert_array_equal(curve.index_return, history["index_return"].to_numpy()[-n_obs:])
    assert curve.linear_slope == pytest.approx(last["linear_beta"], rel=1e-9)
    assert curve.today == last["date"].date()
    assert curve.fitted(curve.today_index_return) == pytest.approx(
        last["alpha"] + last["beta"] * last["index_return"] + last["gamma"] * last["index_return"] ** 2
    )


def test_characteristic_curve_band_is_the_classical_ols_band(table: pd.DataFrame) -> None:
    sm = pytest.importorskip("statsmodels.api")
    history = history_of(table, "AAA")
    curve = characteristic_curve(history)
    assert curve.covariance is not None
    assert curve.critical_value == pytest.approx(Z95)

    x, y = curve.index_return, curve.stock_return
    fit = sm.OLS(y, np.column_stack([np.ones_like(x), x, x * x])).fit()
    grid = np.linspace(x.min(), x.max(), 7)
    expected = fit.get_prediction(np.column_stack([np.ones_like(grid), grid, grid * grid])).se_mean
    se = curve.fitted_se(grid)
    assert se is not None
    np.testing.assert_allclose(se, expected, rtol=1e-8)
    band = curve.band(grid)
    assert band is not None
    np.testing.assert_allclose(band[1] - band[0], 2 * Z95 * expected, rtol=1e-8)


def test_characteristic_curve_omits_band_when_standard_errors_are_not_classical(
    table: pd.DataFrame,
) -> None:
    history = history_of(table, "AAA")
    robust = history.assign(gamma_se=history["gamma_se"] * 1.3)
    curve = characteristic_curve(robust)

    assert curve.covariance is None
    assert curve.band(np.array([0.0])) is None
    assert "omitted" in curve.band_note


def test_characteristic_curve_window_zero_uses_every_row() -> None:
    history = make_sensitivity(STOCKS[:1], window=0)
    curve = characteristic_curve(history)

    assert curve.n == len(history)
    assert curve.covariance is not None


def test_characteristic_curve_rejects_two_combinations(table: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"one .* combination, got 4"):
        characteristic_curve(table)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def lines_by_gid(fig: Figure) -> dict[str, Line2D]:
    return {str(line.get_gid()): line for line in fig.axes[0].lines if line.get_gid()}


def test_characteristic_curve_figure_draws_points_fits_band_and_tangent(table: pd.DataFrame) -> None:
    history = history_of(table, "AAA")
    curve = characteristic_curve(history)
    fig = characteristic_curve_figure(history)
    ax = fig.axes[0]

    lines = lines_by_gid(fig)
    assert set(lines) == {"quadratic fit", "linear fit", "tangent"}
    quad = lines["quadratic fit"]
    xs = np.asarray(quad.get_xdata(), dtype=float) / 100
    np.testing.assert_allclose(np.asarray(quad.get_ydata(), dtype=float), 100 * curve.fitted(xs))
    tangent = lines["tangent"]
    tx, ty = (np.asarray(v, dtype=float) for v in (tangent.get_xdata(), tangent.get_ydata()))
    assert (ty[1] - ty[0]) / (tx[1] - tx[0]) == pytest.approx(history["sensitivity"].iloc[-1])

    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [len(np.asarray(c.get_offsets())) for c in scatters] == [curve.n, 1]  # the sample, then today
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["95% CI of the quadratic fit (classical OLS)"]
    assert "(%)" in ax.get_xlabel()
    assert "(%)" in ax.get_ylabel()
    assert len(fig.legends) == 1


def test_characteristic_curve_figure_without_band_has_no_band(table: pd.DataFrame) -> None:
    history = history_of(table, "AAA")
    fig = characteristic_curve_figure(history.assign(beta_se=history["beta_se"] * 2))

    assert not [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert {"quadratic fit", "linear fit"} <= set(lines_by_gid(fig))


def test_sensitivity_history_figure_draws_sensitivity_band_and_linear_beta(table: pd.DataFrame) -> None:
    history = history_of(table, "BBB")
    fig = sensitivity_history_figure(history)
    ax = fig.axes[0]

    lines = lines_by_gid(fig)
    np.testing.assert_array_equal(lines["sensitivity"].get_ydata(), history["sensitivity"].to_numpy())
    np.testing.assert_array_equal(lines["linear beta"].get_ydata(), history["linear_beta"].to_numpy())
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["95% CI"]
    assert isinstance(ax.xaxis.get_major_formatter(), ConciseDateFormatter)
    assert "sensitivity" in ax.get_ylabel()


def stamped_markers(fig: Figure) -> list[int]:
    """The vertex count of each marker path Agg stamps (``draw_markers``) while drawing ``fig``."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    stamp = renderer.draw_markers
    sizes: list[int] = []

    def record(gc: Any, marker_path: Any, *args: Any) -> None:
        sizes.append(len(marker_path.vertices))
        stamp(gc, marker_path, *args)

    renderer.draw_markers = record
    fig.draw(renderer)
    return sizes


def test_confidence_bands_are_drawn_as_paths_not_stamped_as_markers(table: pd.DataFrame) -> None:
    # Agg stamps a one-path collection like a marker: twice the work for a band the size of
    # the plot, and half a pixel off the lines.  Only ticks and the dots are stamped.
    history = with_inference(history_of(table, "AAA"))
    for figure in (characteristic_curve_figure, sensitivity_history_figure, gamma_history_figure):
        fig = figure(history)
        bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
        assert bands, figure.__name__
        assert max(len(p.vertices) for b in bands for p in b.get_paths()) > 100, figure.__name__
        sizes = stamped_markers(fig)
        assert sizes, figure.__name__  # the tick marks, at least
        assert max(sizes) <= 30, (figure.__name__, sizes)


def test_figures_of_a_history_without_any_fit_say_so(table: pd.DataFrame) -> None:
    history = history_of(table, "NEW")
    timeline = sensitivity_history_figure(history)
    scatter = characteristic_curve_figure(history)

    assert any("no fitted value" in t.get_text() for t in timeline.axes[0].texts)
    assert "quadratic fit" not in lines_by_gid(scatter)
    assert any("no fit" in t.get_text() for t in scatter.axes[0].texts)


def test_sparkline_figure_shows_the_last_year(table: pd.DataFrame) -> None:
    history = history_of(table, "AAA")
    fig = sparkline_figure(history, days=30)
    line = lines_by_gid(fig)["sensitivity"]

    assert len(np.asarray(line.get_xdata())) == int(
        (history["date"] > history["date"].iloc[-1] - pd.Timedelta(days=30)).sum()
    )
    png = figure_png(fig, dpi=100)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


# --------------------------------------------------------------------------------------------
# render_report
# --------------------------------------------------------------------------------------------


def test_render_report_is_well_formed_and_names_every_ticker(page: str) -> None:
    checker = parse(page)
    text = " ".join(checker.text)

    assert page.startswith("<!DOCTYPE html>")
    for stock in STOCKS:
        assert stock.ticker in text
    assert "as of 2023-12-29" in text  # the last business day of the 260
    assert "BADX" in text
    assert "Yahoo has no prices for this symbol" in text
    assert "fewer than min_obs returns" in text  # the manifest's warnings
    assert "How to read this" in text


def test_render_report_embeds_one_image_per_expected_chart(page: str) -> None:
    checker = parse(page)

    fitted = [s.ticker for s in STOCKS if s.ticker != "NEW"]
    for kind in ("sparkline", "characteristic", "sensitivity", "gamma"):
        assert len(charts(checker, kind)) == len(fitted), kind
    assert len(charts(checker, "heatmap")) == 1
    assert len(checker.images) == 4 * len(fitted) + 1
    for img in checker.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained


def test_render_report_notes_a_ticker_without_any_fit(page: str) -> None:
    section = page[page.index("NEW <small>") :]
    section = section[: section.index("</section>")]

    assert "No fitted value yet" in section
    assert "at least 30 returns" in section
    assert "<img" not in section


def test_render_report_orders_the_overview_by_sensitivity(page: str, table: pd.DataFrame) -> None:
    overview = page[page.index("<tbody>") : page.index("</tbody>")]
    order = re.findall(r'<a href="#t\d+">([^<]+)</a>', overview)
    summary = summary_table(table)
    current = pd.to_datetime(summary["date"]).dt.date == summary["as_of"]
    # today's sensitivity, highest first; a stock without data today (CCC) goes last
    assert order == [*summary.loc[current, "ticker"], *summary.loc[~current, "ticker"]]
    assert order[-1] == "CCC"
    assert "no data since" in overview  # CCC stopped trading before as_of


def test_render_report_escapes_text_from_data_and_manifest() -> None:
    hostile = "<script>alert('$\\bad$')</script>"  # unescaped, $..$ would break matplotlib's mathtext
    frame = make_sensitivity([Stock("X")], n_days=80)
    frame["ticker"] = hostile
    manifest = {"failures": {"<img src=x onerror=alert(2)>": hostile}, "source": hostile}
    page = render_report(frame, summary_table(frame), manifest).decode("utf-8")

    checker = parse(page)
    assert "<script" not in page.lower()
    assert "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;" in page
    assert hostile in " ".join(checker.text)
    assert checker.tags.count("img") == 5  # sparkline, curve, sensitivity, gamma, heatmap


def test_render_report_single_ticker_full_sample() -> None:
    frame = make_sensitivity([Stock("ONE", beta=1.1)], window=0, n_days=120)
    page = render_report(frame, summary_table(frame), {}).decode("utf-8")

    checker = parse(page)
    text = " ".join(checker.text)
    assert "full sample" in text
    assert "failed" not in text
    assert len(checker.images) == 4  # no rolling gamma for a single full-sample fit
    assert not charts(checker, "gamma")
    assert "every aligned day" in text
    assert "95% confidence band" in text


@pytest.mark.parametrize(
    ("which", "message"),
    [("sensitivity", r"sensitivity is empty"), ("summary", r"summary is empty")],
)
def test_render_report_rejects_empty_frames(table: pd.DataFrame, which: str, message: str) -> None:
    summary = summary_table(table)
    args = {"sensitivity": table, "summary": summary}
    args[which] = args[which].iloc[0:0]
    with pytest.raises(ValueError, match=message):
        render_report(args["sensitivity"], args["summary"], {})


def test_render_report_stays_small(page: str) -> None:
    per_ticker = len(page.encode("utf-8")) / len(STOCKS)
    assert per_ticker < 100_000


def test_render_report_reports_the_latest_as_of_and_every_window(table: pd.DataFrame) -> None:
    full = make_sensitivity(STOCKS[:2], window=0)
    both = pd.concat([table, full], ignore_index=True)
    older = summary_table(both.loc[both["date"] < both["date"].max()])
    summary = pd.concat([older, summary_table(both)], ignore_index=True)
    page = render_report(both, summary, {}).decode("utf-8")

    checker = parse(page)
    text = " ".join(checker.text)
    assert "as of 2023-12-29" in text
    assert text.count("Overview: vs ^GSPC") == 2
    assert "full sample" in text
    assert "rolling 60 index trading days" in text
    assert len(charts(checker, "characteristic")) == 3 + 2


def test_figure_png_rejects_a_bad_palette_and_keeps_the_figure_dpi(table: pd.DataFrame) -> None:
    fig = sparkline_figure(history_of(table, "AAA"))
    dpi = fig.get_dpi()
    assert figure_png(fig, dpi=50, colors=None).startswith(b"\x89PNG")
    assert figure_png(fig, dpi=50, colors=16).startswith(b"\x89PNG")
    assert fig.get_dpi() == dpi
    with pytest.raises(ValueError, match="colors must be between 2 and 256 or None, got 1"):
        figure_png(fig, colors=1)


# --------------------------------------------------------------------------------------------
# Robust bands, the test of gamma, the Huber flag
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cov_type", "kwds", "hac_lags", "kind"),
    [
        pytest.param("HC1", None, (), "HC1", id="hc1"),
        pytest.param("HAC", {"maxlags": 7}, (7,), "HAC, Newey-West 7 lags", id="hac-configured-lags"),
        # floor(4 (60/100)^(2/9)) = 3, statsmodels' own default rule
        pytest.param("HAC", {"maxlags": 3}, (), "HAC, Newey-West 3 lags", id="hac-automatic-lags"),
    ],
)
def test_characteristic_curve_rebuilds_the_band_of_robust_standard_errors(
    table: pd.DataFrame, cov_type: str, kwds: dict[str, int] | None, hac_lags: tuple[int, ...], kind: str
) -> None:
    sm = pytest.importorskip("statsmodels.api")
    history = history_of(table, "AAA")
    x, y = (characteristic_curve(history).index_return, characteristic_curve(history).stock_return)
    design = np.column_stack([np.ones_like(x), x, x * x])
    fit = sm.OLS(y, design).fit(cov_type=cov_type, cov_kwds=kwds)
    robust = history.copy()
    robust.loc[robust.index[-1], ["alpha_se", "beta_se", "gamma_se"]] = fit.bse

    curve = characteristic_curve(robust, hac_lags=hac_lags)

    assert curve.covariance_kind == kind
    grid = np.linspace(x.min(), x.max(), 7)
    expected = fit.get_prediction(np.column_stack([np.ones_like(grid), grid, grid * grid])).se_mean
    se = curve.fitted_se(grid)
    assert se is not None
    np.testing.assert_allclose(se, expected, rtol=1e-8)


@pytest.mark.parametrize(
    ("row", "shape", "text"),
    [
        pytest.param({"gamma": 30.0, "gamma_se": 10.0}, "convex", "t 3.0", id="t-convex"),
        pytest.param({"gamma": -30.0, "gamma_se": 10.0}, "concave", "t -3.0", id="t-concave"),
        pytest.param({"gamma": 15.0, "gamma_se": 10.0}, "not significant", "t 1.5", id="t-not-significant"),
        pytest.param(
            {"gamma": 30.0, "gamma_se": 10.0, "gamma_p": 0.2}, "not significant", "p 0.200", id="p-wins"
        ),
        pytest.param({"gamma": 5.0, "gamma_se": 10.0, "gamma_p": 0.0004}, "convex", "p <0.001", id="p-small"),
        pytest.param({"gamma": 5.0, "gamma_t": -2.5}, "convex", "t -2.5", id="gamma-t-column"),
        pytest.param({"gamma": np.nan, "gamma_se": np.nan}, "—", "t —", id="no-fit"),
    ],
)
def test_gamma_test_prefers_the_tables_p_value(row: dict[str, float], shape: str, text: str) -> None:
    test = gamma_test(row)
    assert test.shape == shape
    assert test.describe() == text


def test_gamma_significant_uses_p_where_present_else_t(table: pd.DataFrame) -> None:
    history = history_of(table, "AAA")
    t = (history["gamma"] / history["gamma_se"]).to_numpy()
    np.testing.assert_array_equal(gamma_significant(history), np.nan_to_num(np.abs(t)) >= Z95)
    with_p = with_inference(history)
    assert not gamma_significant(with_p.assign(gamma_p=0.5)).any()
    np.testing.assert_array_equal(gamma_significant(with_p), (with_p["gamma_p"] < 0.05).to_numpy())


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({}, None, id="no-huber"),
        pytest.param({"huber_sensitivity": 1.1}, False, id="inside"),
        pytest.param({"huber_sensitivity": 1.5}, True, id="sensitivity-outside"),
        pytest.param({"huber_beta": 1.1, "huber_gamma": 0.0}, False, id="from-coefficients"),
        pytest.param({"huber_sensitivity": 1.1, "huber_gamma": 25.0}, True, id="gamma-outside"),
    ],
)
def test_huber_disagrees_outside_the_ols_intervals(extra: dict[str, float], expected: bool | None) -> None:
    row = {
        "sensitivity": 1.1,
        "sensitivity_se": 0.1,
        "sensitivity_ci_lower": 1.1 - Z95 * 0.1,
        "sensitivity_ci_upper": 1.1 + Z95 * 0.1,
        "gamma": 0.0,
        "gamma_se": 10.0,
        "index_return": 0.01,
        **extra,
    }
    assert huber_disagrees(row) is expected


# --------------------------------------------------------------------------------------------
# The rolling gamma and the heatmap
# --------------------------------------------------------------------------------------------


def test_gamma_history_figure_draws_gamma_band_and_significance(table: pd.DataFrame) -> None:
    history = with_inference(history_of(table, "AAA"))
    fig = gamma_history_figure(history)
    ax = fig.axes[0]

    gamma = history["gamma"].to_numpy()
    np.testing.assert_array_equal(lines_by_gid(fig)["gamma"].get_ydata(), gamma)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    labels = [str(b.get_label()) for b in bands]
    n_sig = int((history["gamma_p"] < 0.05).sum())
    assert labels[0].startswith(f"significant at 5% (p < 0.05): {n_sig} of")
    assert labels[1] == "95% CI"
    ys = np.concatenate([p.vertices[:, 1] for p in bands[1].get_paths()])
    half = Z95 * history["gamma_se"]
    assert ys.min() == pytest.approx(np.nanmin(gamma - half))
    assert ys.max() == pytest.approx(np.nanmax(gamma + half))


def test_gamma_history_figure_without_any_fit_says_so(table: pd.DataFrame) -> None:
    fig = gamma_history_figure(history_of(table, "NEW"))
    assert any("no fitted value" in t.get_text() for t in fig.axes[0].texts)


def test_sensitivity_heatmap_figure_shows_period_means_centred_at_one(table: pd.DataFrame) -> None:
    fig = sensitivity_heatmap_figure(table, freq="M")
    ax = fig.axes[0]
    (mesh,) = [c for c in ax.collections if c.get_gid() == "heatmap"]

    order = summary_table(table)["ticker"].tolist()  # latest sensitivity, highest first
    expected = (
        table.assign(month=table["date"].dt.to_period("M"))
        .groupby(["ticker", "month"])["sensitivity"]
        .mean()
        .unstack("month")
        .reindex(order)
    )
    values = np.ma.asarray(mesh.get_array()).filled(np.nan)
    np.testing.assert_allclose(values, expected.to_numpy(dtype=float), equal_nan=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == order
    assert mesh.norm.vcenter == 1.0
    assert mesh.norm(1.0) == pytest.approx(0.5)


def test_sensitivity_heatmap_figure_takes_the_rows_it_is_given(table: pd.DataFrame) -> None:
    fig = sensitivity_heatmap_figure(table, tickers=["BBB", "AAA"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["BBB", "AAA"]
    assert "weekly" in fig.axes[0].get_title()  # 260 business days: weekly bins
    two_windows = pd.concat([table, make_sensitivity(STOCKS[:1], window=0)], ignore_index=True)
    with pytest.raises(ValueError, match=r"one \(index_ticker, window\), got 2"):
        sensitivity_heatmap_figure(two_windows)


# --------------------------------------------------------------------------------------------
# The report with the optional columns and scenarios
# --------------------------------------------------------------------------------------------

OPTIONAL_HEADS = ("ΔAIC", "Secant", "β up / down", "Huber")


def overview_of(page: str) -> str:
    return page[page.index('<div class="overview">') : page.index("</table></div>")]


def test_render_report_shows_the_inference_columns_where_present(rich: Rich) -> None:
    parse(rich.page)
    overview = overview_of(rich.page)

    for head in (*OPTIONAL_HEADS, "γ (p)"):
        assert f">{head}</th>" in overview, head
    rows = re.findall(r"<tr>(.*?)</tr>", overview.split("<tbody>")[1])
    differs = [re.search(r">([A-Z]+)</a>", r).group(1) for r in rows if "⚠ differs" in r]  # type: ignore[union-attr]
    assert differs == ["BBB"]
    aaa = rich.summary.loc[rich.summary["ticker"] == "AAA"].iloc[0]
    assert f"{aaa['delta_aic']:.1f}" in overview
    assert f"{aaa['up_beta']:.2f} / {aaa['down_beta']:.2f}" in overview


def test_render_report_leaves_out_absent_columns(page: str) -> None:
    overview = overview_of(page)
    for head in OPTIONAL_HEADS:
        assert f">{head}</th>" not in overview, head
    assert ">γ (t)</th>" in overview


def test_render_report_headline_answers_which_stock_is_most_sensitive(rich: Rich) -> None:
    text = " ".join("".join(parse(rich.page).text).split())
    summary = rich.summary
    current = summary.loc[pd.to_datetime(summary["date"]).dt.date == summary["as_of"]].dropna(
        subset=["sensitivity"]
    )
    top, low = current.iloc[0], current.iloc[-1]  # summary_table sorts by sensitivity

    head = text[text.index("Most sensitive today:") :]
    assert head.startswith(f"Most sensitive today: {top['ticker']} {top['sensitivity']:.2f}")
    assert f"curve {gamma_test(top.to_dict()).shape}" in head.split("Least sensitive")[0]
    assert f"Least sensitive: {low['ticker']} {low['sensitivity']:.2f}" in head
    assert text.index("Most sensitive today:") < text.index("Ticker")  # above the table


def test_render_report_shows_a_scenario_table_per_ticker(rich: Rich) -> None:
    page = rich.page
    for ticker in ("AAA", "BBB", "CCC"):
        table = page[page.index(f'<table class="scenarios" data-ticker="{ticker}">') :]
        table = table[: table.index("</table>")]
        rows = re.findall(r"<tr[ >].*?</tr>", table.split("<tbody>")[1])
        assert len(rows) == len(MOVES)
        curve = characteristic_curve(history_of(rich.table, ticker))
        outside = [not curve.index_return.min() <= m <= curve.index_return.max() for m in MOVES]
        assert ["extrapolated" in r for r in rows] == outside
        expected = rich.scenarios.loc[rich.scenarios["ticker"] == ticker, "predicted_return"]
        for value in expected:
            assert f"{100 * value:+.2f}%" in table
    assert '<table class="scenarios" data-ticker="NEW">' not in page  # no fit, no scenarios


def test_render_report_takes_short_scenario_names_and_ignores_another_day() -> None:
    frame = make_sensitivity([Stock("ONE", beta=1.1)], n_days=70, window=40, min_obs=20)
    short = (
        make_scenarios(frame)
        .rename(columns={v: k for k, v in SCENARIO_ALIASES.items()})
        .drop(columns="level")
    )
    today = render_report(frame, summary_table(frame), {}, scenarios=short).decode("utf-8")
    table = today[today.index('<table class="scenarios"') :]
    table = table[: table.index("</table>")]
    assert table.count("95% interval") == 2  # return and price intervals
    for value in short["price_upper"]:
        assert f"{value:+,.2f}]" in table
    old = short.assign(as_of=dt.date(2020, 1, 2))
    page = render_report(frame, summary_table(frame), {}, scenarios=old).decode("utf-8")
    assert 'class="scenarios"' not in page


@pytest.mark.parametrize(
    ("scenarios", "error", "message"),
    [
        pytest.param(
            pd.DataFrame({"ticker": ["AAA"]}),
            ValueError,
            r"scenarios lacks column\(s\) index_move",
            id="columns",
        ),
        pytest.param(
            [{"ticker": "AAA"}],
            TypeError,
            r"scenarios must be a pandas DataFrame or None, got list",
            id="type",
        ),
    ],
)
def test_render_report_rejects_bad_scenarios(
    table: pd.DataFrame, scenarios: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        render_report(table, summary_table(table), {}, scenarios=scenarios)


def test_render_report_limits_charts_in_large_universes() -> None:
    stocks = [Stock(f"S{i}", beta=0.4 + 0.2 * i) for i in range(6)]
    frame = make_sensitivity(stocks, n_days=70, window=40, min_obs=20)
    summary = summary_table(frame)
    page = render_report(frame, summary, {}, chart_limit=2).decode("utf-8")

    checker = parse(page)
    order = summary["ticker"].tolist()
    charted = {order[0], order[-1]}
    assert {re.sub(r" .*", "", str(img["alt"])) for img in charts(checker, "characteristic")} == charted
    assert len(charts(checker, "sparkline")) == 6  # the overview keeps every ticker
    assert len(charts(checker, "heatmap")) == 1
    omitted = page[page.index('id="g1-omitted"') :]
    assert "Charts omitted for 4 ticker(s)" in omitted
    assert ", ".join(order[1:-1]) in omitted
    assert page.count('href="#g1-omitted"') == 4
    with pytest.raises(ValueError, match=r"chart_limit must be an integer >= 2, got 1"):
        render_report(frame, summary, {}, chart_limit=1)


# --------------------------------------------------------------------------------------------
# overview_markdown (the Prefect artifact)
# --------------------------------------------------------------------------------------------


def test_overview_markdown_lists_the_most_sensitive_first(rich: Rich) -> None:
    text = overview_markdown(rich.summary, limit=2)
    lines = text.splitlines()

    assert lines[0] == "| Ticker | Sensitivity [95% CI] | γ (p) | Curve | R² |"
    top = rich.summary.sort_values("sensitivity", ascending=False).iloc[0]
    assert lines[2].startswith(
        f"| {top['ticker']} | **{top['sensitivity']:.2f}** "
        f"[{top['sensitivity_ci_lower']:.2f}, {top['sensitivity_ci_upper']:.2f}] |"
    )
    assert f"| {gamma_test(top.to_dict()).shape} |" in lines[2]
    assert len([ln for ln in lines if ln.startswith("| ") and "**" in ln]) == 2
    assert "2 more ticker(s)" in text


def test_overview_markdown_accepts_the_flows_summary_rows(table: pd.DataFrame) -> None:
    cols = ["ticker", "date", "n_obs", "sensitivity", "sensitivity_se", "beta", "gamma", "linear_beta", "r2"]
    rows = summary_table(table)[cols].astype(object).where(lambda f: f.notna(), None).to_dict("records")
    rows[0]["ticker"] = "A|B"
    text = overview_markdown(rows)

    assert "≈[" in text  # interval rebuilt from the standard error
    assert "A\\|B" in text
    assert text.startswith("| Ticker | Sensitivity [95% CI] | γ | R² |\n")  # no test: no Curve
    assert text.count("\n| ") == len(rows)  # one line per row below the header
    with_se = summary_table(table)[[*cols, "gamma_se"]]
    assert overview_markdown(with_se).startswith("| Ticker | Sensitivity [95% CI] | γ (t) | Curve | R² |\n")
    assert overview_markdown([]) == ""
    with pytest.raises(ValueError, match=r"limit must be an integer >= 1, got 0"):
        overview_markdown(rows, limit=0)


def test_characteristic_curve_uses_the_tables_own_covariance(table: pd.DataFrame) -> None:
    sm = pytest.importorskip("statsmodels.api")
    history = history_of(table, "AAA")
    x, y = characteristic_curve(history).index_return, characteristic_curve(history).stock_return
    fit = sm.OLS(y, np.column_stack([np.ones_like(x), x, x * x])).fit(
        cov_type="HAC", cov_kwds={"maxlags": 11}
    )
    cov = fit.cov_params()
    stored = history.assign(
        se_type="hac", cov_alpha_beta=np.nan, cov_alpha_gamma=np.nan, cov_beta_gamma=np.nan
    )
    last = stored.index[-1]
    stored.loc[last, ["alpha_se", "beta_se", "gamma_se"]] = fit.bse
    stored.loc[last, ["cov_alpha_beta", "cov_alpha_gamma", "cov_beta_gamma"]] = (
        cov[0, 1],
        cov[0, 2],
        cov[1, 2],
    )

    curve = characteristic_curve(stored)  # 11 lags: no automatic rule finds it, the table has it

    assert curve.covariance_kind == "HAC, Newey-West"
    assert curve.covariance is not None
    np.testing.assert_allclose(curve.covariance, cov, rtol=1e-12)


def test_characteristic_curve_of_excess_returns(table: pd.DataFrame) -> None:
    history = history_of(table, "BBB")
    rf = np.full(len(history), 0.0002)
    shifted = history.assign(
        index_return=history["index_return"] + rf,
        stock_return=history["stock_return"] + rf,
        risk_free_return=rf,
    )
    plain, excess = characteristic_curve(history), characteristic_curve(shifted)

    assert excess.excess
    assert not plain.excess
    np.testing.assert_allclose(excess.index_return, plain.index_return, rtol=0, atol=1e-15)
    assert excess.today_index_return == pytest.approx(plain.today_index_return, abs=1e-15)
    assert excess.covariance_kind == "classical OLS"
    assert "excess" in characteristic_curve_figure(shifted).axes[0].get_xlabel()


def test_render_report_without_any_fit_says_so() -> None:
    frame = make_sensitivity([Stock("NEW", first=250), Stock("NEW2", first=255)], n_days=260)
    page = render_report(frame, summary_table(frame), {}).decode("utf-8")

    checker = parse(page)
    assert checker.images == []
    assert "No stock has a fitted sensitivity" in page
    assert "nothing to map" in page


@pytest.mark.parametrize(("n_days", "word"), [(260, "weekly"), (800, "monthly")])
def test_the_heatmap_bins_follow_the_span_of_the_whole_group(n_days: int, word: str) -> None:
    """Weekly bins up to two years of data, monthly beyond: the figure and its caption agree,
    also when only some tickers are charted (the group's span decides for all)."""
    frame = make_sensitivity(STOCKS, n_days=n_days)
    page = render_report(frame, summary_table(frame), MANIFEST, chart_limit=2, workers=0).decode("utf-8")
    checker = parse(page)
    (heatmap,) = charts(checker, "heatmap")
    assert f"heatmap of {word} mean sensitivity" in str(heatmap["alt"])
    assert (
        f"Mean sensitivity per ticker (rows, in the overview's order) and {word.removesuffix('ly')}" in page
    )


def _scenario_rows_by_mask(scenarios: pd.DataFrame, key: tuple[str, str, int]) -> pd.DataFrame | None:
    """The oracle: filter the whole table for one combination (what the report did per section)."""
    index_ticker, ticker, window = key
    mask = scenarios["ticker"].astype(str) == ticker
    if "index_ticker" in scenarios.columns:
        mask &= scenarios["index_ticker"].astype(str) == index_ticker
    if "window" in scenarios.columns:
        mask &= pd.to_numeric(scenarios["window"], errors="coerce") == window
    rows = scenarios.loc[mask.to_numpy()]
    return None if len(rows) == 0 else rows.sort_values("index_move", kind="stable")


@pytest.mark.parametrize("form", ["full", "float windows", "no index column", "no window column"])
def test_each_sections_scenario_rows_are_those_the_table_holds_for_it(form: str) -> None:
    """The rows found for each combination by one grouping of the table are the rows a filter
    of the whole table gives: same rows, order, index and types; none for another combination."""
    rng = np.random.default_rng(5)
    n = 60
    scenarios = pd.DataFrame(
        {
            "index_ticker": rng.choice(["^GSPC", "^NDX"], n),
            "ticker": pd.array(rng.choice(["AAPL", "KO", "MSFT"], n), dtype="string"),
            "window": rng.choice([126, 252], n),
            "index_move": rng.choice([-0.05, -0.01, 0.01, 0.05], n),
            "predicted_return": rng.normal(size=n),
        },
        index=rng.permutation(n) + 100,
    )
    if form == "float windows":
        scenarios["window"] = scenarios["window"].astype(float)
        scenarios.loc[scenarios.index[:3], "window"] = np.nan
    elif form == "no index column":
        scenarios = scenarios.drop(columns=["index_ticker"])
    elif form == "no window column":
        scenarios = scenarios.drop(columns=["window"])
    rows_of = report_mod._scenario_lookup(scenarios)
    keys = [(i, t, w) for i in ("^GSPC", "^NDX", "^X") for t in ("AAPL", "KO", "ZZ") for w in (126, 252, 21)]
    for key in keys:
        expected, got = _scenario_rows_by_mask(scenarios, key), rows_of(key)
        if expected is None:
            assert got is None, key
        else:
            assert got is not None, key
            pd.testing.assert_frame_equal(got, expected)
    assert report_mod._scenario_lookup(None)(("^GSPC", "AAPL", 252)) is None
    assert report_mod._scenario_lookup(scenarios.iloc[:0])(("^GSPC", "AAPL", 252)) is None
