"""The Prefect flow end to end on the bundled sample and on a files source, into tmp_path."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from sensitivity.errors import ConfigError, PartialRunError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def flow():  # type: ignore[no-untyped-def]
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(f"{ROOT / 'flows' / 'pipeline.py'}:stock_sensitivity")


def run(flow, tmp: Path, **params):  # type: ignore[no-untyped-def]
    base = {
        "config": str(ROOT / "config" / "sample.toml"),
        "tickers": ["AAPL", "KO", "SPY"],
        "start": dt.date(2015, 1, 1),
        "end": dt.date(2016, 12, 30),
        "data_dir": str(tmp),
    }
    base.update(params)
    return flow(**base)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_flow_sample_writes_every_output(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(flow, tmp_path)
    assert result["as_of"] == "2016-12-30"
    assert result["failures"] == {}

    table = pd.read_parquet(tmp_path / "reports" / "sensitivity")
    expected = {
        "date",
        "ticker",
        "index_ticker",
        "window",
        "n_obs",
        "index_return",
        "stock_return",
        "alpha",
        "beta",
        "gamma",
        "sensitivity",
        "sensitivity_se",
        "linear_beta",
        "r2",
        "close",
        "dollar_sensitivity",
    }
    assert expected <= set(table.columns)
    for col in expected - {"date", "ticker", "index_ticker", "window", "n_obs"}:
        assert table[col].dtype == np.float64, col
    # 2015-01-02 .. 2016-12-30 has 504 trading days, so 503 returns per ticker (the sample has no gaps).
    assert table.groupby("ticker").size().to_dict() == {"AAPL": 503, "KO": 503, "SPY": 503}
    assert set(table["index_ticker"]) == {"^GSPC"}
    fitted = table.dropna(subset=["sensitivity"])
    assert fitted["n_obs"].min() == 126  # warm-up on a growing window, then the rolling window
    assert table["n_obs"].max() == 252
    np.testing.assert_allclose(
        fitted["dollar_sensitivity"], 0.01 * fitted["sensitivity"] * fitted["prev_close"], rtol=1e-15
    )

    summary = pd.read_parquet(tmp_path / "reports" / "summary")
    assert len(summary) == 3
    assert set(summary["as_of"].astype(str)) == {"2016-12-30"}
    assert set(summary["fit"]) == {"ols"}
    assert summary["huber_beta"].notna().all()  # the latest window's Huber fit, always
    scenarios = pd.read_parquet(tmp_path / "reports" / "scenarios")
    assert len(scenarios) == 3 * 8  # the default index moves
    assert set(scenarios["as_of"].astype(str)) == {"2016-12-30"}

    report = tmp_path / "reports" / "daily" / "2016-12-30" / "report.html"
    manifest = json.loads((report.parent / "manifest.json").read_text())
    assert report.stat().st_size > 10_000
    assert manifest["rows"]["total"] == len(table)
    assert manifest["config"]["model"]["window"] == 252
    assert manifest["versions"]["torch"]
    assert result["paths"]["report"] == str(report)


def test_flow_report_draws_the_fits_rows_without_reading_them_back(  # type: ignore[no-untyped-def]
    flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fit task hands its rows to the report task; the per-day files are not read again."""
    from sensitivity.store import ReportStore

    def read_back(*args: Any, **kwargs: Any) -> pd.DataFrame:
        raise AssertionError("the report read the per-day table back from the store")

    monkeypatch.setattr(ReportStore, "read_sensitivity", read_back)
    result = run(flow, tmp_path, tickers=["AAPL", "KO"])
    page = Path(result["paths"]["report"]).read_text(encoding="utf-8")
    assert page.count('data-chart="sensitivity"') == 2


