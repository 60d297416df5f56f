"""The real command line: options, exit statuses and one-line messages."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pandas as pd
import pytest
from typer.testing import CliRunner

from sensitivity import __version__
from sensitivity.cli import CONSOLE_ALL_UP_TO, CONSOLE_ENDS, app, console_rows

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = str(ROOT / "config" / "sample.toml")
runner = CliRunner()


def cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in a subprocess, as a user would."""
    exe = Path(sys.executable).with_name("sensitivity")
    env = {**os.environ, "COLUMNS": "160"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--window", "-5"], r"error: config .*: model\.window must be >= 0, got -5", id="window"
        ),
        pytest.param(["--min-obs", "500"], r"min_obs=500 > window=252", id="min-obs"),
        pytest.param(["--tickers", "AAPL,../etc"], r"'\.\./etc' is not a plausible ticker", id="ticker-path"),
        pytest.param(
            ["--start", "2019-13-01"], r"universe\.start must be a date written YYYY-MM-DD", id="bad-date"
        ),
        pytest.param(["--start", "2019-01-01", "--end", "2018-01-01"], r"is after universe\.end", id="order"),
        pytest.param(["--config", "nope.toml"], r"config file 'nope\.toml' does not exist", id="no-config"),
        pytest.param(["--source", "files"], r"source\.path is required", id="files-no-path"),
    ],
)
def test_run_rejects_bad_input_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    if "--config" not in args:
        args = ["--config", SAMPLE_CONFIG, *args]
    result = runner.invoke(app, ["run", *args, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "d").exists()


def test_run_refuses_a_missing_source_folder_after_starting_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The source's folder is checked once the workers have started (the check imports
    pandas and pyarrow meanwhile): still one line and exit 2 before Prefect starts, nothing
    written, and the head start's and the report's workers stopped without a word."""
    import sensitivity.cli as cli
    import sensitivity.plan as plan
    from sensitivity import head_start, process_pool

    for name, value in {
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        monkeypatch.setenv(name, value)  # what `run` sets with setdefault, undone after the test
    monkeypatch.setattr(plan, "available_cpus", lambda: 2)
    monkeypatch.setattr(cli, "_temporary_server_started_early", None)  # never reached
    started: list[bool] = []
    real_start = head_start.start
    monkeypatch.setattr(
        head_start, "start", lambda cfg, level: started.append(real_start(cfg, level=level)) or started[-1]
    )
    names = ",".join(f"S{i:04d}" for i in range(80))
    args = ["--config", SAMPLE_CONFIG, "--source", "files", "--source-path", str(tmp_path / "nope")]
    result = runner.invoke(app, ["run", *args, "--tickers", names, "--data-dir", str(tmp_path / "d")])
    assert started == [True]  # its workers were preparing the fetch of the missing folder
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(r"source\.path '.*nope' is not a folder", lines[0]), lines[0]
    assert not (tmp_path / "d").exists()
    assert head_start._CURRENT is None
    assert process_pool.spares() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_run_unknown_option_is_a_usage_error() -> None:
    result = runner.invoke(app, ["run", "--windw", "5"])
    assert result.exit_code == 2
    assert "No such option" in result.output


@pytest.mark.slow
def test_run_subprocess_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "out"
    proc = cli(
        "run",
        "--config",
        SAMPLE_CONFIG,
        "--tickers",
        "KO,MSFT",
        "--start",
        "2017-01-01",
        "--data-dir",
        str(data),
        "--verbose",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Stopping temporary server on http://127.0.0.1:") == 1, proc.stderr
    assert "Sensitivity as of 2019-02-22" in proc.stdout
    assert "KO" in proc.stdout
    assert "MSFT" in proc.stdout
    assert str(data / "reports" / "daily" / "2019-02-22" / "report.html") in proc.stdout.replace("\n", "")
    table = pd.read_parquet(data / "reports" / "sensitivity")
    assert set(table["ticker"]) == {"KO", "MSFT"}


@pytest.mark.slow
def test_run_subprocess_failed_symbol_exit_status(tmp_path: Path) -> None:
    proc = cli(
        "run",
        "--config",
        SAMPLE_CONFIG,
        "--tickers",
        "KO,ZZZZ",
        "--start",
        "2018-01-01",
        "--data-dir",
        str(tmp_path),
    )
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: ZZZZ: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(pd.read_parquet(tmp_path / "reports" / "sensitivity")["ticker"]) == {"KO"}


class _FakeServer:
    """Stands in for Prefect's ``SubprocessASGIServer``: records where and when it starts."""

    calls: ClassVar[list[tuple[str, int | None]]] = []
    release = threading.Event()

    def start(self, timeout: int | None = None) -> None:
        _FakeServer.calls.append((threading.current_thread().name, timeout))
        assert _FakeServer.release.wait(10), "the body never ran while the server started"


