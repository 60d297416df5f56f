"""Shared helpers of the reliability battery (``tests/reliability/``, listed in docs/reliability.md).

A tiny universe (``^GSPC`` against ``KO`` and ``MSFT``, 40 trading days of seeded synthetic
prices, window 20) keeps every run to a few seconds.  Runs go through the real command line
in this process (``typer.testing.CliRunner`` -> the Prefect flow on the session's
``prefect_harness``); only the tests where a real process is the point (``kill -9``,
Ctrl-C, a second process holding the lock) start one.

Every fault test compares the SHA-256 of every file under ``<data_dir>`` (except the
``.lock`` file) before and after the failure (:func:`checksums`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
HOOKED = HERE / "hooked_writer.py"

INDEX = "^GSPC"
TICKERS = ("KO", "MSFT")
SYMBOLS = (INDEX, *TICKERS)
ROWS = 40
FIRST_DAY = "2020-01-02"
START, END = dt.date(2020, 1, 1), dt.date(2020, 3, 31)
WINDOW, MIN_OBS = 20, 10

_runner = CliRunner()


# -- data ---------------------------------------------------------------------------------------


def price_frame(seed: int, rows: int = ROWS, start: str = FIRST_DAY) -> pd.DataFrame:
    """A seeded random walk in the project's price-frame layout (float64, ``date`` index)."""
    rng = np.random.default_rng(seed)
    index = pd.DatetimeIndex(pd.bdate_range(start, periods=rows).as_unit("ns"), name="date", freq=None)
    close = 50.0 * np.exp(np.cumsum(rng.normal(0.0, 0.012, rows)))
    return pd.DataFrame(
        {
            "open": close * 0.995,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "adj_close": close * 0.98,
            "volume": rng.integers(1_000, 9_000, rows).astype(np.float64),
            "dividends": np.zeros(rows),
            "splits": np.zeros(rows),
        },
        index=index,
    )


def universe_frames() -> dict[str, pd.DataFrame]:
    """The battery's prices: one frame per symbol (the same every time)."""
    return {symbol: price_frame(seed) for seed, symbol in enumerate(SYMBOLS)}


def csv_text(frame: pd.DataFrame) -> str:
    """A classic one-header Yahoo CSV (``Date,Open,High,Low,Close,Adj Close,Volume``), exact floats."""
    out = pd.DataFrame(
        {
            "Date": frame.index.strftime("%Y-%m-%d"),
            "Open": frame["open"].to_numpy(),
            "High": frame["high"].to_numpy(),
            "Low": frame["low"].to_numpy(),
            "Close": frame["close"].to_numpy(),
            "Adj Close": frame["adj_close"].to_numpy(),
            "Volume": frame["volume"].astype("int64").to_numpy(),
        }
    )
    return str(out.to_csv(index=False, float_format="%.17g", lineterminator="\n"))


def write_csv_universe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for symbol, frame in universe_frames().items():
        (folder / f"{symbol}.csv").write_text(csv_text(frame))
    return folder


def config_text(
    source: Mapping[str, Any], *, tickers: Iterable[str] = TICKERS, lock_timeout_s: float = 5
) -> str:
    """The battery's TOML configuration with ``[source]`` keys from ``source``."""

    def toml(value: Any) -> str:
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(value).lower() if isinstance(value, bool) else repr(value)

    names = ", ".join(toml(t) for t in tickers)
    lines = [
        "[universe]",
        f"index = {toml(INDEX)}",
        f"tickers = [{names}]",
        f"start = {START.isoformat()}",
        f"end = {END.isoformat()}",
        "",
        "[source]",
        *(f"{k} = {toml(v)}" for k, v in source.items()),
        "",
        "[model]",
        f"window = {WINDOW}",
        f"min_obs = {MIN_OBS}",
        "",
        "[output]",
        'data_dir = "unused-by-the-battery"',
        "",
        "[runtime]",
        f"lock_timeout_s = {lock_timeout_s!r}",
        "",
    ]
    return "\n".join(lines)


