"""The summary table, the charts and the HTML report, on seeded synthetic per-day tables.

The per-day tables are built here with plain numpy (one least-squares fit per day), so these
tests depend on nothing but ``sensitivity.report``: they follow docs/schema.md's contract.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sensitivity.report import (
    SENSITIVITY_COLUMNS,
    characteristic_curve,
    characteristic_curve_figure,
    figure_png,
    render_report,
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
    assert [b.get_label() for b in bands] == ["95% CI of the quadratic fit"]
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
    for kind in ("sparkline", "characteristic", "sensitivity"):
        assert len(charts(checker, kind)) == len(fitted), kind
    assert len(checker.images) == 3 * len(fitted)
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
    assert order == summary["ticker"].tolist()
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
    assert checker.tags.count("img") == 3


def test_render_report_single_ticker_full_sample() -> None:
    frame = make_sensitivity([Stock("ONE", beta=1.1)], window=0, n_days=120)
    page = render_report(frame, summary_table(frame), {}).decode("utf-8")

    checker = parse(page)
    text = " ".join(checker.text)
    assert "full sample" in text
    assert "failed" not in text
    assert len(checker.images) == 3
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