def _settings(url: str | None) -> SimpleNamespace:
    ephemeral = SimpleNamespace(enabled=True, startup_timeout_seconds=77)
    return SimpleNamespace(api=SimpleNamespace(url=url), server=SimpleNamespace(ephemeral=ephemeral))


def test_the_temporary_server_boots_while_the_flow_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.server.api.server
    import prefect.settings

    from sensitivity import cli as cli_module

    monkeypatch.setattr(prefect.server.api.server, "SubprocessASGIServer", _FakeServer)
    monkeypatch.setattr(_FakeServer, "calls", [])
    monkeypatch.setattr(_FakeServer, "release", threading.Event())
    monkeypatch.setattr(prefect.settings, "get_current_settings", lambda: _settings(None))
    with cli_module._temporary_server_started_early():
        _FakeServer.release.set()  # the body runs while start() still waits: they overlap
    assert _FakeServer.calls == [("prefect-server-start", 77)]

    # Against a configured server (PREFECT_API_URL, as deployments run) nothing is started.
    monkeypatch.setattr(_FakeServer, "calls", [])
    monkeypatch.setattr(
        prefect.settings, "get_current_settings", lambda: _settings("http://127.0.0.1:4200/api")
    )
    with cli_module._temporary_server_started_early():
        pass
    assert _FakeServer.calls == []