def test_flow_fetch_subflow_leaves_heartbeats_to_the_parent_run(  # type: ignore[no-untyped-def]
    flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch-universe subflow runs without heartbeats of its own (Prefect joins a run's
    heartbeat thread at its end, a second's wait), and the run keeps its own around it."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    module = flow.fn.__globals__
    seen: dict[str, Any] = {}

    def spy(name: str) -> Any:
        original = module[name]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = get_current_settings().flows.heartbeat_frequency
            return original(*args, **kwargs)

        return wrapper

    for name in ("_fetch_all", "fit_universe_with_history"):
        monkeypatch.setitem(module, name, spy(name))
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        result = run(flow, tmp_path, tickers=["KO"])
        assert get_current_settings().flows.heartbeat_frequency == 30
    assert result["failures"] == {}
    assert seen == {"_fetch_all": None, "fit_universe_with_history": 30}


def test_flow_runs_end_without_joining_their_heartbeat_thread(  # type: ignore[no-untyped-def]
    flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with heartbeats leaves Prefect's heartbeat context without joining its thread
    (which sleeps in one-second steps: up to a second idle at the end of every run); the
    heartbeats themselves are Prefect's own."""
    import contextlib

    from prefect import flow_engine
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    installed = flow_engine._send_heartbeats
    prefects = installed.prefects  # loading the flow installed it
    joins: list[bool] = []

    @contextlib.contextmanager
    def recording(engine: Any, join_on_exit: bool = True) -> Any:
        joins.append(join_on_exit)
        with prefects(engine, join_on_exit=join_on_exit):
            yield

    monkeypatch.setattr(flow_engine, "_send_heartbeats", recording)
    install = flow.fn.__globals__["heartbeats_without_join"]
    assert install() is True
    assert install() is True  # once only
    assert flow_engine._send_heartbeats.prefects is recording
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        result = run(flow, tmp_path, tickers=["KO"])
    assert result["failures"] == {}
    assert joins == [False, False]  # the run's and its fetch subflow's (which sends none)


def test_heartbeats_are_left_alone_by_a_prefect_without_the_hook(  # type: ignore[no-untyped-def]
    flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow_engine

    install = flow.fn.__globals__["heartbeats_without_join"]

    def other(engine: Any) -> Any:  # no join_on_exit parameter
        raise AssertionError("not called")

    monkeypatch.setattr(flow_engine, "_send_heartbeats", other)
    assert install() is False
    assert flow_engine._send_heartbeats is other
    monkeypatch.delattr(flow_engine, "_send_heartbeats")
    assert install() is False


def test_flow_last_row_matches_statsmodels(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(flow, tmp_path, tickers=["KO"])
    table = pd.read_parquet(tmp_path / "reports" / "sensitivity")
    last = table.iloc[-1]
    prices = {
        s: pd.read_parquet(SAMPLE / f"{s}.parquet").set_index("date")["adj_close"] for s in ("KO", "^GSPC")
    }
    both = pd.concat(prices, axis=1, join="inner")
    both = both[(both.index >= dt.date(2015, 1, 1)) & (both.index <= dt.date(2016, 12, 30))]
    r = both.pct_change().dropna().iloc[-252:]
    x = r["^GSPC"].to_numpy()
    ols = sm.OLS(r["KO"].to_numpy(), np.column_stack([np.ones_like(x), x, x * x])).fit()
    np.testing.assert_allclose([last["alpha"], last["beta"], last["gamma"]], ols.params, rtol=1e-8)
    g = np.array([0.0, 1.0, 2.0 * x[-1]])
    np.testing.assert_allclose(last["sensitivity"], g @ ols.params, rtol=1e-8)
    np.testing.assert_allclose(last["sensitivity_se"], np.sqrt(g @ ols.cov_params() @ g), rtol=1e-8)
    np.testing.assert_allclose(last["r2"], ols.rsquared, rtol=1e-8)


def test_flow_rerun_gives_identical_tables(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(flow, tmp_path, tickers=["AAPL"])
    first = pd.read_parquet(tmp_path / "reports" / "sensitivity")
    prices_before = files_in(tmp_path / "prices")
    run(flow, tmp_path, tickers=["AAPL"])
    pd.testing.assert_frame_equal(first, pd.read_parquet(tmp_path / "reports" / "sensitivity"))
    assert files_in(tmp_path / "prices").keys() == prices_before.keys()
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".lock"], "temporary files left behind"


def test_flow_other_combinations_are_kept(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(flow, tmp_path, tickers=["AAPL", "KO"])
    run(flow, tmp_path, tickers=["KO"], window=0, min_obs=10)
    table = pd.read_parquet(tmp_path / "reports" / "sensitivity")
    assert table.groupby(["ticker", "window"]).size().to_dict() == {
        ("AAPL", 252): 503,
        ("KO", 0): 503,
        ("KO", 252): 503,
    }
    full = table[table["window"] == 0]
    assert full["beta"].nunique() == 1  # one fit over the whole range, used for every day


def test_flow_partial_failure_writes_the_rest(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PartialRunError, match=r"ZZZZ: .*") as info:
        run(flow, tmp_path, tickers=["KO", "ZZZZ"])
    assert list(info.value.failures) == ["ZZZZ"]
    table = pd.read_parquet(tmp_path / "reports" / "sensitivity")
    assert set(table["ticker"]) == {"KO"}
    manifest = json.loads((tmp_path / "reports" / "daily" / "2016-12-30" / "manifest.json").read_text())
    assert "ZZZZ" in manifest["failures"]


def test_flow_bad_parameter_fails_before_any_work(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"model\.window must be >= 0, got -5"):
        run(flow, tmp_path, window=-5)
    assert not any(tmp_path.iterdir())


def test_flow_index_failure_fails_the_run(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception, match=r"\^NOPE"):
        run(flow, tmp_path, index="^NOPE")
    assert not (tmp_path / "reports").exists()


def _write_csv(frame: pd.DataFrame, path: Path, *, adj: bool = True) -> None:
    out = pd.DataFrame(
        {
            "Date": pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d"),
            "Open": frame["open"],
            "High": frame["high"],
            "Low": frame["low"],
            "Close": frame["close"],
            "Adj Close": frame["adj_close"],
            "Volume": frame["volume"].astype("int64"),
        }
    )
    if not adj:
        out = out.drop(columns="Adj Close")
    out.to_csv(path, index=False, float_format="%.17g")


def test_flow_files_source_late_listing_and_no_adj_close(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "csv"
    src.mkdir()
    for sym in ("^GSPC", "KO", "MSFT", "SPY"):
        frame = pd.read_parquet(SAMPLE / f"{sym}.parquet")
        if sym == "MSFT":  # lists in the middle of the range
            frame = frame[frame["date"] >= dt.date(2016, 3, 1)]
        _write_csv(frame, src / f"{sym}.csv", adj=sym != "SPY")
    data = tmp_path / "data"
    run(flow, data, tickers=["KO", "MSFT", "SPY"], source="files", source_path=str(src))
    table = pd.read_parquet(data / "reports" / "sensitivity")
    msft = table[table["ticker"] == "MSFT"]
    assert str(msft["date"].min()) > "2016-03-01"
    first_fit = msft.dropna(subset=["beta"]).iloc[0]
    assert first_fit["n_obs"] == 126  # warms up on a growing window after listing
    spy = table[table["ticker"] == "SPY"].set_index("date")["stock_return"]
    close = pd.read_parquet(SAMPLE / "SPY.parquet").set_index("date")["close"]
    expected = (close / close.shift(1) - 1).reindex(spy.index)
    np.testing.assert_allclose(spy.to_numpy(), expected.to_numpy(), rtol=1e-14)  # Close, not Adj Close


def test_flow_excess_returns_robust_errors_and_huber(flow, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """[model] options from the config file: a rate symbol fetched with the others, HAC, Huber."""
    src = tmp_path / "csv"
    src.mkdir()
    for sym in ("^GSPC", "KO", "SPY"):
        _write_csv(pd.read_parquet(SAMPLE / f"{sym}.parquet"), src / f"{sym}.csv")
    rate = pd.read_parquet(SAMPLE / "^GSPC.parquet")
    for c in ("open", "high", "low", "close", "adj_close"):
        rate[c] = 1.25  # percent per year
    _write_csv(rate, src / "^IRX.csv")
    config = tmp_path / "c.toml"
    text = (ROOT / "config" / "sample.toml").read_text()
    text = text.replace(
        "min_obs = 126", 'min_obs = 126\nse = "hac"\nfit = "huber"\nrisk_free_symbol = "^IRX"'
    )
    config.write_text(text)
    data = tmp_path / "data"
    result = run(flow, data, tickers=["KO", "SPY"], source="files", source_path=str(src), config=str(config))
    assert result["failures"] == {}
    table = pd.read_parquet(data / "reports" / "sensitivity")
    assert set(table["se_type"]) == {"hac"}
    np.testing.assert_allclose(table["risk_free_return"], 1.0125 ** (1 / 252) - 1, rtol=1e-11)
    assert table.dropna(subset=["beta"])["huber_beta"].notna().all()
    assert set(pd.read_parquet(data / "reports" / "summary")["fit"]) == {"huber"}
    assert set(pd.read_parquet(data / "reports" / "scenarios")["fit"]) == {"huber"}
    manifest = json.loads((Path(result["paths"]["manifest"])).read_text())
    assert "^IRX" in {f["symbol"] for f in manifest["fetches"]}
    # Without its rate series the run stops before fitting, naming the symbol.
    (src / "^IRX.csv").unlink()
    with pytest.raises(Exception, match=r"\^IRX: the risk-free rate"):
        run(
            flow, tmp_path / "data2", tickers=["KO"], source="files", source_path=str(src), config=str(config)
        )
    assert not (tmp_path / "data2" / "reports").exists()


def test_flow_local_fetch_in_worker_processes_gives_the_same_store(  # type: ignore[no-untyped-def]
    flow, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The local batches run in worker processes (``runtime.fetch_processes = 2``, for a
    universe that "auto" would fetch in threads): the store and the tables are those of the
    run in the task threads (``fetch_processes = 0``), a failed symbol is reported the same
    way, and the workers' log records reach this process's loggers."""
    src = tmp_path / "csv"
    src.mkdir()
    for sym in ("^GSPC", "KO", "MSFT", "SPY", "AAPL"):
        frame = pd.read_parquet(SAMPLE / f"{sym}.parquet")
        if sym == "AAPL":  # a row without any price: dropped by the files source, logged
            frame.loc[frame.index[40], ["open", "high", "low", "close", "adj_close"]] = np.nan
        _write_csv(frame, src / f"{sym}.csv")
    tickers = ["KO", "MSFT", "SPY", "AAPL", "NOFILE"]
    caplog.set_level(logging.INFO, logger="sensitivity")
    results = {}
    for mode, processes in (("threads", "0"), ("processes", "2")):
        config = tmp_path / f"{mode}.toml"  # two at once: three batches of two symbols
        text = (ROOT / "config" / "sample.toml").read_text().replace('kind = "sample"', "concurrency = 2")
        config.write_text(f"{text}\n[runtime]\nfetch_processes = {processes}\n")
        caplog.clear()
        with pytest.raises(PartialRunError, match="NOFILE"):
            run(
                flow,
                tmp_path / mode,
                tickers=tickers,
                source="files",
                source_path=str(src),
                config=str(config),
            )
        pids = {
            r.process
            for r in caplog.records
            if r.name.startswith("sensitivity.") and "fetch" in r.getMessage()
        }
        quality = {
            r.process for r in caplog.records if "dropped 1 row(s) without any price" in r.getMessage()
        }
        results[mode] = (pids, quality)
    assert results["threads"][0] == {os.getpid()}
    assert results["processes"][0], "no fetch record came back from the workers"
    assert os.getpid() not in results["processes"][0]
    # The files source's own record of the dropped row, from the process that read the file.
    assert results["threads"][1] == {os.getpid()}
    assert len(results["processes"][1]) == 1
    assert results["processes"][1] <= results["processes"][0]
    for what in ("prices", "reports/sensitivity", "reports/summary"):
        left = files_in(tmp_path / "threads" / what)
        right = files_in(tmp_path / "processes" / what)
        assert left.keys() == right.keys()
    for name in ("sensitivity", "summary"):
        a = pd.read_parquet(tmp_path / "threads" / "reports" / name)
        b = pd.read_parquet(tmp_path / "processes" / "reports" / name)
        pd.testing.assert_frame_equal(a, b)
    for mode in results:
        manifest = json.loads(
            next((tmp_path / mode / "reports" / "daily").rglob("manifest.json")).read_text()
        )
        assert list(manifest["failures"]) == ["NOFILE"]


def _flow_module():  # type: ignore[no-untyped-def]
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("flows_pipeline_batches", ROOT / "flows" / "pipeline.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_flow_commits_the_fetch_a_head_start_prepared(  # type: ignore[no-untyped-def]
    flow, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As `sensitivity run` does: worker processes prepare the fetch before the flow starts
    (sensitivity.head_start); the flow's fetch tasks commit it in this process, and the store,
    the tables and the failures are those of a run without a head start."""
    from sensitivity import head_start
    from sensitivity.config import load_config

    src = tmp_path / "csv"
    src.mkdir()
    for sym in ("^GSPC", "KO", "MSFT", "SPY"):
        _write_csv(pd.read_parquet(SAMPLE / f"{sym}.parquet"), src / f"{sym}.csv")
    (src / "BAD.csv").write_text("Date,Close\n2016-01-04,-3\n")  # refused: the task says why
    tickers = ["KO", "MSFT", "SPY", "BAD"]
    text = (ROOT / "config" / "sample.toml").read_text().replace('kind = "sample"', "concurrency = 2")
    caplog.set_level(logging.INFO, logger="sensitivity")
    for mode, switch in (("plain", "false"), ("head-start", "true")):
        config = tmp_path / f"{mode}.toml"
        config.write_text(f"{text}\n[runtime]\nfetch_processes = 2\nfetch_head_start = {switch}\n")
        params = {
            "tickers": tickers,
            "start": dt.date(2015, 1, 1),
            "end": dt.date(2016, 12, 30),
            "source": "files",
            "source_path": str(src),
            "data_dir": str(tmp_path / mode),
        }
        started = head_start.start(load_config(str(config), params))  # what the CLI loads
        assert started == (mode == "head-start")
        caplog.clear()
        try:
            with pytest.raises(PartialRunError, match="BAD"):
                flow(config=str(config), **params)
        finally:
            head_start.finish()
        if mode == "head-start":

            def processes(text: str) -> set[int | None]:
                return {
                    r.process
                    for r in caplog.records
                    if text in r.getMessage() and not r.getMessage().startswith("BAD")
                }

            plans = processes(": full fetch 2015-01-01 to 2016-12-30: ")
            assert plans
            assert os.getpid() not in plans
            assert processes(" changed), ") == {os.getpid()}  # ... committed by the flow's tasks
            # BAD was not prepared: the task fetched it itself, and said why it failed.
            assert {r.process for r in caplog.records if r.getMessage().startswith("BAD: full")} == {
                os.getpid()
            }
    for what in ("prices", "reports/sensitivity", "reports/summary"):
        assert files_in(tmp_path / "plain" / what).keys() == files_in(tmp_path / "head-start" / what).keys()
    for name in ("sensitivity", "summary"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "plain" / "reports" / name),
            pd.read_parquet(tmp_path / "head-start" / "reports" / name),
        )
    prices = [
        pd.read_parquet(tmp_path / m / "prices").drop(columns="fetched_at") for m in ("plain", "head-start")
    ]
    pd.testing.assert_frame_equal(*prices)
    manifests = [
        json.loads(next((tmp_path / m / "reports" / "daily").rglob("manifest.json")).read_text())
        for m in ("plain", "head-start")
    ]
    assert manifests[0]["failures"] == manifests[1]["failures"]
    assert list(manifests[0]["failures"]) == ["BAD"]
    assert [{k: v for k, v in f.items() if k != "seconds"} for f in manifests[0]["fetches"]] == [
        {k: v for k, v in f.items() if k != "seconds"} for f in manifests[1]["fetches"]
    ]
    assert not [p for p in (tmp_path / "head-start" / "prices").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("kind", "n", "concurrency", "sizes"),
    [
        ("yahoo", 5, 4, [1, 1, 1, 1, 1]),
        ("sample", 5, 4, [1, 1, 1, 1, 1]),
        ("sample", 20, 4, [3, 3, 3, 3, 3, 3, 2]),
        ("files", 501, 4, [63] * 7 + [60]),
        ("files", 2000, 1, [128] * 15 + [80]),
        ("files", 0, 4, []),
    ],
)
def test_fetch_batches_split_local_sources_and_keep_yahoo_per_symbol(
    kind: str, n: int, concurrency: int, sizes: list[int], tmp_path: Path
) -> None:
    from sensitivity.config import load_config

    module = _flow_module()
    symbols = [f"S{i:04d}" for i in range(n)]
    cfg = load_config(
        ROOT / "config" / "sample.toml",
        {"source": kind, "source_path": str(tmp_path) if kind == "files" else None},
    )
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"concurrency": concurrency})})
    batches = module.fetch_batches(cfg, symbols)
    assert [len(b) for b in batches] == sizes
    assert [s for b in batches for s in b] == symbols  # every symbol once, in order


@pytest.mark.parametrize(
    ("kind", "n", "runner", "processes", "cpus", "expected"),
    [
        ("files", 501, "threads", "auto", 2, 2),  # one per CPU ...
        ("files", 501, "threads", "auto", 16, 4),  # ... up to source.concurrency
        ("files", 501, "threads", "auto", 1, 0),  # one CPU: the task threads
        ("files", 40, "threads", "auto", 2, 0),  # too few symbols to pay for the start
        ("files", 40, "threads", 3, 2, 3),  # asked for: as many as asked
        ("files", 6, "threads", 8, 2, 3),  # never more than there are batches
        ("files", 501, "threads", 0, 2, 0),  # 0: none
        ("files", 501, "dask", "auto", 2, 0),  # Dask has its own processes
        ("yahoo", 501, "threads", 4, 2, 0),  # Yahoo: a task per symbol on threads
    ],
)
def test_fetch_workers_follow_runtime_fetch_processes(
    kind: str,
    n: int,
    runner: str,
    processes: Any,
    cpus: int,
    expected: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sensitivity.plan
    from sensitivity.config import load_config

    module = _flow_module()
    monkeypatch.setattr(sensitivity.plan, "available_cpus", lambda: cpus)
    cfg = load_config(
        ROOT / "config" / "sample.toml",
        {"source": kind, "source_path": str(tmp_path) if kind == "files" else None},
    )
    cfg = cfg.model_copy(
        update={
            "source": cfg.source.model_copy(update={"concurrency": 4 if n > 6 else 2}),
            "runtime": cfg.runtime.model_copy(update={"task_runner": runner, "fetch_processes": processes}),
        }
    )
    batches = module.fetch_batches(cfg, [f"S{i:04d}" for i in range(n)])
    pool = module.fetch_workers(cfg, batches)
    try:
        assert (pool.processes if pool is not None else 0) == expected
    finally:
        if pool is not None:
            pool.close()


def test_a_batch_logs_its_symbols_lines_as_one_record(
    flow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Each log record goes to Prefect's API and its database: a batch of a local source logs
    one record holding every symbol's line, not one record per symbol."""
    infos: list[str] = []

    class Logger:
        def info(self, msg: str, *args: Any) -> None:
            infos.append(msg % args)

        def warning(self, msg: str, *args: Any) -> None:
            pass

        error = warning

    monkeypatch.setitem(flow.fn.__globals__, "get_run_logger", Logger)
    tickers = ["AAPL", "MSFT", "INTC", "JPM", "GS", "XOM", "JNJ", "PG", "KO", "WMT"]
    result = run(flow, tmp_path, tickers=tickers)  # more symbols than fetch tasks: batches
    assert result["failures"] == {}
    batches = [m for m in infos if "symbol(s) fetched:" in m]
    lines = [line for m in batches for line in m.splitlines()[1:]]
    assert sorted(line.split(":")[0] for line in lines) == sorted([*tickers, "^GSPC"])
    assert len(batches) < len(lines)  # fewer records than symbols
    assert not any(m.split(":")[0] in tickers for m in infos)  # no line on its own
