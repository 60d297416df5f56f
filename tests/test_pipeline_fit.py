"""``pipeline.fit_universe`` with the issue-5 model options: excess returns, robust errors,
Huber fits and the scenario table, on a files source (no Prefect)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sensitivity import store as store_module
from sensitivity.config import Config, load_config
from sensitivity.errors import ModelFitError
from sensitivity.pipeline import build_manifest, fetch_symbol, fit_universe, fit_universe_with_history
from sensitivity.report import SENSITIVITY_COLUMNS, render_report
from sensitivity.scenarios import scenario_table
from sensitivity.store import INPUTS_KEY, InputsStamp, PriceStore, ReportStore, SensitivityKey, StoredRows

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
START, END = dt.date(2017, 1, 3), dt.date(2018, 6, 29)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    pd.DataFrame(
        {
            "Date": pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d"),
            "Open": frame["open"],
            "High": frame["high"],
            "Low": frame["low"],
            "Close": frame["close"],
            "Adj Close": frame["adj_close"],
            "Volume": frame["volume"].astype("int64"),
        }
    ).to_csv(path, index=False, float_format="%.17g")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """^GSPC, KO and JPM from the sample, and a synthetic 13-week T-bill rate ^IRX in percent."""
    folder = tmp_path_factory.mktemp("csv")
    for sym in ("^GSPC", "KO", "JPM"):
        write_csv(pd.read_parquet(SAMPLE / f"{sym}.parquet"), folder / f"{sym}.csv")
    index = pd.read_parquet(SAMPLE / "^GSPC.parquet")
    rate = index.copy()
    level = np.linspace(0.5, 2.0, len(rate))  # percent per year
    for c in ("open", "high", "low", "close", "adj_close"):
        rate[c] = level
    rate["volume"] = 0.0
    rate = rate[rate["date"] != dt.date(2018, 3, 15)]  # one day without a quote
    write_csv(rate, folder / "^IRX.csv")
    return folder


def config(source: Path, data: Path, **model: object) -> Config:
    cfg = load_config(
        None,
        {
            "tickers": ["KO", "JPM"],
            "start": START,
            "end": END,
            "source": "files",
            "source_path": source,
            "data_dir": data,
            "window": 126,
            "min_obs": 60,
        },
    )
    raw = cfg.to_dict()
    raw["model"].update(model)
    return Config.model_validate(raw)


def run(cfg: Config) -> None:
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    fit_universe(cfg, list(cfg.universe.tickers))


def test_fit_universe_on_excess_returns_with_a_rate_symbol(source: Path, tmp_path: Path) -> None:
    cfg = config(source, tmp_path, risk_free_symbol="^IRX", se="hac", fit="huber", scenarios=[-0.1, 0.03])
    assert cfg.fetch_symbols[-1] == "^IRX"
    run(cfg)
    rs = ReportStore(tmp_path)
    table = rs.read_sensitivity()
    assert (table["se_type"] == "hac").all()
    assert not (table["date"] == dt.date(2018, 3, 15)).any()  # no rate: the day is dropped
    rate = pd.read_csv(source / "^IRX.csv", index_col="Date")["Close"]
    ko = table[table["ticker"] == "KO"].set_index("date")
    day = dt.date(2018, 1, 3)
    expected = (1.0 + rate[day.isoformat()] / 100.0) ** (1.0 / 252.0) - 1.0
    assert ko.loc[day, "risk_free_return"] == pytest.approx(expected, rel=1e-11)
    fitted = ko["beta"].notna()
    assert ko.loc[fitted, "huber_beta"].notna().all()  # fit = "huber": every window
    summary = rs.read_summary()
    assert summary["fit"].tolist() == ["huber", "huber"]
    scenarios = rs.read_scenarios(as_of=END)
    assert len(scenarios) == 4
    assert (scenarios["fit"] == "huber").all()
    expected_table = scenario_table(summary, (-0.1, 0.03), fit="huber")
    np.testing.assert_allclose(scenarios["predicted_return"], expected_table["predicted_return"], rtol=1e-15)
    np.testing.assert_allclose(scenarios["price_move"], expected_table["price_move"], rtol=1e-15)
    assert pd.read_parquet(tmp_path / "reports" / "scenarios").shape == (4, 19)


def test_fit_universe_with_a_constant_rate_and_defaults(source: Path, tmp_path: Path) -> None:
    cfg = config(source, tmp_path, risk_free=0.03)
    run(cfg)
    table = ReportStore(tmp_path).read_sensitivity()
    one_day = 1.03 ** (1 / 252) - 1
    single = table["risk_free_return"] < 1.5 * one_day
    np.testing.assert_allclose(table.loc[single, "risk_free_return"], one_day, rtol=1e-11)
    assert (table["se_type"] == "classical").all()
    latest = table.groupby("ticker").tail(1)
    assert latest["huber_beta"].notna().all()  # fit = "ols": the latest window only
    assert table.groupby("ticker")["huber_beta"].count().tolist() == [1, 1]
    scenarios = ReportStore(tmp_path).read_scenarios()
    assert len(scenarios) == 2 * 8
    assert (scenarios["fit"] == "ols").all()


def test_the_fits_counts_per_ticker_and_the_tickers_without_data(source: Path, tmp_path: Path) -> None:
    """The outcome counts each ticker's rows and fitted rows as written, and names the tickers
    it could not fit: one without a stored price in the range, one with a single price (no
    return)."""
    folder = tmp_path / "csv"
    folder.mkdir()
    for name in ("^GSPC", "KO", "JPM"):
        (folder / f"{name}.csv").write_bytes((source / f"{name}.csv").read_bytes())
    ko = pd.read_csv(folder / "KO.csv")
    ko[ko["Date"] == "2018-01-03"].to_csv(folder / "LONE.csv", index=False)
    cfg = config(folder, tmp_path / "data")
    for symbol in ("^GSPC", "KO", "JPM", "LONE"):
        fetch_symbol(cfg, symbol)
    outcome = fit_universe(cfg, ["KO", "LONE", "JPM", "NONE"])
    table = ReportStore(tmp_path / "data").read_sensitivity()
    assert set(table["ticker"]) == {"KO", "JPM"}
    assert outcome.rows_by_ticker == table.groupby("ticker").size().to_dict()
    assert outcome.fitted_by_ticker == table.groupby("ticker")["sensitivity"].count().to_dict()
    assert 0 < outcome.fitted_by_ticker["KO"] < outcome.rows_by_ticker["KO"]  # the first window
    assert all(type(v) is int for v in [*outcome.rows_by_ticker.values(), *outcome.fitted_by_ticker.values()])
    assert outcome.rows == len(table)
    assert sorted(outcome.no_data) == ["LONE", "NONE"]
    assert outcome.no_data["NONE"] == f"no stored prices between {START} and {END}"
    assert "(no aligned return)" in outcome.no_data["LONE"]


def test_the_fits_summary_from_each_tickers_last_row_is_the_full_summary(
    source: Path, tmp_path: Path
) -> None:
    """The fit summarises its table from each ticker's last row (its rows run ticker by
    ticker, each by date): the same frame as summary_table over every row; rows in another
    order take the full summary and give the same."""
    from sensitivity.pipeline import _run_ends, _ticker_codes
    from sensitivity.report import summary_table

    cfg = config(source, tmp_path / "data")
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    fit_universe(cfg, ["KO", "JPM"])
    table = ReportStore(tmp_path / "data").read_sensitivity()
    expected = summary_table(table)
    assert len(expected) == 2
    ends = _run_ends(_ticker_codes(table)[0], pd.to_datetime(table["date"]))
    assert ends is not None
    pd.testing.assert_frame_equal(summary_table(table.iloc[ends]), expected)
    shuffled = table.sample(frac=1.0, random_state=0)
    assert _run_ends(_ticker_codes(shuffled)[0], pd.to_datetime(shuffled["date"])) is None
    stored = ReportStore(tmp_path / "data").read_summary()
    assert stored["ticker"].tolist() == expected["ticker"].tolist()


@pytest.mark.parametrize(
    "model",
    [{}, {"se": "hac", "risk_free_symbol": "^IRX"}, {"fit": "huber", "se": "hc1"}],
    ids=["ols", "hac-excess", "huber-hc1"],
)
def test_the_next_days_run_keeps_every_stored_row_to_the_bit(
    source: Path, tmp_path: Path, model: dict
) -> None:
    """A run that only adds days rewrites each per-day file, but every row it had before keeps
    its values to the bit (the Huber columns move to the new latest row, by design)."""
    after = config(source, tmp_path, **model)
    raw = after.to_dict()
    raw["universe"]["end"] = dt.date(2018, 3, 29)
    before = Config.model_validate(raw)
    for symbol in after.fetch_symbols:
        fetch_symbol(after, symbol)
    store = ReportStore(tmp_path)
    fit_universe(before, ["KO", "JPM"])
    old = store.read_sensitivity().set_index(["ticker", "date"])
    fit_universe(after, ["KO", "JPM"])
    new = store.read_sensitivity().set_index(["ticker", "date"])
    assert len(new) > len(old) + 100
    assert old.index.isin(new.index).all()
    kept = new.loc[old.index]
    latest = (old.groupby(level="ticker").cumcount(ascending=False) == 0).to_numpy()
    for name in old.columns:
        a, b = old[name].to_numpy(), kept[name].to_numpy()
        if name.startswith("huber_"):
            a, b = a[~latest], b[~latest]
        if a.dtype.kind == "f":
            assert np.array_equal(a, b, equal_nan=True), name
        else:
            assert (a == b).all(), name
    assert old["sensitivity"].notna().sum() > 200


def test_fit_universe_without_the_rate_symbols_prices_names_it(source: Path, tmp_path: Path) -> None:
    cfg = config(source, tmp_path, risk_free_symbol="^IRX")
    for symbol in cfg.universe.symbols:  # the rate is never fetched
        fetch_symbol(cfg, symbol)
    with pytest.raises(ModelFitError, match=r"\^IRX: the risk-free rate has no stored prices"):
        fit_universe(cfg, ["KO", "JPM"])


def long_rows(history: Mapping[SensitivityKey, pd.DataFrame | pa.Table | StoredRows]) -> pd.DataFrame:
    """A fit's per-combination rows for the report as one frame, ``date`` as timestamps."""
    parts = [
        r.to_pandas(date_as_object=False)
        if isinstance(r, pa.Table)
        else r.read(SENSITIVITY_COLUMNS).to_pandas(date_as_object=False)
        if isinstance(r, StoredRows)
        else r
        for r in history.values()
    ]
    frame = pd.concat(parts, ignore_index=True)
    return frame.assign(date=pd.to_datetime(frame["date"]).astype("datetime64[ns]"))