def test_heartbeats_are_off_only_on_the_temporary_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing outlives the temporary server to read a heartbeat: off there (Prefect waits for
    the heartbeat thread at the end of each run); on against a configured server."""
    import prefect.settings
    from prefect.settings.context import get_current_settings as real_settings

    from sensitivity import cli as cli_module

    default = real_settings().flows.heartbeat_frequency
    assert default is not None
    monkeypatch.setattr(prefect.settings, "get_current_settings", lambda: _settings(None))
    with cli_module._no_heartbeats_on_a_temporary_server():
        assert real_settings().flows.heartbeat_frequency is None
    assert real_settings().flows.heartbeat_frequency == default
    monkeypatch.setattr(
        prefect.settings, "get_current_settings", lambda: _settings("http://127.0.0.1:4200/api")
    )
    with cli_module._no_heartbeats_on_a_temporary_server():
        assert real_settings().flows.heartbeat_frequency == default


def test_a_failed_early_start_is_left_to_the_flow_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.server.api.server
    import prefect.settings

    from sensitivity import cli as cli_module

    class Broken:
        def start(self, timeout: int | None = None) -> None:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(prefect.server.api.server, "SubprocessASGIServer", Broken)
    monkeypatch.setattr(prefect.settings, "get_current_settings", lambda: _settings(None))
    with cli_module._temporary_server_started_early():
        ran = True
    assert ran  # no exception: the flow run starts (and reports) the server itself


def _rows(values: list[float | None]) -> list[dict[str, object]]:
    return [{"ticker": f"T{i:03d}", "sensitivity": v} for i, v in enumerate(values)]


def test_the_console_table_shows_every_ticker_of_a_small_universe_highest_first() -> None:
    values = [0.5, None, 0.0, -0.3, 1.2]  # 0.0 is a value, not a missing one
    shown, caption = console_rows(_rows(values))
    assert caption is None
    assert [r["sensitivity"] for r in shown if r is not None] == [1.2, 0.5, 0.0, -0.3, None]
    shown, caption = console_rows(_rows([float(i) for i in range(CONSOLE_ALL_UP_TO)]))
    assert caption is None
    assert len(shown) == CONSOLE_ALL_UP_TO
    assert None not in shown


def test_the_console_table_of_a_large_universe_is_short_and_says_what_it_left_out() -> None:
    values: list[float | None] = [float(i) for i in range(497)] + [None] * 7
    shown, caption = console_rows(_rows(values))
    assert len(shown) == 2 * CONSOLE_ENDS + 1
    assert shown[CONSOLE_ENDS] is None  # the gap between the highest and the lowest
    top = [r["sensitivity"] for r in shown[:CONSOLE_ENDS]]
    bottom = [r["sensitivity"] for r in shown[CONSOLE_ENDS + 1 :]]
    assert top == [496.0 - i for i in range(CONSOLE_ENDS)]
    assert bottom == [float(CONSOLE_ENDS - 1 - i) for i in range(CONSOLE_ENDS)]
    assert caption == (
        f"504 tickers; shown: the {CONSOLE_ENDS} highest and the {CONSOLE_ENDS} lowest sensitivities "
        f"({497 - 2 * CONSOLE_ENDS} in between left out); 7 without a sensitivity: "
        "T497, T498, T499, T500, T501 and 2 more. Every ticker is in the summary table and the report."
    )


def test_the_console_table_keeps_every_value_when_most_tickers_have_none() -> None:
    values: list[float | None] = [1.0, 2.0, 3.0] + [None] * 30
    shown, caption = console_rows(_rows(values))
    assert [r["sensitivity"] for r in shown if r is not None] == [3.0, 2.0, 1.0]
    assert None not in shown
    assert caption is not None
    assert caption.startswith("33 tickers; shown: every one with a sensitivity; 30 without")


def test_the_printed_table_of_a_large_universe_has_the_gap_row_and_the_caption(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from rich.console import Console

    from sensitivity import cli as cli_module

    buffer = io.StringIO()
    monkeypatch.setattr(cli_module, "out", Console(file=buffer, width=200, highlight=False))
    rows = [
        {
            "ticker": f"T{i:03d}",
            "date": "2024-12-31",
            "sensitivity": float(i),
            "sensitivity_se": 0.1,
            "beta": 1.0,
            "gamma": 0.5,
            "linear_beta": 1.0,
            "r2": 0.5,
            "dollar_sensitivity": 1.0,
        }
        for i in range(30)
    ]
    cli_module._print_result({"rows": rows, "as_of": "2024-12-31", "paths": {"summary": "/x/summary"}})
    text = buffer.getvalue()
    printed = [t for t in (f"T{i:03d}" for i in range(30)) if t in text]
    assert printed == [f"T{i:03d}" for i in (*range(CONSOLE_ENDS), *range(30 - CONSOLE_ENDS, 30))]
    assert "│ …" in text
    flat = " ".join(text.split())  # the caption wraps at the table's width
    assert (
        "30 tickers; shown: the 10 highest and the 10 lowest sensitivities (10 in between left out)" in flat
    )
    assert "summary: /x/summary" in text


def test_run_freezes_the_objects_of_its_imports_for_the_garbage_collector(tmp_path: Path) -> None:
    # In the command's own process (a fresh interpreter entering through main()): the run's
    # start-up imports, from the first (the source's check, then Prefect's settings) to the
    # flow and its steps, run with the collector paused; once the flow is loaded the collector
    # is on again, the objects alive then are frozen (full collections and the one at exit
    # skip them), and what is created afterwards is collected as usual.  The run is stopped
    # right after the flow is loaded.
    code = (
        "import gc, sys\n"
        "from sensitivity import cli\n"
        "real_check, real_load = cli._check_source, cli._load_flow_and_steps\n"
        "def check(cfg):\n"
        "    print('first import paused', not gc.isenabled(), 'prefect' in sys.modules, flush=True)\n"
        "    real_check(cfg)\n"
        "def load():\n"
        "    flow = real_load()\n"
        "    assert flow.name == 'stock-sensitivity', flow.name\n"
        "    print('loaded paused', not gc.isenabled(), gc.get_freeze_count(), flush=True)\n"
        "    raise RuntimeError('stop here')\n"
        "def after():\n"
        "    class Cycle: pass\n"
        "    a = Cycle(); a.me = a; del a\n"
        "    print('after', gc.isenabled(), gc.get_freeze_count(), gc.collect() >= 1, flush=True)\n"
        "cli._check_source, cli._load_flow_and_steps = check, load\n"
        "cli._prestart_workers = lambda cfg: None\n"
        "sys.argv = ['sensitivity', 'run', '--data-dir', sys.argv[1]]\n"
        "try:\n"
        "    cli.main()\n"
        "finally:\n"
        "    after()\n"
    )
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # (no temporary server)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        env=env,
    )
    assert "stop here" in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "first import paused True False", proc.stdout
    paused, frozen = lines[1].split()[2:]
    assert (paused, frozen) == ("True", "0"), proc.stdout
    enabled, frozen, collected = lines[2].split()[1:]
    assert (enabled, collected) == ("True", "True"), proc.stdout
    assert int(frozen) > 100_000, proc.stdout


def test_run_called_from_another_program_leaves_its_collector_alone() -> None:
    # `app` called in this process (as CliRunner and the battery do): nothing is frozen here.
    import gc

    from sensitivity import cli as cli_module

    frozen = gc.get_freeze_count()
    with cli_module._collector_paused():
        assert gc.isenabled()
        flow = cli_module._load_flow_and_steps()
    assert flow.name == "stock-sensitivity"
    assert gc.get_freeze_count() == frozen
    assert gc.isenabled()


@pytest.mark.parametrize(("tickers", "fetch", "sections"), [(100, 2, 1), (3, 0, 0)])
def test_run_prestarts_the_workers_its_fetch_and_report_will_take(
    tickers: int, fetch: int, sections: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch's and the report's worker processes start before the imports, as the flow's
    steps would start them (the same rules: sensitivity.plan); a small run starts none."""
    import sensitivity.cli as cli
    import sensitivity.plan as plan
    from sensitivity.config import load_config

    monkeypatch.setattr(plan, "available_cpus", lambda: 2)
    started: list[tuple[str, int]] = []
    monkeypatch.setattr(cli, "prestart", lambda function, n: started.append((function, n)) or n)
    monkeypatch.setattr(cli.head_start, "start", lambda cfg, level: False)  # (tested below)
    names = [f"S{i:04d}" for i in range(tickers)]
    cfg = load_config(
        ROOT / "config" / "sample.toml",
        {"source": "files", "source_path": str(tmp_path), "tickers": names},
    )
    cli._prestart_workers(cfg)
    assert dict(started) == {plan.FETCH_WORKER: fetch, plan.SECTION_WORKER: sections}
    batches = plan.fetch_batches(cfg, list(cfg.fetch_symbols))
    assert plan.fetch_processes(cfg, batches) == fetch  # what the flow's fetch_workers asks for


