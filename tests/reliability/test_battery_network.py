"""Battery, part 3: what Yahoo and the network can do, through real yfinance against the local stub.

Every case starts from a copy of a store holding one clean run fetched from the stub, scripts
faults on the next run's chart requests, runs ``sensitivity run`` (in this process, the real
Prefect flow with ``retries = 2`` and no delay between attempts) and checks: transient faults
are survived (the tables equal the clean ones), the others fail only their symbol with one
``error:`` line, the failed symbol's stored files are byte-identical, and nothing but
127.0.0.1 was contacted.
"""

from __future__ import annotations

import socket
from pathlib import Path

import battery
import pytest
from conftest import Universe, _no_heartbeats, _patch
from yahoo_stub import Fault, YahooStub, answer_as

from sensitivity.sources.yahoo import BASE_URL_ENV, set_yfinance_cache_dir, yfinance_cache_dir

pytestmark = [
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings(
        "ignore:The inplace keyword:DeprecationWarning", "ignore::pandas.errors.Pandas4Warning"
    ),
]

H = "history"  # faults on the price request (not yfinance's timezone probe)


def _serve(stub: YahooStub) -> None:
    for symbol, frame in battery.universe_frames().items():
        stub.add_frame(symbol, frame)


@pytest.fixture(scope="module")
def yahoo_baseline(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Universe:
    """One clean run fetched from a stub of Yahoo (once per module)."""
    root = tmp_path_factory.mktemp("yahoo-baseline")
    config = battery.yahoo_config(root / "yahoo.toml")
    previous_cache = yfinance_cache_dir()
    with YahooStub() as stub, pytest.MonkeyPatch.context() as mp, _no_heartbeats():
        _patch(mp)
        mp.setenv(BASE_URL_ENV, stub.base_url)
        set_yfinance_cache_dir(root / "yfinance-cache")
        try:
            _serve(stub)
            outcome = battery.run(config, root / "data")
        finally:
            set_yfinance_cache_dir(previous_cache)
    battery.assert_succeeded(outcome)
    return Universe(root / "unused", root / "data", config)


@pytest.fixture
def stub(yahoo_env: YahooStub) -> YahooStub:
    """The stub (fresh for each test) serving the battery's prices; yfinance pointed at it."""
    _serve(yahoo_env)
    return yahoo_env


@pytest.fixture
def data(yahoo_baseline: Universe, tmp_path: Path) -> Path:
    return battery.copy_tree(yahoo_baseline.data, tmp_path / "data")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return battery.yahoo_config(tmp_path / "yahoo.toml")


#: Faults a retry gets past (``retries = 2``): the run succeeds and equals the clean one.
SURVIVED = [
    ("429-burst", [Fault(status=429, on=H)] * 2),
    ("503-once", [Fault(status=503, on=H)]),
    ("timeout-once", [Fault(delay_s=1.0, on=H)]),
    ("truncated-json-once", [Fault(truncate_at=120, on=H)]),
    ("connection-reset-once", [Fault(reset=True, on=H)]),
]


@pytest.mark.parametrize("faults", [pytest.param(f, id=i) for i, f in SURVIVED])
def test_transient_fault_is_retried_and_survived(
    stub: YahooStub, network_guard: list[str], data: Path, config: Path, faults: list[Fault]
) -> None:
    clean = battery.tables(data)
    stub.inject("KO", *faults)
    battery.assert_succeeded(battery.run(config, data))
    assert stub.pending_faults("KO") == []
    battery.assert_same_tables(clean, battery.tables(data))
    assert network_guard == []


#: Faults that outlast the retries (or are never retried): KO fails, MSFT is written.
FAILED = [
    ("429-persistent", [Fault(status=429, on=H)] * 8, r"Yahoo is rate limiting requests \(HTTP 429"),
    (
        "500-persistent",
        [Fault(status=500, on=H)] * 8,
        r"Yahoo answered with a server error \(HTTP 500\); retry later",
    ),
    (
        "timeout-persistent",
        [Fault(delay_s=1.0, on=H)] * 8,
        r"Yahoo did not answer within 0\.5 s \(ReadTimeout\)",
    ),
    (
        "truncated-json-persistent",
        [Fault(truncate_at=120, on=H)] * 8,
        r"Yahoo sent a malformed \(truncated or non-JSON\) response",
    ),
    ("connection-reset-persistent", [Fault(reset=True, on=H)] * 8, r"cannot reach Yahoo \(ConnectionError"),
    (
        "html-error-page",
        [Fault(body=b"<html><body>502 Bad Gateway</body></html>", on=H)] * 8,
        r"Yahoo sent a malformed \(truncated or non-JSON\) response",
    ),
    (
        "wrong-symbol",
        [Fault(edit=answer_as("MSFT"), on=H)],
        r"Yahoo answered with prices for MSFT, not KO \(the symbol may have been renamed",
    ),
]


@pytest.mark.parametrize(("faults", "pattern"), [pytest.param(f, p, id=i) for i, f, p in FAILED])
def test_lasting_fault_fails_only_its_symbol(
    stub: YahooStub, network_guard: list[str], data: Path, config: Path, faults: list[Fault], pattern: str
) -> None:
    before = battery.checksums(data)
    stub.inject("KO", *faults)
    outcome = battery.run(config, data)
    battery.assert_refused(outcome, 3, rf"^error: KO: {pattern}")
    assert battery.files_of("KO", battery.checksums(data)) == battery.files_of("KO", before)
    assert "MSFT" in outcome.stdout
    assert battery.temp_files(data) == []
    assert network_guard == []


def test_wrong_symbol_is_not_retried(stub: YahooStub, data: Path, config: Path) -> None:
    stub.inject("KO", Fault(edit=answer_as("MSFT"), on=H))
    stub.clear_requests()
    battery.assert_refused(battery.run(config, data), 3, r"^error: KO: Yahoo answered with prices for MSFT")
    assert len(stub.chart_requests("KO", H)) == 1


def test_unknown_ticker_404_is_named_and_the_others_are_written(
    stub: YahooStub, network_guard: list[str], data: Path, config: Path
) -> None:
    outcome = battery.run(config, data, "--tickers", "KO,ZZZZ")
    battery.assert_refused(
        outcome,
        3,
        r"^error: ZZZZ: Yahoo has no prices for this symbol \(check the ticker: it may be misspelt",
    )
    assert not (data / "prices" / "ZZZZ.parquet").exists()
    assert "KO" in outcome.stdout
    assert network_guard == []


def test_unknown_index_404_fails_the_run_before_any_report(stub: YahooStub, data: Path, config: Path) -> None:
    before = battery.checksums(data)
    outcome = battery.run(config, data, "--index", "^NOPE")
    battery.assert_refused(
        outcome, 3, r"^error: \^NOPE: the index could not be fetched: Yahoo has no prices for this symbol"
    )
    after = battery.checksums(data)
    assert {k: v for k, v in after.items() if k.startswith("reports/")} == {
        k: v for k, v in before.items() if k.startswith("reports/")
    }
    assert not (data / "prices" / "^NOPE.parquet").exists()


def test_index_server_errors_fail_the_run_and_touch_no_report(
    stub: YahooStub, data: Path, config: Path
) -> None:
    before = battery.checksums(data)
    stub.inject("^GSPC", *[Fault(status=500, on=H)] * 8)
    outcome = battery.run(config, data)
    battery.assert_refused(
        outcome, 3, r"^error: \^GSPC: the index could not be fetched: Yahoo answered with a server error"
    )
    after = battery.checksums(data)
    untouched = {k for k in before if not k.startswith("prices/") or k == "prices/^GSPC.parquet"}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}


def test_network_down_changes_nothing(
    yahoo_env: YahooStub, data: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{port}")  # nothing listens there
    before = battery.checksums(data)
    outcome = battery.run(config, data)
    battery.assert_refused(outcome, 3, r"^error: \^GSPC: the index could not be fetched: cannot reach Yahoo")
    assert battery.checksums(data) == before