def files_config(path: Path, csv_folder: Path, **extra: Any) -> Path:
    path.write_text(
        config_text({"kind": "files", "path": str(csv_folder), "retries": 0, "retry_delay_s": 0}, **extra)
    )
    return path


def yahoo_config(path: Path, **extra: Any) -> Path:
    source = {
        "kind": "yahoo",
        "retries": 2,
        "retry_delay_s": 0,
        "timeout_s": 0.5,
        "requests_per_second": 1000,
        "concurrency": 3,
    }
    path.write_text(config_text(source, **extra))
    return path


# -- the store ----------------------------------------------------------------------------------


def checksums(data_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under ``data_dir`` except the writers' ``.lock``."""
    if not data_dir.exists():
        return {}
    return {
        str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def files_of(symbol: str, sums: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``sums`` that belong to ``symbol`` alone (its prices and its sensitivity file)."""
    return {
        k: v
        for k, v in sums.items()
        if Path(k).name == f"{symbol}.parquet" or f"__{symbol}__" in Path(k).name
    }


def temp_files(data_dir: Path) -> list[Path]:
    """Hidden files (temporaries of the atomic writes) other than ``.lock``."""
    return sorted(p for p in data_dir.rglob(".*") if p.name != ".lock")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Everything a run stores, as frames to compare: prices (without the provenance columns
    ``fetched_at`` and ``source``) and their fetched coverage, the per-day, summary and scenario
    tables."""
    from sensitivity.store import PriceStore, ReportStore

    prices = PriceStore(data_dir)
    out: dict[str, pd.DataFrame] = {}
    for symbol in prices.symbols():
        frame = prices.read(symbol)
        assert frame is not None
        out[f"prices/{symbol}"] = frame
        out[f"coverage/{symbol}"] = pd.DataFrame(prices.coverage(symbol) or [], columns=["lo", "hi"])
    reports = ReportStore(data_dir)
    out["sensitivity"] = reports.read_sensitivity()
    out["summary"] = reports.read_summary()
    out["scenarios"] = reports.read_scenarios()
    return out


def assert_same_tables(a: Mapping[str, pd.DataFrame], b: Mapping[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)


# -- the command line -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one ``sensitivity`` invocation did: exit status, stdout and stderr."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """The ``error: ...`` lines of stderr."""
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def invoke(*args: str | Path) -> Outcome:
    """``sensitivity ARGS...`` in this process (on the session's Prefect harness)."""
    result = _runner.invoke(_app(), [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run(config: Path, data_dir: Path, *extra: str | Path) -> Outcome:
    return invoke("run", "--config", config, "--data-dir", data_dir, *extra)


def _app() -> Any:
    from sensitivity.cli import app

    return app


def assert_refused(outcome: Outcome, code: int, pattern: str) -> None:
    """Exit status ``code``, exactly one ``error:`` line and it matches ``pattern``; no traceback."""
    assert outcome.exit_code == code, (outcome.exit_code, outcome.stderr)
    assert len(outcome.errors) == 1, outcome.stderr
    assert re.search(pattern, outcome.errors[0]), outcome.errors[0]
    assert "Traceback" not in outcome.stderr + outcome.stdout


def assert_succeeded(outcome: Outcome) -> None:
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.errors == [], outcome.stderr
    assert "Traceback" not in outcome.stderr + outcome.stdout


def quick_render(table: pd.DataFrame, summary: pd.DataFrame, manifest: Mapping[str, Any], **_: Any) -> bytes:
    """Stands in for the HTML renderer (matplotlib, seconds per run) in the battery; the report
    tests cover the real one."""
    return f"<!doctype html><title>{manifest.get('as_of')}</title><p>{len(table)} rows</p>\n".encode()


def python() -> str:
    return sys.executable