def test_run_gives_its_fetch_a_head_start_instead_of_idle_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the fetch's workers start preparing the fetch (sensitivity.head_start), no idle
    fetch workers are started beside them; the head start gets the run's configuration and
    the level of PREFECT_LOGGING_LEVEL."""
    import logging

    import sensitivity.cli as cli
    import sensitivity.plan as plan
    from sensitivity.config import load_config

    started: list[str] = []
    asked: list[tuple[Any, int]] = []
    monkeypatch.setattr(cli, "prestart", lambda function, n: started.append(function) or n)
    monkeypatch.setattr(cli.head_start, "start", lambda cfg, level: asked.append((cfg, level)) or True)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "debug")
    cfg = load_config(ROOT / "config" / "sample.toml", {"source": "files", "source_path": str(tmp_path)})
    cli._prestart_workers(cfg)
    assert plan.FETCH_WORKER not in started
    assert asked == [(cfg, logging.DEBUG)]
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "no-such-level")
    assert cli._logging_level() == logging.INFO


@pytest.mark.parametrize("busy_thread", [False, True], ids=["alone", "with-a-thread-running"])
def test_the_command_leaves_after_its_exit_handlers_and_flushing(busy_thread: bool) -> None:
    # A command that succeeded ends its process without the interpreter's teardown, but
    # only after what the usual exit does first: a thread still running (not a daemon) is
    # waited for, what was registered to run at the threads' shutdown runs (Prefect drains
    # its log and event services there; without it a temporary server waited 5 s for their
    # connections before it was killed), then the atexit handlers, and what it printed is
    # out.  A failure exits as usual.
    code = (
        "import atexit, sys, threading, time\n"
        "from sensitivity import cli\n"
        "atexit.register(print, 'atexit ran')\n"
        "threading._register_atexit(print, 'threads shut down')\n"
        + (
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True))).start()\n"
            if busy_thread
            else ""
        )
        + "sys.argv = ['sensitivity', *sys.argv[1:]]\n"
        "cli.main()\n"
    )

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    done = command("version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0].strip() == __version__
    assert "atexit ran" in lines
    assert lines.index("threads shut down") < lines.index("atexit ran")
    assert ("thread done" in lines) is busy_thread
    failed = command("run", "--window", "1")
    assert failed.returncode == 2, failed.stderr
    assert "atexit ran" in failed.stdout
