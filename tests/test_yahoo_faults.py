"""Every fault Yahoo or the network can throw, through real yfinance against the local stub:
the error that surfaces, the store left untouched, the retry policy, the other symbols
processed, and a later run recovering by itself.  Then the same through the fetch-universe
subflow, the whole stock-sensitivity flow and the real CLI."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from yahoo_stub import Fault, YahooStub, answer_as, duplicate_bar, null_bar, scale_bar, with_dividend

from sensitivity.config import Config
from sensitivity.errors import (
    EmptyDataError,
    NetworkError,
    PartialRunError,
    RateLimitError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.pipeline import fetch_symbol
from sensitivity.sources.ratelimit import TokenBucket, request_bucket, set_request_rate
from sensitivity.sources.sample import SampleSource
from sensitivity.sources.yahoo import BASE_URL_ENV, YahooSource  # at import: yfinance's warning filters
from sensitivity.store import PriceStore

pytestmark = pytest.mark.filterwarnings(
    "ignore:The inplace keyword:DeprecationWarning",
    "ignore:The inplace keyword:FutureWarning",
    "ignore::pandas.errors.Pandas4Warning",
)

ROOT = Path(__file__).resolve().parents[1]
D = dt.date
START, DAY1, DAY2 = D(2019, 1, 2), D(2019, 2, 14), D(2019, 2, 15)  # the sample ends 2019-02-22


def prices(start: str, periods: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idx = pd.DatetimeIndex(pd.bdate_range(start, periods=periods).as_unit("ns"), freq=None, name="date")
    close = 80.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, periods)))
    return pd.DataFrame(
        {
            "open": close,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "adj_close": close * 0.97,
            "volume": rng.integers(1_000, 9_000, periods).astype(np.float64),
            "dividends": np.zeros(periods),
            "splits": np.zeros(periods),
        },
        index=idx,
    )


def cfg(data: Path, start: dt.date, end: dt.date, tickers: list[str] | None = None, **source: Any) -> Config:
    base = {"kind": "yahoo", "requests_per_second": 1000.0, "timeout_s": 1.0, "retry_delay_s": 0.01}
    return Config.model_validate(
        {
            "universe": {"index": "^GSPC", "tickers": tickers or ["ACME"], "start": start, "end": end},
            "source": {**base, **source},
            "model": {"window": 20, "min_obs": 10},
            "output": {"data_dir": str(data)},
        }
    )


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- what surfaces, source by source -----------------------------------------------------------------


FAULTS = [
    pytest.param(
        [Fault(status=429)] * 2, RateLimitError, True, r"rate limiting requests \(HTTP 429", id="429-burst"
    ),
    pytest.param(
        [Fault(status=503)] * 2, NetworkError, True, r"server error \(HTTP 503\); retry later", id="503s"
    ),
    pytest.param([Fault(delay_s=1.6)], NetworkError, True, r"did not answer within 1 s", id="timeout"),
    pytest.param(
        [Fault(truncate_at=200)], SourceError, True, r"malformed \(truncated or non-JSON\)", id="truncated"
    ),
    pytest.param([Fault(body=b"{not json")], SourceError, True, r"malformed", id="not-json"),
    pytest.param(
        [Fault(body=b"<html>Will be right back</html>")],
        NetworkError,
        True,
        r"Yahoo Finance is down",
        id="down-page",
    ),
    pytest.param([Fault(reset=True)], NetworkError, True, r"cannot reach Yahoo", id="connection-reset"),
    pytest.param(
        [Fault(edit=answer_as("MSFT"))],
        SourceError,
        False,
        r"Yahoo answered with prices for MSFT, not ACME \(the symbol may have been renamed",
        id="wrong-symbol",
    ),
    pytest.param(
        [Fault(edit=lambda b: null_bar(0)(null_bar(1)(null_bar(2)(b))))],
        EmptyDataError,
        False,
        r"Yahoo has no prices between 2019-01-02 and 2019-01-04 \(it sent 3 row\(s\), none usable",
        id="all-nan",
    ),
]


@pytest.mark.parametrize(("faults", "error", "retryable", "message"), FAULTS)
def test_fault_surfaces_as_the_projects_error_and_the_store_is_untouched(
    yahoo_env: YahooStub,
    network_guard: list[str],
    tmp_path: Path,
    faults: list[Fault],
    error: type[SourceError],
    retryable: bool,
    message: str,
) -> None:
    history = prices("2019-01-02", 3)
    yahoo_env.add_frame("ACME", history)
    config = cfg(tmp_path, D(2019, 1, 2), D(2019, 1, 4))
    fetch_symbol(config, "ACME", source=YahooSource(timeout_s=1.0))
    path = PriceStore(tmp_path).path_for("ACME")
    before = checksum(path)
    yahoo_env.inject("ACME", *(Fault(**{**f.__dict__, "on": "history"}) for f in faults))
    with pytest.raises(error, match=rf"^ACME: .*{message}") as info:
        fetch_symbol(config, "ACME", source=YahooSource(timeout_s=1.0))
    assert type(info.value) is error
    assert info.value.retryable is retryable
    assert info.value.symbol == "ACME"
    assert "\n" not in str(info.value)
    assert checksum(path) == before
    assert yahoo_env.pending_faults("ACME") == []
    again = fetch_symbol(config, "ACME", source=YahooSource(timeout_s=1.0))  # recovers by itself
    assert (again.mode, again.rows_fetched) == ("incremental", 3)
    assert network_guard == []


def test_network_down_is_a_retryable_network_error(
    yahoo_env: YahooStub, network_guard: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(
        NetworkError, match=r"^ACME: cannot reach Yahoo \(.*\); check the network connection"
    ) as info:
        YahooSource(timeout_s=1.0).fetch("ACME", D(2019, 1, 2), D(2019, 1, 4))
    assert info.value.retryable
    assert network_guard == []


def test_unknown_symbol_and_empty_range(yahoo_env: YahooStub) -> None:
    yahoo_env.add_frame("ACME", prices("2019-01-02", 3))
    source = YahooSource(timeout_s=1.0)
    with pytest.raises(SymbolNotFoundError, match=r"^NOPE: Yahoo has no prices for this symbol") as info:
        source.fetch("NOPE", D(2019, 1, 2), D(2019, 1, 4))
    assert not info.value.retryable
    with pytest.raises(EmptyDataError, match=r"^ACME: Yahoo has no prices between 2019-01-05 and 2019-01-06"):
        source.fetch("ACME", D(2019, 1, 5), D(2019, 1, 6))


def test_bad_bars_are_dropped_and_recorded_through_yfinance(yahoo_env: YahooStub, tmp_path: Path) -> None:
    history = prices("2019-01-02", 10)
    yahoo_env.add_frame("ACME", history)
    yahoo_env.inject(
        "ACME",
        Fault(on="history", edit=lambda b: null_bar(2)(scale_bar(5)(duplicate_bar(7, close_factor=1.5)(b)))),
    )
    out = fetch_symbol(
        cfg(tmp_path, D(2019, 1, 2), D(2019, 1, 15)), "ACME", source=YahooSource(timeout_s=1.0)
    )
    reasons = {r["date"]: r["reason"] for r in out.dropped_rows}
    assert sorted(reasons) == ["2019-01-04", "2019-01-09", "2019-01-11"]
    assert reasons["2019-01-04"].startswith("no price")
    assert "a unit mix-up" in reasons["2019-01-09"]
    assert reasons["2019-01-11"] == "duplicate date: Yahoo sent 2 bars for this date; yfinance kept one"
    back = PriceStore(tmp_path).read("ACME")
    assert back is not None
    expected = history.drop(history.index[[2, 5]])  # the first bar of the duplicated date was kept
    pd.testing.assert_frame_equal(back, expected, check_freq=False)


def test_repair_switch_reaches_yfinance(yahoo_env: YahooStub, monkeypatch: pytest.MonkeyPatch) -> None:
    import yfinance as yf

    seen: dict[str, Any] = {}
    real = yf.Ticker.history

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(self, *args, **{**kwargs, "repair": False})  # the stub serves daily bars only

    monkeypatch.setattr(yf.Ticker, "history", spy)
    yahoo_env.add_frame("ACME", prices("2019-01-02", 5))
    YahooSource(timeout_s=1.0, repair=True).fetch("ACME", D(2019, 1, 2), D(2019, 1, 8))
    assert seen["repair"] is True
    assert seen["keepna"] is True
    assert seen["auto_adjust"] is False


def test_repaired_rows_are_reported() -> None:
    from sensitivity.sources.yahoo import yahoo_prices

    idx = pd.DatetimeIndex(["2021-03-01", "2021-03-02"]).tz_localize("America/New_York")
    raw = pd.DataFrame(
        {
            "Open": [1.0, 2.0],
            "High": [1.0, 2.0],
            "Low": [1.0, 2.0],
            "Close": [1.0, 2.0],
            "Adj Close": [1.0, 2.0],
            "Volume": [10, 10],
            "Dividends": [0.0, 0.0],
            "Stock Splits": [0.0, 0.0],
            "Repaired?": [False, True],
        },
        index=idx,
    )
    got = yahoo_prices(raw, "X", D(2021, 3, 1), D(2021, 3, 2))
    assert [i.to_dict() for i in got.quality.repaired] == [
        {"date": "2021-03-02", "reason": "repaired by yfinance (source.repair = true)"}
    ]


# -- the request rate -----------------------------------------------------------------------------------


def test_token_bucket_spaces_requests_at_the_rate() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(s: float) -> None:
        waits.append(s)
        now[0] += s

    bucket = TokenBucket(2.0, clock=lambda: now[0], sleep=sleep)
    assert bucket.capacity == 2.0
    for _ in range(6):
        bucket.acquire()
    assert waits == pytest.approx([0.5, 0.5, 0.5, 0.5])  # a burst of 2, then one every 0.5 s
    now[0] += 10.0
    bucket.acquire()
    assert len(waits) == 4  # refilled (up to the capacity) while idle
    bucket.set_rate(0.5)
    assert bucket.capacity == 1.0
    with pytest.raises(ValueError, match=r"requests_per_second must be a finite number > 0, got 0"):
        bucket.set_rate(0)


def test_every_yahoo_request_waits_for_the_process_wide_rate(yahoo_env: YahooStub) -> None:
    yahoo_env.add_frame("ACME", prices("2019-01-02", 5))
    YahooSource(timeout_s=1.0).fetch("ACME", D(2019, 1, 2), D(2019, 1, 8))  # cookie, crumb, tz probe
    yahoo_env.clear_requests()
    previous = request_bucket().rate
    try:
        YahooSource(timeout_s=1.0, requests_per_second=10.0)
        assert request_bucket().rate == 10.0
        for _ in range(4):
            YahooSource(timeout_s=1.0).fetch("ACME", D(2019, 1, 2), D(2019, 1, 8))
    finally:
        set_request_rate(previous)
    stamps = [r.at for r in yahoo_env.requests]
    assert len(stamps) >= 4
    # capacity 10 (a burst), so look at the rate over the run: at most 10/s plus the burst
    assert stamps[-1] - stamps[0] >= (len(stamps) - 10) / 10.0 - 0.05


# -- the fetch-universe subflow: retries, no retries, progress -----------------------------------------------


@pytest.fixture(scope="module")
def flows() -> dict[str, Any]:
    from prefect.flows import load_flow_from_entrypoint

    path = ROOT / "flows" / "pipeline.py"
    return {
        name: load_flow_from_entrypoint(f"{path}:{name}") for name in ("fetch_universe", "stock_sensitivity")
    }


@pytest.mark.usefixtures("prefect_harness")
def test_fetch_universe_retries_transient_faults_only_and_reports_progress(
    flows: dict[str, Any], yahoo_env: YahooStub, network_guard: list[str], tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    for i, sym in enumerate(["^GSPC", "BURST", "SLOW", "FLAKY", "RENAMED", "FINE"]):
        yahoo_env.add_frame(sym, prices("2019-01-02", 20, seed=i))
    yahoo_env.inject("BURST", *[Fault(status=429, on="history")] * 3)  # 2 in attempt 1, 1 in attempt 2
    yahoo_env.inject("SLOW", Fault(delay_s=1.6, on="history"))  # past the 1 s timeout, once
    yahoo_env.inject("FLAKY", *[Fault(status=500, on="history")] * 4)  # attempts 1 and 2
    yahoo_env.inject("RENAMED", Fault(edit=answer_as("OTHER"), on="history"))
    direct_probe = len(_probe_requests_of_one_failed_fetch(yahoo_env, "NOPE2"))

    tickers = ["BURST", "SLOW", "FLAKY", "NOPE", "RENAMED", "FINE"]
    config = cfg(tmp_path, D(2019, 1, 2), D(2019, 1, 29), tickers, retries=3, concurrency=3)
    state = flows["fetch_universe"](config, return_state=True)
    fetches, failures = state.result()

    assert sorted(f["symbol"] for f in fetches) == ["BURST", "FINE", "FLAKY", "SLOW", "^GSPC"]
    assert all(f["rows_fetched"] == 20 and f["mode"] == "full" for f in fetches)
    assert sorted(failures) == ["NOPE", "RENAMED"]
    assert failures["NOPE"].startswith("Yahoo has no prices for this symbol (check the ticker")
    assert failures["RENAMED"].startswith("Yahoo answered with prices for OTHER, not RENAMED")
    assert all("\n" not in r for r in failures.values())
    # 429 burst survived: 3 refused requests, then one answered
    assert len(yahoo_env.chart_requests("BURST", "history")) == 4
    assert len(yahoo_env.chart_requests("FLAKY", "history")) == 5
    # never retried: an unknown symbol (one attempt's requests), a body for another symbol
    assert len(yahoo_env.chart_requests("NOPE")) == direct_probe
    assert len(yahoo_env.chart_requests("RENAMED", "history")) == 1
    for sym in ("BURST", "SLOW", "FLAKY", "FINE"):
        assert yahoo_env.pending_faults(sym) == []
    assert sorted(PriceStore(tmp_path).symbols()) == ["BURST", "FINE", "FLAKY", "SLOW", "^GSPC"]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["fetch-progress"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    (artifact,) = artifacts
    assert artifact.type == "progress"
    assert float(artifact.data) == 100.0
    assert artifact.description == "7 of 7 symbol(s) done, 2 failed"
    assert network_guard == []


def _probe_requests_of_one_failed_fetch(stub: YahooStub, symbol: str) -> list[Any]:
    with pytest.raises(SymbolNotFoundError):
        YahooSource(timeout_s=1.0).fetch(symbol, D(2019, 1, 2), D(2019, 1, 29))
    return stub.chart_requests(symbol)


# -- the whole flow ------------------------------------------------------------------------------------


def _config_file(tmp_path: Path, **source: Any) -> Path:
    lines = ["[universe]", 'index = "^GSPC"', 'tickers = ["KO"]', "start = 2019-01-02", "", "[source]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in source.items()]
    lines += ["", "[model]", "window = 40", "min_obs = 20"]
    path = tmp_path / "yahoo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_csv(folder: Path, symbol: str, frame: pd.DataFrame) -> None:
    out = frame.rename(columns={"adj_close": "Adj Close", "splits": "Stock Splits"})
    out = out.rename(columns=str.title)
    out.index = out.index.strftime("%Y-%m-%d").rename("Date")
    out.to_csv(folder / f"{symbol}.csv", float_format="%.17g")


def _sample(symbols: list[str], end: dt.date) -> dict[str, pd.DataFrame]:
    return {s: SampleSource().fetch(s, START, end) for s in symbols}


@pytest.mark.usefixtures("prefect_harness")
def test_flow_yahoo_survives_faults_equals_files_and_updates_incrementally(
    flows: dict[str, Any], yahoo_env: YahooStub, network_guard: list[str], tmp_path: Path
) -> None:
    flow = flows["stock_sensitivity"]
    config = _config_file(tmp_path, requests_per_second=1000, retry_delay_s=0.01, timeout_s=2, concurrency=2)
    symbols = ["^GSPC", "KO", "MSFT", "XOM"]
    day2 = _sample(symbols, DAY2)
    csv = tmp_path / "csv"
    csv.mkdir()
    for sym, frame in day2.items():
        yahoo_env.add_frame(sym, frame.loc[:DAY1])
        _write_csv(csv, sym, frame.loc[:DAY1])
    yahoo_env.inject("KO", *[Fault(status=429, on="history")] * 3)
    yahoo_env.inject("XOM", Fault(status=502, on="history"), Fault(reset=True, on="history"))
    params = {"config": str(config), "tickers": ["KO", "MSFT", "XOM", "ZZZZ"], "end": DAY1}

    with pytest.raises(PartialRunError) as info:
        flow(**params, source="yahoo", data_dir=str(tmp_path / "y"))
    assert info.value.failures == {
        "ZZZZ": "Yahoo has no prices for this symbol (check the ticker: it may be misspelt or delisted)"
    }
    with pytest.raises(PartialRunError):
        flow(**params, source="files", source_path=str(csv), data_dir=str(tmp_path / "f"))
    yahoo_table = pd.read_parquet(tmp_path / "y" / "reports" / "sensitivity")
    files_table = pd.read_parquet(tmp_path / "f" / "reports" / "sensitivity")
    assert set(yahoo_table["ticker"]) == {"KO", "MSFT", "XOM"}
    pd.testing.assert_frame_equal(yahoo_table, files_table, check_exact=True)
    stored = {s: checksum(PriceStore(tmp_path / "y").path_for(s)) for s in symbols}

    # The next day: one new row each, fetched incrementally; a network fault on MSFT leaves
    # its stored prices untouched and the run lists it; the run after that recovers.
    for sym, frame in day2.items():
        yahoo_env.add_frame(sym, frame)
    yahoo_env.inject("MSFT", *[Fault(reset=True, on="history")] * 4)  # each of the 4 attempts
    params = {**params, "tickers": ["KO", "MSFT"], "end": DAY2}
    with pytest.raises(PartialRunError) as info:
        flow(**params, source="yahoo", data_dir=str(tmp_path / "y"))
    assert list(info.value.failures) == ["MSFT"]
    assert info.value.failures["MSFT"].startswith("cannot reach Yahoo (")
    assert checksum(PriceStore(tmp_path / "y").path_for("MSFT")) == stored["MSFT"]
    manifest = json.loads((tmp_path / "y" / "reports" / "daily" / str(DAY2) / "manifest.json").read_text())
    fetches = {f["symbol"]: f for f in manifest["fetches"]}
    assert sorted(fetches) == ["KO", "^GSPC"]
    for f in fetches.values():
        assert (f["mode"], f["rows_fetched"], f["rows_added"], f["restated"]) == ("incremental", 6, 1, False)
        assert (f["fetch_start"], f["fetch_end"]) == ("2019-02-08", str(DAY2))
    assert manifest["failures"]["MSFT"].startswith("cannot reach Yahoo")

    # Later: MSFT recovers by itself, and a dividend restates KO's history: refetched in full.
    yahoo_env.add_frame("KO", with_dividend(day2["KO"], str(DAY2), 0.4))
    result = flow(**params, source="yahoo", data_dir=str(tmp_path / "y"))
    assert result["failures"] == {}
    manifest = json.loads((tmp_path / "y" / "reports" / "daily" / str(DAY2) / "manifest.json").read_text())
    fetches = {f["symbol"]: f for f in manifest["fetches"]}
    assert (fetches["MSFT"]["mode"], fetches["MSFT"]["rows_added"]) == ("incremental", 1)
    assert fetches["KO"]["mode"] == "refetch"
    assert fetches["KO"]["restated"] is True
    # the 5 overlap days are 2019-02-11 .. 02-15: the 4 before the ex-date are re-adjusted
    assert fetches["KO"]["restatement"].startswith("adj close differs on 4 day(s) (first 2019-02-11")
    assert (
        "dividends differs on 1 day(s) (first 2019-02-15: stored 0.0, now 0.4)"
        in fetches["KO"]["restatement"]
    )
    assert (fetches["KO"]["fetch_start"], fetches["KO"]["fetch_end"]) == (str(START), str(DAY2))
    ko = PriceStore(tmp_path / "y").read("KO")
    assert ko is not None
    assert ko.loc[pd.Timestamp(DAY2), "dividends"] == 0.4
    assert network_guard == []


# -- the real CLI in a subprocess --------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_yahoo_run_names_the_bad_symbol_and_survives_a_429_burst(
    yahoo_stub: YahooStub, tmp_path: Path
) -> None:
    for sym, frame in _sample(["^GSPC", "KO"], DAY1).items():
        yahoo_stub.add_frame(sym, frame)
    yahoo_stub.inject("KO", *[Fault(status=429, on="history")] * 2)
    config = _config_file(tmp_path, requests_per_second=1000, retry_delay_s=0.01, timeout_s=5)
    env = {
        **os.environ,
        BASE_URL_ENV: yahoo_stub.base_url,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # yfinance's caches
        "COLUMNS": "160",
    }
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).with_name("sensitivity")
    proc = subprocess.run(
        [
            str(exe),
            "run",
            "--source",
            "yahoo",
            "--config",
            str(config),
            "--tickers",
            "KO,ZZZZ",
            "--end",
            str(DAY1),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: ZZZZ: Yahoo has no prices for this symbol (check the ticker: it may be misspelt or delisted)"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "KO" in proc.stdout
    assert set(pd.read_parquet(tmp_path / "data" / "reports" / "sensitivity")["ticker"]) == {"KO"}
    assert len(yahoo_stub.chart_requests("KO", "history")) == 3  # two refused, then answered
    assert {r.host.rsplit(":", 1)[0] for r in yahoo_stub.requests} == {"127.0.0.1"}


def test_cli_progress_bar_counts_failed_and_restated_symbols() -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress

    from sensitivity import progress
    from sensitivity.cli import _RichReporter

    bar = Progress(console=Console(file=io.StringIO()), disable=True)
    reporter = _RichReporter(bar)
    reporter(progress.ProgressEvent("start", total=3))
    reporter(progress.ProgressEvent("fetch", symbol="A", extra={"mode": "incremental", "restated": False}))
    reporter(progress.ProgressEvent("fetch", symbol="B", extra={"mode": "refetch", "restated": True}))
    reporter(progress.ProgressEvent("fetch", symbol="C", ok=False))
    task = bar.tasks[0]
    assert (task.completed, task.total) == (3, 3)
    assert task.description == "fetching prices (1 failed, 1 restated): C [failed]"


def test_curl_session_keeps_the_price_body_for_the_checks(yahoo_env: YahooStub) -> None:
    """The default session (curl_cffi, used without a base URL) gets the query as ``params``, as
    yfinance passes it; the price request is still recognised and its body kept."""
    from sensitivity.sources import yahoo

    yahoo_env.add_frame("ACME", prices("2019-01-02", 3))
    assert yahoo.YahooCurlSession is not None
    session = yahoo.YahooCurlSession(timeout_s=2.0)
    url = f"{yahoo_env.base_url}/v8/finance/chart/ACME"
    with yahoo._recording() as trace:
        session.get(url, params={"period1": 1, "period2": 2**31, "interval": "1d"})
        session.get(url, params={"range": "1d", "interval": "1d"})
    history, probe = trace
    assert history.is_history
    assert history.url == f"{url}?period1=1&period2=2147483648&interval=1d"
    assert history.body is not None
    assert yahoo.chart_symbol(json.loads(history.body)) == "ACME"
    assert not probe.is_history
    assert probe.body is None
