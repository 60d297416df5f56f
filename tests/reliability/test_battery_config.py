"""Battery, part 1: bad configuration, options and flow parameters are refused before any work.

Each case: exit status 2, one ``error:`` line that names the key (or option) and the value, no
traceback, and nothing written anywhere (the test runs in an empty folder and checks it).
These fail before Prefect starts, so they run the command line in this process.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import battery
import pytest

BASE = battery.config_text({"kind": "sample"})


def _edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


#: (id, TOML text, pattern of the one error line)
TOML_CASES = [
    ("unknown-key", _edit("window = 20", "window = 20\nwindwo = 5"), r"unknown key 'model\.windwo'"),
    ("unknown-section", BASE + "\n[extra]\nx = 1\n", r"unknown key 'extra'"),
    (
        "wrong-type-string",
        _edit("window = 20", 'window = "20"'),
        r"model\.window must be an integer, got '20'",
    ),
    (
        "wrong-type-float",
        _edit("window = 20", "window = 20.5"),
        r"model\.window must be an integer, got 20\.5",
    ),
    (
        "wrong-type-ticker",
        _edit('tickers = ["KO", "MSFT"]', 'tickers = [1, "KO"]'),
        r"universe\.tickers must be a string ticker symbol, got 1",
    ),
    ("wrong-type-section", "universe = 5\n", r"universe must be a table \(\[section\] of keys\), got 5"),
    (
        "datetime-not-date",
        _edit("start = 2020-01-01", "start = 2020-01-01T10:00:00"),
        r"universe\.start must be a date \(YYYY-MM-DD\), not a date and time",
    ),
    (
        "empty-ticker-list",
        _edit('tickers = ["KO", "MSFT"]', "tickers = []"),
        r"universe\.tickers must name at least one ticker, got an empty list",
    ),
    (
        "symbol-nul-char",
        _edit('tickers = ["KO", "MSFT"]', 'tickers = ["KO\\u0000"]'),
        r"universe\.tickers 'KO\\x00' is not a plausible ticker symbol",
    ),
    (
        "nan-number",
        _edit("lock_timeout_s = 5", "lock_timeout_s = nan"),
        r"runtime\.lock_timeout_s must be <= 86400\.0, got nan",
    ),
    (
        "fetch-processes-word",
        _edit("lock_timeout_s = 5", 'lock_timeout_s = 5\nfetch_processes = "many"'),
        r"runtime\.fetch_processes must be \"auto\" or a whole number from 0 to 64, got 'many'",
    ),
    (
        "fetch-processes-negative",
        _edit("lock_timeout_s = 5", "lock_timeout_s = 5\nfetch_processes = -1"),
        r"runtime\.fetch_processes must be \"auto\" or a whole number from 0 to 64, got -1",
    ),
    (
        "empty-data-dir",
        _edit('data_dir = "unused-by-the-battery"', 'data_dir = ""'),
        r"output\.data_dir must not be empty \(name a folder\), got ''",
    ),
    ("malformed-toml", BASE + "\n[[[\n", r"config file '.*' is not valid TOML: .*line \d+"),
]

#: (id, options after ``run --config <valid file>``, pattern of the one error line)
OPTION_CASES = [
    (
        "bad-date",
        ["--start", "2020-02-30"],
        r"universe\.start must be a date written YYYY-MM-DD, got '2020-02-30'",
    ),
    (
        "bad-date-format",
        ["--end", "03/31/2020"],
        r"universe\.end must be a date written YYYY-MM-DD, got '03/31/2020'",
    ),
    (
        "start-after-end",
        ["--start", "2020-04-01"],
        r"universe\.start 2020-04-01 is after universe\.end 2020-03-31; start must be on or before end",
    ),
    ("negative-window", ["--window", "-5"], r"model\.window must be >= 0, got -5"),
    (
        "min-obs-over-window",
        ["--min-obs", "30"],
        r"model\.min_obs must be <= model\.window .*min_obs=30 > window=20",
    ),
    ("min-obs-under-4", ["--min-obs", "3"], r"model\.min_obs must be >= 4, got 3"),
    ("window-too-large", ["--window", "99999999999"], r"model\.window must be <= 100000, got 99999999999"),
    ("empty-tickers", ["--tickers", ""], r"universe\.tickers must not be empty, got ''"),
    ("blank-ticker", ["--tickers", "KO,,MSFT"], r"universe\.tickers must not be empty, got ''"),
    ("duplicated-tickers", ["--tickers", "KO,MSFT,ko"], r"universe\.tickers lists KO more than once"),
    ("index-among-tickers", ["--tickers", "KO,^gspc"], r"universe\.tickers contains the index \^GSPC"),
    (
        "symbol-slash",
        ["--tickers", "KO/MSFT"],
        r"universe\.tickers 'KO/MSFT' is not a plausible ticker symbol",
    ),
    ("symbol-dotdot", ["--tickers", ".."], r"universe\.tickers '\.\.' is not a plausible ticker symbol"),
    ("symbol-inner-dotdot", ["--tickers", "A..B"], r"universe\.tickers 'A\.\.B' is not a plausible"),
    (
        "symbol-path-traversal",
        ["--tickers", "../../etc/passwd"],
        r"universe\.tickers '\.\./\.\./etc/passwd' is not a plausible",
    ),
    ("symbol-space", ["--tickers", "K O"], r"universe\.tickers 'K O' is not a plausible ticker symbol"),
    ("symbol-control-char", ["--tickers", "K\x01O"], r"universe\.tickers 'K\\x01O' is not a plausible"),
    ("symbol-newline", ["--tickers", "KO\nMSFT"], r"universe\.tickers 'KO\\nMSFT' is not a plausible"),
    (
        "symbol-200-chars",
        ["--tickers", "A" * 200],
        r"universe\.tickers 'A{30}'\.\.\. is 200 characters long; a Yahoo ticker has at most 24",
    ),
    ("symbol-non-ascii", ["--tickers", "KÖ"], r"universe\.tickers 'KÖ' is not a plausible"),
    ("symbol-shell", ["--tickers", "KO;rm -rf ~"], r"universe\.tickers 'KO;rm -rf ~' is not a plausible"),
    ("symbol-url-escape", ["--tickers", "%2e%2e%2f"], r"universe\.tickers '%2e%2e%2f' is not a plausible"),
    ("bad-index", ["--index", "../x"], r"universe\.index '\.\./x' is not a plausible ticker symbol"),
    (
        "empty-data-dir-option",
        ["--data-dir", ""],
        r"output\.data_dir must not be empty \(name a folder\), got ''",
    ),
    (
        "empty-source-path",
        ["--source", "files", "--source-path", ""],
        r"source\.path must not be empty \(name a folder\), got ''",
    ),
    (
        "source-path-missing",
        ["--source", "files", "--source-path", "no-such-folder"],
        r"source\.path 'no-such-folder' is not a folder \(it must hold one <SYMBOL>\.csv",
    ),
    (
        "source-path-is-a-file",
        ["--source", "files", "--source-path", "c.toml"],
        r"source\.path 'c\.toml' is not a folder",
    ),
    (
        "data-dir-is-a-file",
        ["--data-dir", "c.toml"],
        r"output\.data_dir must be a folder, not a file \(name a new or existing folder\), got 'c\.toml'",
    ),
]

#: (id, options, text of the usage error): typer/click's own refusals, before our code runs.
USAGE_CASES = [
    ("unknown-option", ["--windw", "5"], "No such option: --windw"),
    ("not-an-integer", ["--window", "abc"], "Invalid value for '--window'"),
    ("unknown-source", ["--source", "ftp"], "Invalid value for '--source'"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder, so that a stray relative write would show up in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _nothing_written(workdir: Path, *keep: str) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == sorted(keep)


@pytest.mark.parametrize(("text", "pattern"), [pytest.param(t, p, id=i) for i, t, p in TOML_CASES])
def test_config_file_is_refused(workdir: Path, text: str, pattern: str) -> None:
    (workdir / "c.toml").write_text(text)
    outcome = battery.invoke("run", "--config", "c.toml")  # output.data_dir: a folder in workdir
    battery.assert_refused(outcome, 2, pattern)
    _nothing_written(workdir, "c.toml")


@pytest.mark.parametrize(("options", "pattern"), [pytest.param(o, p, id=i) for i, o, p in OPTION_CASES])
def test_option_is_refused(workdir: Path, options: list[str], pattern: str) -> None:
    (workdir / "c.toml").write_text(BASE)
    outcome = battery.invoke("run", "--config", "c.toml", "--data-dir", "data", *options)
    battery.assert_refused(outcome, 2, pattern)
    _nothing_written(workdir, "c.toml")


def test_missing_config_file_is_refused(workdir: Path) -> None:
    outcome = battery.invoke("run", "--config", "nope.toml", "--data-dir", "data")
    battery.assert_refused(outcome, 2, r"config file 'nope\.toml' does not exist \(pass --config PATH\)")
    _nothing_written(workdir)


@pytest.mark.parametrize(("options", "message"), [pytest.param(o, m, id=i) for i, o, m in USAGE_CASES])
def test_usage_error_is_refused(workdir: Path, options: list[str], message: str) -> None:
    (workdir / "c.toml").write_text(BASE)
    outcome = battery.invoke("run", "--config", "c.toml", "--data-dir", "data", *options)
    assert outcome.exit_code == 2, outcome.stderr
    assert message in " ".join(outcome.stderr.replace("│", " ").split()), outcome.stderr
    assert "Traceback" not in outcome.stderr
    _nothing_written(workdir, "c.toml")


# -- the same checks through the Prefect flow (what a deployment run gets) -----------------------


@pytest.fixture(scope="module")
def flow():  # type: ignore[no-untyped-def]
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(f"{battery.ROOT / 'flows' / 'pipeline.py'}:stock_sensitivity")


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        pytest.param({"window": -5}, r"model\.window must be >= 0, got -5", id="negative-window"),
        pytest.param(
            {"tickers": ["KO", "../x"]}, r"'\.\./x' is not a plausible ticker symbol", id="path-ticker"
        ),
        pytest.param(
            {"start": dt.date(2020, 5, 1)}, r"universe\.start 2020-05-01 is after", id="start-after-end"
        ),
    ],
)
def test_flow_parameter_is_refused_before_any_work(flow, workdir: Path, params: dict, pattern: str) -> None:  # type: ignore[no-untyped-def]
    from sensitivity.errors import ConfigError

    (workdir / "c.toml").write_text(BASE)
    with pytest.raises(ConfigError, match=pattern) as info:
        flow(config=str(workdir / "c.toml"), data_dir=str(workdir / "data"), **params)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    _nothing_written(workdir, "c.toml")