def test_the_fits_rows_are_what_the_report_would_read_back(source: Path, tmp_path: Path) -> None:
    """The flow hands the fit's rows to the report instead of reading the files back: the
    rows, their values to the bit, and the page drawn from them are the same."""
    cfg = config(source, tmp_path, risk_free_symbol="^IRX", se="hac", fit="huber")
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    fitted = fit_universe_with_history(cfg, ["KO", "JPM"])
    reports = ReportStore(tmp_path)
    stored = reports.read_sensitivity(
        index_ticker="^GSPC", window=126, tickers=["KO", "JPM"], columns=SENSITIVITY_COLUMNS
    )
    history = fitted.history
    assert history is not None
    assert list(history) == [("^GSPC", "KO", 126), ("^GSPC", "JPM", 126)]  # the fit's order
    assert all(list(rows.columns) == list(SENSITIVITY_COLUMNS) for rows in history.values())
    rows = long_rows(history)
    assert fitted.outcome.rows == len(rows) == len(stored)
    keys = ["ticker", "date"]
    mine = rows.sort_values(keys, ignore_index=True)
    theirs = stored.assign(date=pd.to_datetime(stored["date"])).sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(mine, theirs, check_exact=True, check_dtype=False)

    as_of = dt.date.fromisoformat(fitted.outcome.as_of)
    summary = reports.read_summary(as_of=as_of)
    scenarios = reports.read_scenarios(as_of=as_of)
    manifest = build_manifest(cfg, fitted.outcome, [], {}, started_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    page = render_report(history, summary, manifest, scenarios=scenarios, workers=0)
    assert page == render_report(stored, summary, manifest, scenarios=scenarios, workers=0)


def test_a_daily_runs_rows_for_the_report_are_its_files(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daily run that kept the stored row groups as bytes hands the report those rows as
    :class:`StoredRows` (read back for what the page draws): the rows and the page are those
    of the files, and stay this run's when another run replaces a file afterwards."""
    monkeypatch.setattr(store_module, "SENSITIVITY_ROW_GROUP", 64)
    after = fetched(config(source, tmp_path, se="hac"))
    fit_universe(ended(after, BEFORE), ["KO", "JPM"])
    fitted = fit_universe_with_history(after, ["KO", "JPM"])
    history = fitted.history
    assert history is not None
    assert all(isinstance(rows, StoredRows) and rows.skipped > 0 for rows in history.values())
    reports = ReportStore(tmp_path)
    stored = reports.read_sensitivity(
        index_ticker="^GSPC", window=126, tickers=["KO", "JPM"], columns=SENSITIVITY_COLUMNS
    )
    keys = ["ticker", "date"]
    mine = long_rows(history).sort_values(keys, ignore_index=True)
    theirs = stored.assign(date=pd.to_datetime(stored["date"])).sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(mine, theirs, check_exact=True, check_dtype=False)
    assert fitted.outcome.rows == len(stored)
    assert fitted.outcome.fitted_by_ticker == {
        t: int(g["sensitivity"].notna().sum()) for t, g in stored.groupby("ticker", sort=False)
    }
    assert fitted.outcome.first_date == str(stored["date"].min())

    as_of = dt.date.fromisoformat(fitted.outcome.as_of)
    summary = reports.read_summary(as_of=as_of)
    manifest = build_manifest(
        after, fitted.outcome, [], {}, started_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    )
    page = render_report(history, summary, manifest, workers=0)
    assert page == render_report(stored, summary, manifest, workers=0)

    ko = history[("^GSPC", "KO", 126)]
    assert isinstance(ko, StoredRows)
    mine_ko = ko.read(list(SENSITIVITY_COLUMNS))
    path = reports.sensitivity_path("^GSPC", "KO", 126)
    other = pq.read_table(path).slice(0, 10)
    tmp = path.with_name(".replacement.parquet")
    pq.write_table(other, tmp)
    os.replace(tmp, path)  # another run's file now
    assert ko.read(list(SENSITIVITY_COLUMNS)).equals(mine_ko)  # still this run's rows


def _one_section_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker for the sections whatever the machine (two tickers are too few otherwise)."""
    import sensitivity.report as report_module

    monkeypatch.setattr(
        report_module, "section_workers", lambda n, w=None: min(n, 1) if w is None else min(w, n)
    )


def test_a_daily_run_starts_the_reports_sections_before_it_writes(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``draft_report``: the report's charted sections start in a worker before the fit
    writes its files; the run's report takes each over (the job it would draw itself, from
    the summary and scenarios as read back) and the page is the one drawn without them."""
    import sensitivity.report as report_module

    monkeypatch.setattr(store_module, "SENSITIVITY_ROW_GROUP", 64)
    _one_section_worker(monkeypatch)
    after = fetched(config(source, tmp_path, se="hac"))
    fit_universe(ended(after, BEFORE), ["KO", "JPM"])
    events: list[str] = []
    real_draft, real_write = report_module.draft_sections, ReportStore.write_sensitivity_tables

    def drafting(*args: Any, **kwargs: Any) -> Any:
        events.append("draft")
        return real_draft(*args, **kwargs)

    def writing(self: ReportStore, *args: Any, **kwargs: Any) -> Any:
        events.append("write")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(report_module, "draft_sections", drafting)
    monkeypatch.setattr(ReportStore, "write_sensitivity_tables", writing)
    fitted = fit_universe_with_history(after, ["KO", "JPM"], draft_report=True)
    assert events == ["draft", "write"]
    assert fitted.draft is not None
    assert fitted.history is not None
    matched: list[bool] = []
    real_same = report_module._same_jobs

    def comparing(*args: Any) -> bool:
        matched.append(real_same(*args))
        return matched[-1]

    monkeypatch.setattr(report_module, "_same_jobs", comparing)
    reads: list[object] = []

    class Counted(report_module._History):  # type: ignore[misc,name-defined]
        def __init__(self, rows: Any, key: Any) -> None:
            reads.append(key)
            super().__init__(rows, key)

    monkeypatch.setattr(report_module, "_History", Counted)
    reports = ReportStore(tmp_path)
    as_of = dt.date.fromisoformat(fitted.outcome.as_of)
    summary, scenarios = reports.read_summary(as_of=as_of), reports.read_scenarios(as_of=as_of)
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    manifest = build_manifest(after, fitted.outcome, [], {}, started_at=started)
    page = render_report(fitted.history, summary, manifest, scenarios=scenarios, draft=fitted.draft)
    assert matched == [True]
    assert reads == []  # the charted rows the draft read are not read again (both are charted)
    assert fitted.draft.pool.processes == 0
    assert page == render_report(fitted.history, summary, manifest, scenarios=scenarios, workers=0)


def test_a_fit_whose_writes_fail_stops_its_report_draft(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sensitivity.errors import StoreError
    from sensitivity.report import SectionDraft

    _one_section_worker(monkeypatch)
    cfg = fetched(config(source, tmp_path))
    closed: list[SectionDraft] = []
    real_close = SectionDraft.close

    def closing(self: SectionDraft) -> None:
        closed.append(self)
        real_close(self)

    def failing(self: ReportStore, frame: pd.DataFrame) -> Any:
        raise StoreError("disk full")

    monkeypatch.setattr(SectionDraft, "close", closing)
    monkeypatch.setattr(ReportStore, "write_summary", failing)
    with pytest.raises(StoreError, match="disk full"):
        fit_universe_with_history(cfg, ["KO", "JPM"], draft_report=True)
    assert len(closed) == 1
    assert closed[0].pool.processes == 0


def test_a_history_too_large_to_copy_is_read_back_by_the_report(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above HANDOVER_MAX_BYTES the fit keeps no copy of its rows (it would hold the table one
    and a half times) and the report reads them back from the files instead."""
    import sensitivity.pipeline as pipeline

    cfg = config(source, tmp_path)
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    kept = fit_universe_with_history(cfg, ["KO", "JPM"])
    assert kept.history is not None
    size = len(long_rows(kept.history)) * len(SENSITIVITY_COLUMNS) * 8
    monkeypatch.setattr(pipeline, "HANDOVER_MAX_BYTES", size - 1)
    fitted = fit_universe_with_history(cfg, ["KO", "JPM"])
    assert fitted.history is None
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    paths = pipeline.write_run_report(cfg, fitted.outcome, [], {}, started_at=started, history=None)
    assert Path(paths["report"]).read_text(encoding="utf-8").count('data-chart="sensitivity"') == 2
    monkeypatch.setattr(pipeline, "HANDOVER_MAX_BYTES", size)
    assert fit_universe_with_history(cfg, ["KO", "JPM"]).history is not None  # the bound is inclusive


# The scale each float column of the per-day table is compared on (see the CUDA test below):
# a coefficient or sensitivity against max(|value|, its standard error), a covariance entry
# against the product of the two standard errors, the AIC difference against the AICs, the
# t statistic against max(|t|, 1) (its own standard error is 1); any other column against
# |value|.  Inputs the device never touches must be equal.
_SE_OF = {
    **{c: f"{c}_se" for c in ("alpha", "beta", "gamma", "huber_alpha", "huber_beta", "huber_gamma")},
    **{c: "sensitivity_se" for c in ("sensitivity", "sensitivity_ci_lower", "sensitivity_ci_upper")},
    "huber_sensitivity": "huber_sensitivity_se",
}
_UNTOUCHED = ("index_return", "stock_return", "close", "prev_close", "risk_free_return")


def _column_scale(table: pd.DataFrame, column: str) -> np.ndarray:
    value = table[column].abs().to_numpy()
    if column in _SE_OF:
        return np.fmax(value, table[_SE_OF[column]].to_numpy())
    if column.startswith(("cov_", "huber_cov_")):
        prefix, pair = column.rsplit("cov_", 1)
        a, b = pair.split("_")
        return table[f"{prefix}{a}_se"].to_numpy() * table[f"{prefix}{b}_se"].to_numpy()
    if column == "delta_aic":
        return np.fmax(table["aic_linear"].abs().to_numpy(), table["aic_quadratic"].abs().to_numpy())
    if column == "gamma_t":
        return np.fmax(value, 1.0)
    if column == "dollar_sensitivity":  # 0.01 x sensitivity x prev_close: its se in the same units
        return np.fmax(value, (0.01 * table["sensitivity_se"] * table["prev_close"]).abs().to_numpy())
    return value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "model",
    [{}, {"risk_free_symbol": "^IRX", "se": "hac", "fit": "huber"}, {"se": "hc1"}],
    ids=["defaults", "excess-hac-huber", "hc1"],
)
def test_the_pipeline_on_cuda_equals_the_cpu_within_1e9(source: Path, tmp_path: Path, model: dict) -> None:
    tables = {}
    for device in ("cuda", "cpu"):
        cfg = config(source, tmp_path / device, **model)
        raw = cfg.to_dict()
        raw["runtime"]["device"] = device
        run(Config.model_validate(raw))
        tables[device] = ReportStore(tmp_path / device).read_sensitivity()
    gpu, cpu = tables["cuda"], tables["cpu"]
    assert len(cpu) > 500
    pd.testing.assert_frame_equal(
        gpu.select_dtypes(exclude="float64"), cpu.select_dtypes(exclude="float64")
    )  # keys, n_obs, se_type
    for column in cpu.columns[cpu.dtypes == "float64"]:
        got, want = gpu[column].to_numpy(), cpu[column].to_numpy()
        assert np.array_equal(np.isnan(got), np.isnan(want)), f"{column}: NaN pattern differs"
        if column in _UNTOUCHED:
            np.testing.assert_array_equal(got, want, err_msg=column)
            continue
        ok = ~np.isnan(want)
        err = np.abs(got[ok] - want[ok]) / _column_scale(cpu, column)[ok]
        assert err.max(initial=0.0) <= 1e-9, f"{column}: max scaled difference {err.max():.2e}"


# -- daily runs keep the stored rows (sensitivity.reuse) -------------------------------------

BEFORE = dt.date(2018, 3, 29)


def fetched(cfg: Config) -> Config:
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    return cfg


def ended(cfg: Config, end: dt.date, **model: object) -> Config:
    raw = cfg.to_dict()
    raw["universe"]["end"] = end
    raw["model"].update(model)
    return Config.model_validate(raw)


def files(data: Path) -> dict[str, bytes]:
    folder = ReportStore(data).sensitivity_dir
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def tables(data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    reports = ReportStore(data)
    summary = reports.read_summary()
    return reports.read_sensitivity(), summary[summary["as_of"] == summary["as_of"].max()].reset_index(
        drop=True
    )


def kept_count(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(tickers kept, of which with new days) from the fit's log line."""
    pattern = re.compile(r"kept the stored rows of (\d+), (\d+) of them")
    found = [pattern.search(r.getMessage()) for r in caplog.records]
    last = [m for m in found if m is not None][-1]
    return int(last.group(1)), int(last.group(2))


@pytest.mark.parametrize("group", [None, 64], ids=["one-group", "groups-of-64"])
@pytest.mark.parametrize(
    "model",
    [{}, {"se": "hac", "risk_free_symbol": "^IRX"}, {"fit": "huber", "se": "hc1"}],
    ids=["ols", "hac-excess", "huber-hc1"],
)
def test_a_daily_run_writes_what_a_fit_of_the_whole_range_writes(
    source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model: dict,
    group: int | None,
) -> None:
    """Fit through BEFORE, then through END with the stored rows kept: the per-day files,
    the summary and the report's rows equal those of a fresh data folder fitted through END
    in one go, bit for bit (Huber columns included: with fit = "ols" they move to the new
    latest row, and the stored ones are not even decoded).  With row groups smaller than
    the files (``groups-of-64``) the daily run copies the stored groups as bytes and encodes
    only the last: still the same files."""
    caplog.set_level(logging.INFO, logger="sensitivity.pipeline")
    spliced: list[bool] = []
    if group is not None:
        monkeypatch.setattr(store_module, "SENSITIVITY_ROW_GROUP", group)
        real_spliced = store_module.prepare_spliced_table

        def counted(*args: Any, **kwargs: Any) -> Any:
            prepared = real_spliced(*args, **kwargs)
            spliced.append(prepared is not None)
            return prepared

        monkeypatch.setattr(store_module, "prepare_spliced_table", counted)
    after = fetched(config(source, tmp_path / "daily", **model))
    fit_universe(ended(after, BEFORE), ["KO", "JPM"])
    assert kept_count(caplog) == (0, 0)
    decoded: list[list[str]] = []
    real_read, real_groups = pq.ParquetFile.read, pq.ParquetFile.read_row_groups

    def spy(self: pq.ParquetFile, *args: object, **kwargs: object) -> pa.Table:
        columns = kwargs.get("columns")
        if isinstance(columns, list) and "sensitivity" in columns:
            decoded.append(columns)
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    def spy_groups(self: pq.ParquetFile, groups: Any, *args: object, **kwargs: object) -> pa.Table:
        columns = kwargs.get("columns")
        if isinstance(columns, list) and "sensitivity" in columns and len(columns) > 2:
            decoded.append(columns)
            assert list(groups) == [self.metadata.num_row_groups - 1]  # the last group only
        return real_groups(self, groups, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(pq.ParquetFile, "read", spy)
        m.setattr(pq.ParquetFile, "read_row_groups", spy_groups)
        daily = fit_universe_with_history(after, ["KO", "JPM"])
    assert kept_count(caplog) == (2, 2)
    assert spliced == ([True, True] if group is not None else [])
    assert len(decoded) == 2
    huber_read = [any(c.startswith("huber_") for c in columns) for columns in decoded]
    assert huber_read == [model.get("fit") == "huber"] * 2

    once = fetched(config(source, tmp_path / "once", **model))
    whole = fit_universe_with_history(once, ["KO", "JPM"])
    assert kept_count(caplog) == (0, 0)
    (a_rows, a_summary), (b_rows, b_summary) = tables(tmp_path / "daily"), tables(tmp_path / "once")
    pd.testing.assert_frame_equal(a_rows, b_rows, check_exact=True)
    pd.testing.assert_frame_equal(a_summary, b_summary, check_exact=True)
    if model.get("fit") != "huber":
        assert a_rows["huber_beta"].notna().sum() == 2  # each ticker's latest row only
    assert daily.outcome.rows == whole.outcome.rows
    assert daily.outcome.rows_by_ticker == whole.outcome.rows_by_ticker
    assert daily.outcome.fitted_by_ticker == whole.outcome.fitted_by_ticker
    assert (daily.outcome.first_date, daily.outcome.as_of) == (whole.outcome.first_date, whole.outcome.as_of)
    keys = ["ticker", "date"]
    assert daily.history is not None
    assert whole.history is not None
    assert list(daily.history) == list(whole.history)
    pd.testing.assert_frame_equal(
        long_rows(daily.history).sort_values(keys, ignore_index=True),
        long_rows(whole.history).sort_values(keys, ignore_index=True),
        check_exact=True,
        check_dtype=False,
    )
    # The files carry their stamps: the last date and a digest of the inputs through it.
    for data in ("daily", "once"):
        path = ReportStore(tmp_path / data).sensitivity_path("^GSPC", "KO", 126)
        stamp = InputsStamp.from_bytes((pq.read_schema(path).metadata or {}).get(INPUTS_KEY))
        assert stamp is not None
        assert stamp.through == a_rows.loc[a_rows["ticker"] == "KO", "date"].max()
    assert files(tmp_path / "daily") == files(tmp_path / "once")


def test_a_rerun_with_nothing_new_leaves_the_files_alone(
    source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sensitivity.pipeline")
    cfg = fetched(config(source, tmp_path))
    fit_universe(cfg, ["KO", "JPM"])
    before = {p: p.stat().st_mtime_ns for p in ReportStore(tmp_path).sensitivity_dir.glob("*.parquet")}
    rows, summary = tables(tmp_path)
    again = fit_universe_with_history(cfg, ["KO", "JPM"])
    assert kept_count(caplog) == (2, 0)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    rows2, summary2 = tables(tmp_path)
    pd.testing.assert_frame_equal(rows, rows2, check_exact=True)
    pd.testing.assert_frame_equal(summary, summary2, check_exact=True)
    assert again.outcome.rows == len(rows)
    assert again.history is not None
    assert len(long_rows(again.history)) == len(rows)


def moved(cfg: Config, data: Path) -> Config:
    raw = cfg.to_dict()
    raw["output"]["data_dir"] = str(data)
    return Config.model_validate(raw)


@pytest.mark.parametrize("change", ["restated-price", "start", "se", "min-obs", "no-stamp"])
def test_anything_that_changes_a_stored_row_refits_the_ticker_in_full(
    source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
) -> None:
    """A restated price before the stored rows' last date, another start date, estimator or
    minimum give other digests: those tickers are fitted in full, and the files equal those
    of a fresh folder with the same prices.  A file without a stamp (an older version wrote
    it) is refitted too."""
    caplog.set_level(logging.INFO, logger="sensitivity.pipeline")
    daily = tmp_path / "daily"
    after = fetched(config(source, daily))
    fit_universe(ended(after, BEFORE), ["KO", "JPM"])
    kept = 1
    if change == "restated-price":
        path = PriceStore(daily).path_for("KO")
        table = pq.read_table(path)
        close = table.column("adj_close").to_numpy().copy()
        close[10] *= 1.0001  # a restated adjusted close well before the stored rows' end
        i = table.schema.get_field_index("adj_close")
        pq.write_table(table.set_column(i, table.schema.field(i), pa.array(close)), path)
    elif change == "start":
        raw = after.to_dict()
        raw["universe"]["start"] = dt.date(2017, 2, 1)
        after, kept = Config.model_validate(raw), 0
    elif change == "se":
        after, kept = ended(after, END, se="hc1"), 0
    elif change == "min-obs":
        after, kept = ended(after, END, min_obs=61), 0
    elif change == "no-stamp":
        path = ReportStore(daily).sensitivity_path("^GSPC", "JPM", 126)
        table = pq.read_table(path)
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != INPUTS_KEY}
        pq.write_table(table.replace_schema_metadata(meta), path)
    fit_universe(after, ["KO", "JPM"])
    assert kept_count(caplog)[0] == kept

    once = tmp_path / "once"
    shutil.copytree(daily / "prices", once / "prices")
    fit_universe(moved(after, once), ["KO", "JPM"])
    (a_rows, a_summary), (b_rows, b_summary) = tables(daily), tables(once)
    pd.testing.assert_frame_equal(a_rows, b_rows, check_exact=True)
    pd.testing.assert_frame_equal(a_summary, b_summary, check_exact=True)
