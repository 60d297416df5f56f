"""Fixtures of the reliability battery: a clean store built once per module, copied per test."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import battery

#: What ``sensitivity run`` sets with ``os.environ.setdefault``; set here so that it is undone.
_CLI_ENV = {
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _patch(mp: pytest.MonkeyPatch) -> None:
    import sensitivity.report

    for name, value in _CLI_ENV.items():
        mp.setenv(name, value)
    mp.setattr(sensitivity.report, "render_report", battery.quick_render)


@contextlib.contextmanager
def _no_heartbeats() -> Iterator[None]:
    """Flow-run heartbeats (crash detection for long runs on a server) cost ~0.7 s per run."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture(autouse=True)
def _battery_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Quick HTML, Prefect's console quiet, no heartbeats, for every test here (undone afterwards)."""
    _patch(monkeypatch)
    with _no_heartbeats():
        yield


@dataclass(frozen=True)
class Universe:
    """A files-source universe and a store holding one clean run of it."""

    csv: Path
    data: Path
    config: Path


@pytest.fixture(scope="module")
def files_baseline(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Universe:
    """One clean ``sensitivity run`` of the battery's universe from CSV files (once per module)."""
    root = tmp_path_factory.mktemp("files-baseline")
    csv = battery.write_csv_universe(root / "csv")
    config = battery.files_config(root / "files.toml", csv)
    with pytest.MonkeyPatch.context() as mp, _no_heartbeats():
        _patch(mp)
        outcome = battery.run(config, root / "data")
    battery.assert_succeeded(outcome)
    return Universe(csv, root / "data", config)


@pytest.fixture
def files_universe(files_baseline: Universe, tmp_path: Path) -> Universe:
    """A private copy of the clean files universe (its CSV folder, store and config)."""
    csv = battery.copy_tree(files_baseline.csv, tmp_path / "csv")
    data = battery.copy_tree(files_baseline.data, tmp_path / "data")
    return Universe(csv, data, battery.files_config(tmp_path / "files.toml", csv))
