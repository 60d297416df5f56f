"""The report's fast paths draw what the plain figure functions draw.

``render_report`` reuses one sparkline figure for the whole overview and one figure per kind of
per-ticker chart, and places the axes itself instead of running constrained layout.  These
tests pin that down: a reused figure gives the same PNG bytes as a new one, whatever was drawn
in it before; every label and the legend stay inside the figure without overlapping; and the
number of figures a report creates does not grow with the number of tickers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from matplotlib import dates as mdates
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator
from test_report import STOCKS, Stock, history_of, make_sensitivity, with_inference

from sensitivity import process_pool, report
from sensitivity.report import (
    characteristic_curve,
    characteristic_curve_figure,
    figure_png,
    gamma_history_figure,
    render_report,
    sensitivity_history_figure,
    sparkline_figure,
    summary_table,
)


@pytest.fixture(scope="module")
def histories() -> list[pd.DataFrame]:
    """Checked histories in an order that changes every range: long, without fit, short, gappy."""
    table = with_inference(make_sensitivity(STOCKS))
    by_ticker = {s.ticker: report._one_combination(history_of(table, s.ticker)) for s in STOCKS}
    short = report._one_combination(by_ticker["AAA"].iloc[-70:])
    return [by_ticker["AAA"], by_ticker["NEW"], short, by_ticker["BBB"], by_ticker["CCC"]]


def test_a_reused_sparkline_draws_the_png_of_a_new_one(histories: list[pd.DataFrame]) -> None:
    spark = report._Sparkline()
    for history in histories:
        dates = history["date"].to_numpy(dtype="datetime64[ns]")
        start = report._recent(dates, report.SPARK_DAYS)
        reused = spark.draw(dates[start:], report._floats(history["sensitivity"])[start:])
        fresh = sparkline_figure(history)
        assert figure_png(reused, dpi=report.SPARK_DPI) == figure_png(fresh, dpi=report.SPARK_DPI)


def test_reused_section_charts_draw_the_pngs_of_new_ones(histories: list[pd.DataFrame]) -> None:
    charts = report._SectionCharts.new()
    for history in histories:
        curve = report._characteristic_curve(history, ())
        pairs = [
            (
                report._characteristic_curve_figure(curve, charts.characteristic),
                characteristic_curve_figure(history),
            ),
            (
                report._sensitivity_history_figure(history, charts.sensitivity),
                sensitivity_history_figure(history),
            ),
            (report._gamma_history_figure(history, charts.gamma), gamma_history_figure(history)),
        ]
        for reused, fresh in pairs:
            assert figure_png(reused) == figure_png(fresh)


def _figures(history: pd.DataFrame) -> Iterator[Figure]:
    yield characteristic_curve_figure(history)
    yield sensitivity_history_figure(history)
    yield gamma_history_figure(history)


@pytest.mark.parametrize("n_days", [30, 260, 1300])
def test_charts_keep_labels_and_legend_inside_the_figure(n_days: int) -> None:
    frame = with_inference(
        make_sensitivity([Stock("WIDE", beta=-0.4, gamma=300.0)], n_days=n_days, min_obs=20)
    )
    history = history_of(frame, "WIDE")
    for fig in _figures(history):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        ax = fig.axes[0]
        tight = ax.get_tightbbox(renderer)
        assert tight is not None
        title = ax.get_title()
        assert tight.x0 >= -1, title
        assert tight.y0 >= -1, title
        assert tight.x1 <= fig.bbox.width + 1, title
        assert tight.y1 <= fig.bbox.height + 1, title
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            assert box.y0 >= -1
            assert box.x0 >= -1
            assert box.x1 <= fig.bbox.width + 1
            assert box.y1 <= tight.y0 + 1, "the legend overlaps the axes' labels"
        assert ax.get_position().height > 0.4
        assert ax.get_position().width > 0.6


def test_a_y_offset_text_lifts_the_title_instead_of_running_into_it(histories: list[pd.DataFrame]) -> None:
    # Values far from 0 relative to their spread: the y axis labels them as offsets from a
    # "+1e3" written above the plot's top left corner, where the title would otherwise sit.
    shifted = histories[0].assign(ticker="ABCDEFGHIJKLMNOP")  # a title as wide as the plot
    for column in ("sensitivity", "sensitivity_ci_lower", "sensitivity_ci_upper", "linear_beta"):
        shifted[column] = shifted[column] * 1e-3 + 1000.0
    charts = report._SectionCharts.new()
    for fig in (
        sensitivity_history_figure(shifted),
        report._sensitivity_history_figure(shifted, charts.sensitivity),
    ):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        ax = fig.axes[0]
        offset = ax.yaxis.offsetText
        assert offset.get_text() == "+1e3"
        text_box, title_box = offset.get_window_extent(renderer), ax.title.get_window_extent(renderer)
        assert not title_box.overlaps(text_box), "the title overlaps the y axis' offset text"
        assert title_box.y1 <= fig.bbox.height
    # The next chart in the reused figure has no offset text: its title is back on the plot.
    plain = report._sensitivity_history_figure(histories[0], charts.sensitivity)
    assert figure_png(plain) == figure_png(sensitivity_history_figure(histories[0]))


def test_a_figure_handed_to_the_caller_keeps_live_date_ticks(histories: list[pd.DataFrame]) -> None:
    # The report's charts are drawn as built, so their date ticks are worked out once; a
    # figure returned to a caller, who may zoom it, keeps matplotlib's locator.
    history = histories[0]
    fig = sensitivity_history_figure(history)
    ax = fig.axes[0]
    assert isinstance(ax.xaxis.get_major_locator(), AutoDateLocator)
    last = history["date"].iloc[-1]
    ax.set_xlim(mdates.date2num(last - pd.Timedelta(days=60)), mdates.date2num(last))
    figure_png(fig)
    low, high = ax.get_xlim()
    assert sum(low <= t <= high for t in ax.get_xticks()) >= 3  # ticks for the new view
    reused = report._sensitivity_history_figure(history, report._SectionCharts.new().sensitivity)
    assert isinstance(reused.axes[0].xaxis.get_major_locator(), FixedLocator)


def test_the_characteristic_curve_keeps_its_data_in_the_reused_figure(histories: list[pd.DataFrame]) -> None:
    charts = report._SectionCharts.new()
    for history in histories:
        curve = characteristic_curve(history)
        fig = report._characteristic_curve_figure(curve, charts.characteristic)
        offsets = [
            len(np.asarray(c.get_offsets())) for c in fig.axes[0].collections if hasattr(c, "get_offsets")
        ]
        assert curve.n == 0 or curve.n in offsets
        assert len(fig.legends) == (1 if curve.n else 0)


def test_a_report_creates_a_handful_of_figures_whatever_the_number_of_tickers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[Figure] = []
    init = Figure.__init__

    def counting_init(self: Figure, *args: object, **kwargs: object) -> None:
        created.append(self)
        init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Figure, "__init__", counting_init)
    frame = make_sensitivity([Stock(f"S{i:02d}", beta=0.5 + 0.1 * i) for i in range(8)], n_days=120)
    page = render_report(frame, summary_table(frame), {}).decode("utf-8")

    assert page.count('data-chart="sparkline"') == 8
    assert page.count('data-chart="characteristic"') == 8
    assert len(created) == 5  # the sparkline, one per kind of section chart, the heatmap


@dataclass(frozen=True)
class Universe:
    frame: pd.DataFrame
    summary: pd.DataFrame
    page: bytes  # drawn without workers


@pytest.fixture(scope="module")
def universe() -> Universe:
    """Seven tickers with every optional column, one without any fit, and their page."""
    stocks = [*STOCKS, *(Stock(f"S{i:02d}", beta=0.5 + 0.15 * i, gamma=8.0 * (i - 1)) for i in range(3))]
    frame = with_inference(make_sensitivity(stocks))
    summary = summary_table(frame)
    return Universe(frame, summary, render_report(frame, summary, {}, workers=0))


def test_sections_drawn_in_worker_processes_give_the_same_page(
    universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caller draws slowly here, so that the workers draw most sections.
    drawn_here: list[str] = []
    section_of = report._section_of

    def slow_section_of(job: Any, charts: Any) -> str:
        time.sleep(1.0)
        drawn_here.append(str(job[0]["ticker"]))
        return section_of(job, charts)

    monkeypatch.setattr(report, "_section_of", slow_section_of)
    assert render_report(universe.frame, universe.summary, {}, workers=2) == universe.page
    sections = universe.page.count(b'data-chart="characteristic"')
    assert sections >= 6
    assert len(drawn_here) < sections  # the rest came from the workers


def test_worker_processes_draw_with_the_callers_matplotlib_settings(universe: Universe) -> None:
    with rc_context({"lines.linewidth": 3.0, "font.size": 13.0, "axes.facecolor": "#fff8e0"}):
        here = render_report(universe.frame, universe.summary, {}, workers=0)
        pooled = render_report(universe.frame, universe.summary, {}, workers=2)
    assert here != universe.page  # the settings change the pixels ...
    assert pooled == here  # ... in the workers as in the caller


def test_a_report_whose_workers_fail_is_still_complete(
    universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_pool, "_BOOT", "import os; os._exit(1)")
    assert render_report(universe.frame, universe.summary, {}, workers=2) == universe.page


def test_a_draft_of_the_same_inputs_is_taken_over_and_gives_the_same_page(
    universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sections a worker started before the page was asked for (draft_sections) are the
    page's when each job is the one it would draw: no second pool, the same bytes."""
    rows = split_by_combination(universe.frame, arrow=True)
    assert report.draft_sections(universe.frame, universe.summary, {}, workers=1) is None  # a table
    draft = report.draft_sections(rows, universe.summary, {}, workers=1)
    assert draft is not None
    assert len(draft.jobs) == universe.page.count(b'data-chart="characteristic"') + 1  # + NEW's note
    assert set(draft.histories) == set(rows)  # (all charted)
    two = report.draft_sections(rows, universe.summary, {}, workers=1, chart_limit=2)
    assert two is not None
    assert len(two.histories) == 2  # only the charted rows are read
    two.close()

    def no_second_pool(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the page started workers of its own")

    monkeypatch.setattr(report, "_section_pool", no_second_pool)
    assert render_report(rows, universe.summary, {}, draft=draft) == universe.page
    assert draft.pool.processes == 0  # closed with the page


def test_a_draft_of_other_inputs_is_dropped_and_the_page_drawn_from_its_own(universe: Universe) -> None:
    """A draft whose sections differ in anything (here one summary value, or a setting the
    manifest gives) is closed and the page drawn again: never a section of other inputs."""
    other = universe.summary.copy()
    other.loc[other.index[0], "r2"] = 0.123456
    rows = split_by_combination(universe.frame, arrow=False)
    for summary, manifest in [(other, {}), (universe.summary, {"config": {"model": {"min_obs": 5}}})]:
        draft = report.draft_sections(rows, summary, manifest, workers=1)
        assert draft is not None
        assert render_report(rows, universe.summary, {}, draft=draft, workers=0) == universe.page
        assert draft.pool.processes == 0


def test_a_draft_compares_sections_value_by_value_and_type_by_type() -> None:
    same = report._same_value
    assert same({"a": 1.0, "b": float("nan")}, {"a": 1.0, "b": float("nan")})
    assert not same({"a": 1}, {"a": 1.0})  # written "1" and "1.0"
    assert not same({"a": True}, {"a": 1})
    assert not same(({"a": 1},), ({"a": 1}, None))
    frame = pd.DataFrame({"x": [1.0, np.nan], "d": pd.to_datetime(["2024-01-02", "2024-01-03"])})
    assert same(frame, frame.copy())
    assert not same(frame, frame.astype({"x": "float32"}))
    assert not same(frame, frame.set_axis([5, 6]))
    assert not same(frame, frame.assign(x=[1.0, 2.0]))
    assert not same(frame, None)


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_render_report_rejects_a_bad_worker_count(universe: Universe, workers: object) -> None:
    with pytest.raises(ValueError, match="workers must be None or an integer >= 0"):
        render_report(universe.frame, universe.summary, {}, workers=workers)  # type: ignore[arg-type]


def split_by_combination(frame: pd.DataFrame, *, arrow: bool) -> dict[tuple[str, str, int], Any]:
    """``frame``'s rows per combination, last ticker first, as DataFrames or as Arrow tables
    with ``date`` as date32 (how the store and the pipeline hold them)."""
    out: dict[tuple[str, str, int], Any] = {}
    for (index, ticker, window), rows in reversed(list(frame.groupby(list(report.KEY_COLUMNS), sort=True))):
        rows = rows.sort_values("date", kind="stable")
        if arrow:
            table = pa.Table.from_pandas(rows, preserve_index=False)
            days = pa.array(pd.to_datetime(rows["date"]).dt.date, type=pa.date32())
            rows = table.set_column(table.schema.get_field_index("date"), "date", days)
        out[(str(index), str(ticker), int(window))] = rows
    return out


@pytest.mark.parametrize("arrow", [False, True], ids=["pandas", "arrow"])
@pytest.mark.parametrize("chart_limit", [40, 4])
def test_a_page_from_rows_split_by_combination_is_the_page_of_the_table(
    universe: Universe, arrow: bool, chart_limit: int
) -> None:
    """What the pipeline hands over (rows per combination, Arrow tables for the rows a daily
    run kept) draws the page of the long table, charted or not, byte for byte."""
    shuffled = universe.frame.sample(frac=1.0, random_state=7)  # the table's row order is free
    page = render_report(shuffled, universe.summary, {}, workers=0, chart_limit=chart_limit)
    if chart_limit == 40:
        assert page == universe.page
    split = split_by_combination(universe.frame, arrow=arrow)
    assert render_report(split, universe.summary, {}, workers=0, chart_limit=chart_limit) == page


class CountedSource:
    """A :class:`report.RowSource` over a table that records the columns each read asks for."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.reads: list[tuple[str, ...]] = []

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    def read(self, columns: Any) -> pa.Table:
        self.reads.append(tuple(columns))
        return self.table.select(list(columns))


@pytest.mark.parametrize("chart_limit", [40, 4])
def test_a_page_from_row_sources_reads_only_what_it_draws(universe: Universe, chart_limit: int) -> None:
    """Rows handed over as row sources (a daily run's kept files) draw the page of the
    table, byte for byte; a combination that is not charted is read for its dates and
    sensitivities only, a charted one once more for all its columns."""
    split = split_by_combination(universe.frame, arrow=True)
    page = render_report(split, universe.summary, {}, workers=0, chart_limit=chart_limit)
    sources = {key: CountedSource(table) for key, table in split.items()}
    assert render_report(sources, universe.summary, {}, workers=0, chart_limit=chart_limit) == page
    assert isinstance(next(iter(sources.values())), report.RowSource)
    reads = sorted(tuple(source.reads) for source in sources.values())
    light = (("date", "sensitivity"),)
    charted = sum(1 for r in reads if r != light)
    every = tuple(next(iter(split.values())).column_names)
    assert all(r in (light, (*light, every)) for r in reads)
    assert charted >= page.count(b'data-chart="characteristic"') > 0  # at most one per section
    if chart_limit == 4:
        assert 0 < charted < len(sources)


def test_rows_split_by_combination_are_checked(universe: Universe) -> None:
    split = split_by_combination(universe.frame, arrow=True)
    key = next(iter(split))
    with pytest.raises(TypeError, match=r"a pandas DataFrame, an Arrow table or a row source, got list"):
        render_report({**split, key: [1, 2]}, universe.summary, {}, workers=0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) sensitivity_se"):
        render_report({**split, key: split[key].drop_columns(["sensitivity_se"])}, universe.summary, {})
    backwards = split[key].take(pa.array(range(split[key].num_rows - 1, -1, -1)))
    with pytest.raises(ValueError, match=rf"the rows of {key[1]} against \^GSPC .* are not in date order"):
        render_report({**split, key: backwards}, universe.summary, {}, workers=0)
    with pytest.raises(ValueError, match=r"sensitivity is empty"):
        render_report({k: v.slice(0, 0) for k, v in split.items()}, universe.summary, {}, workers=0)
