"""Soak: 20 consecutive runs against the Yahoo stub with faults injected at random on 20% of calls.

Every chart request the stub receives (price requests and yfinance's timezone probes) draws,
from a seeded stream per symbol, either a normal answer (80%) or one fault (20%): HTTP 429,
500 or 503, a timeout, truncated JSON, a connection reset, an HTML error page, a 404 or an
answer for another symbol.  Each run is the real command line (in this process, on the
session's Prefect harness, with ``retries = 3`` and no delay between attempts) and must end
with exit status 0, or 3 with one ``error: SYMBOL: ...`` line per failed symbol; after each
run no temporary file is left and every stored file reads.  At the end the store (prices
without their ``fetched_at``/``source`` provenance, their fetched coverage) and the report
tables (per-day, summary, scenarios) must equal those of one clean run, and the daily report
of the same ``as_of`` must exist.  See docs/reliability.md.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from yahoo_stub import Fault, YahooStub, answer_as

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))

import battery

pytestmark = [
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings(
        "ignore:The inplace keyword:DeprecationWarning", "ignore::pandas.errors.Pandas4Warning"
    ),
]

RUNS = 20
FAULT_RATE = 0.2
SEED = 20_251_125
SYMBOLS = ("^GSPC", "KO", "MSFT", "XOM")
TICKERS = SYMBOLS[1:]

#: The faults drawn (each equally likely when a request draws a fault).
MENU: tuple[Fault, ...] = (
    Fault(status=429),
    Fault(status=500),
    Fault(status=503),
    Fault(delay_s=0.5),  # past the 0.3 s timeout
    Fault(truncate_at=90),
    Fault(reset=True),
    Fault(body=b"<html><body>502 Bad Gateway</body></html>"),
    Fault(status=404),
    Fault(edit=answer_as("OTHER")),
)

#: Stub answers queued per symbol: far more than 20 runs can consume.
QUEUE = 600


def fault_stream(symbol: str) -> list[Fault]:
    """The seeded sequence of answers for ``symbol``'s chart requests: ``Fault()`` is a normal one."""
    rng = random.Random(f"{SEED}:{symbol}")
    return [rng.choice(MENU) if rng.random() < FAULT_RATE else Fault() for _ in range(QUEUE)]


def frames() -> dict[str, pd.DataFrame]:
    return {symbol: battery.price_frame(seed + 10) for seed, symbol in enumerate(SYMBOLS)}


def soak_config(path: Path) -> Path:
    source = {
        "kind": "yahoo",
        "retries": 3,
        "retry_delay_s": 0,
        "timeout_s": 0.3,
        "requests_per_second": 1000,
        "concurrency": 4,
    }
    path.write_text(battery.config_text(source, tickers=TICKERS))
    return path


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The battery's settings: one-line HTML instead of the charts, Prefect's console quiet, no
    flow-run heartbeats (all undone afterwards)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    import sensitivity.report

    monkeypatch.setattr(sensitivity.report, "render_report", battery.quick_render)
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.mark.usefixtures("quick")
def test_soak_twenty_runs_with_random_faults_end_like_one_clean_run(
    yahoo_env: YahooStub, network_guard: list[str], tmp_path: Path
) -> None:
    stub = yahoo_env
    for symbol, frame in frames().items():
        stub.add_frame(symbol, frame)
    config = soak_config(tmp_path / "soak.toml")

    clean_dir = tmp_path / "clean"
    battery.assert_succeeded(battery.run(config, clean_dir))
    clean = battery.tables(clean_dir)

    for symbol in SYMBOLS:
        stub.inject(symbol, *fault_stream(symbol))
    data = tmp_path / "soak"
    statuses: list[int] = []
    for i in range(RUNS):
        outcome = battery.run(config, data)
        statuses.append(outcome.exit_code)
        assert outcome.exit_code in (0, 3), (i, outcome.exit_code, outcome.stderr)
        assert "Traceback" not in outcome.stderr
        if outcome.exit_code == 3:
            assert outcome.errors, outcome.stderr
            for line in outcome.errors:
                assert line.split(":")[1].strip() in SYMBOLS, line  # names the failed symbol
        assert battery.temp_files(data) == [], i
        if (data / "prices").exists():
            battery.tables(data)  # every stored file reads

    consumed = {s: QUEUE - len(stub.pending_faults(s)) for s in SYMBOLS}
    injected = sum(sum(1 for f in fault_stream(s)[: consumed[s]] if f != Fault()) for s in SYMBOLS)
    assert injected >= 10, consumed  # the faults really happened
    assert 0 in statuses  # and runs still got through

    battery.assert_same_tables(clean, battery.tables(data))
    as_of = clean["summary"]["as_of"].max().isoformat()
    for folder in (clean_dir, data):
        report = folder / "reports" / "daily" / as_of
        assert (report / "report.html").is_file()
        manifest = json.loads((report / "manifest.json").read_text())
        assert manifest["as_of"] == as_of
    assert np.isfinite(clean["sensitivity"]["sensitivity"].dropna()).all()
    assert network_guard == []
    print(f"soak: exit statuses {statuses}; requests per symbol {consumed}; {injected} faults injected")
