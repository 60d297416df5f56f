"""The local fetch's head start (sensitivity.head_start; pipeline.prepare_fetch / commit_fetch):
worker processes prepare the fetch while `sensitivity run` starts up, nothing is visible until
the flow's task commits it, and what is committed is exactly what a plain fetch stores."""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sensitivity import head_start
from sensitivity.config import Config
from sensitivity.pipeline import (
    commit_batch,
    commit_fetch,
    fetch_batch,
    fetch_symbol,
    prepare_batch_logged,
    prepare_fetch,
)
from sensitivity.plan import fetch_batches
from sensitivity.store import PriceStore, file_identity

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

SYMBOLS = ["^GSPC", "AAA", "BBB", "CCC", "DDD"]


def write_csv(folder: Path, symbol: str, days: pd.DatetimeIndex, seed: int) -> None:
    rng = np.random.default_rng(seed)
    close = 40.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, len(days))))
    frame = pd.DataFrame(
        {"Open": close * 1.001, "High": close * 1.01, "Low": close * 0.99, "Close": close},
        index=pd.Index(days.strftime("%Y-%m-%d"), name="Date"),
    )
    frame["Adj Close"] = close * 0.97
    frame["Volume"] = rng.integers(1_000, 9_000, len(days))
    frame.to_csv(folder / f"{symbol}.csv", float_format="%.17g")


def make_config(
    tmp: Path, data: str, *, processes: int | str = 2, end: str = "2024-06-28", **runtime: Any
) -> Config:
    return Config.model_validate(
        {
            "universe": {"index": "^GSPC", "tickers": SYMBOLS[1:], "start": "2024-01-02", "end": end},
            "source": {"kind": "files", "path": str(tmp / "source"), "concurrency": 1},
            "output": {"data_dir": str(tmp / data)},
            "runtime": {"fetch_processes": processes, **runtime},
        }
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    days = pd.bdate_range("2024-01-02", "2024-06-28")
    for i, symbol in enumerate(SYMBOLS):
        write_csv(folder, symbol, days, seed=i)
    return folder


def stored(data_dir: Path) -> dict[str, Any]:
    """Every stored price file's rows (without the fetch time) and metadata."""
    out: dict[str, Any] = {}
    for path in sorted((data_dir / "prices").glob("[!.]*.parquet")):
        table = pq.read_table(path)
        out[path.name] = (table.drop_columns(["fetched_at"]).to_pydict(), pq.read_schema(path).metadata)
    return out


def without_seconds(outcome: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in outcome.items() if k != "seconds"}


@pytest.mark.parametrize("update", [False, True], ids=["first-fetch", "daily-update"])
def test_prepare_then_commit_stores_what_a_fetch_stores(source: Path, tmp_path: Path, update: bool) -> None:
    plain, split = make_config(tmp_path, "plain"), make_config(tmp_path, "split")
    if update:  # both stores hold the first five months; the source then gains June
        for cfg in (plain, split):
            early = cfg.model_copy(
                update={"universe": cfg.universe.model_copy(update={"end": dt.date(2024, 5, 31)})}
            )
            fetch_batch(early, SYMBOLS)
    for symbol in SYMBOLS:
        expected = fetch_symbol(plain, symbol)
        prepared = prepare_fetch(split, symbol)
        try:
            # Nothing visible before the commit: the stored file is the one it was merged with.
            assert file_identity(PriceStore(split.output.data_dir).path_for(symbol)) == prepared.fingerprint
            outcome = commit_fetch(split, prepared)
        finally:
            prepared.discard()
        assert outcome is not None
        assert without_seconds(outcome.to_dict()) == without_seconds(expected.to_dict())
    assert stored(tmp_path / "split") == stored(tmp_path / "plain")
    assert not [p for p in (tmp_path / "split" / "prices").iterdir() if p.name.startswith(".")]


def test_a_batch_looks_for_stale_temp_files_once_not_once_per_symbol(
    source: Path, tmp_path: Path, swept_folders: list[Path]
) -> None:
    prices_dir = PriceStore(tmp_path / "plain").folder
    assert all("outcome" in entry for entry in fetch_batch(make_config(tmp_path, "plain"), SYMBOLS))
    assert swept_folders == [prices_dir]
    split = make_config(tmp_path, "split")
    prepared = prepare_batch_logged(split, SYMBOLS, logging.INFO)
    assert swept_folders[1:] == [PriceStore(tmp_path / "split").folder]
    assert all("outcome" in entry for entry in commit_batch(split, prepared))
    assert len(swept_folders) == 2  # committing renames prepared files: no write, no look


def test_a_file_rewritten_after_the_prepare_is_not_overwritten(source: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "data")
    early = cfg.model_copy(update={"universe": cfg.universe.model_copy(update={"end": dt.date(2024, 5, 31)})})
    fetch_batch(early, ["AAA"])
    prepared = prepare_fetch(cfg, "AAA")
    time.sleep(0.01)
    fetch_symbol(cfg, "AAA")  # another run updates the file meanwhile
    after_other = stored(tmp_path / "data")
    try:
        assert commit_fetch(cfg, prepared) is None  # refused: it was merged with the old file
    finally:
        prepared.discard()
    assert stored(tmp_path / "data") == after_other
    assert not [p for p in (tmp_path / "data" / "prices").iterdir() if p.name.startswith(".")]


def test_a_prepared_file_that_is_gone_is_not_committed(source: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "data")
    prepared = prepare_fetch(cfg, "AAA")
    prepared.discard()  # (as a sweep of a stopped writer's files would)
    assert commit_fetch(cfg, prepared) is None
    assert not (tmp_path / "data" / "prices" / "AAA.parquet").exists()


def test_a_batch_is_prepared_elsewhere_and_committed_with_its_records(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain, split = make_config(tmp_path, "plain"), make_config(tmp_path, "split")
    (source / "CCC.csv").write_text("Date,Close\n2024-01-02,abc\n")  # fails: fetched by the task
    expected = fetch_batch(plain, SYMBOLS)
    prepared = prepare_batch_logged(split, SYMBOLS, logging.INFO)
    assert [s for s, p, _ in prepared if p is None] == ["CCC"]
    assert stored(tmp_path / "split") == {}  # nothing visible before the commit
    aaa_records = next(r for s, _, r in prepared if s == "AAA")
    assert any("AAA: full fetch" in r.getMessage() for r in aaa_records)
    with caplog.at_level(logging.INFO, logger="sensitivity"):
        results = commit_batch(split, prepared)
    assert [r["symbol"] for r in results] == SYMBOLS
    for got, want in zip(results, expected, strict=True):
        if "outcome" in want:
            assert without_seconds(got["outcome"]) == without_seconds(want["outcome"])
        else:
            assert got == want  # the task's own fetch gives the error and its message
    assert "CCC" in expected[3]["symbol"]
    assert "line 2" in expected[3]["error"]
    logged = caplog.text
    plan_line = "AAA: full fetch 2024-01-02 to 2024-06-28: nothing stored yet"
    assert logged.count(plan_line) == 1  # the preparation's record, replayed once
    assert "AAA: full fetch 2024-01-02 to 2024-06-28 from files:" in logged  # then the commit's
    assert stored(tmp_path / "split") == stored(tmp_path / "plain")


@pytest.mark.skipif((os.cpu_count() or 1) < 1, reason="needs a worker process")
def test_head_start_prepares_in_workers_and_the_tasks_commit(source: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "data", processes=2)
    plain = make_config(tmp_path, "plain", processes=2)
    expected = fetch_batch(plain, SYMBOLS)
    batches = fetch_batches(cfg, list(cfg.fetch_symbols))
    assert len(batches) > 1
    try:
        assert head_start.start(cfg)
        assert head_start.covers(cfg, batches)
        other = make_config(tmp_path, "data", processes=2, end="2024-06-27")
        assert not head_start.covers(other, batches)
        assert head_start.take(other, batches[0]) is None  # another configuration: nothing
        head_start._CURRENT.end -= dt.timedelta(days=1)  # type: ignore[union-attr]
        assert not head_start.covers(cfg, batches)  # (as after midnight without `end`)
        assert head_start.take(cfg, batches[0]) is None
        head_start._CURRENT.end += dt.timedelta(days=1)  # type: ignore[union-attr]
        results = []
        for batch in batches:
            prepared = head_start.take(cfg, batch)
            assert prepared is not None
            assert all(p is not None for _, p, _ in prepared)
            if batch is batches[0]:
                assert stored(tmp_path / "data") == {}  # prepared, not yet visible
            results += commit_batch(cfg, prepared)
        assert head_start.take(cfg, batches[0]) is None  # each batch is handed out once
        assert head_start.covers(cfg, batches)  # (still its batches, taken or not)
        workers = head_start._CURRENT.pool._procs  # type: ignore[union-attr]
        assert workers
        if hasattr(os, "getpriority"):  # they yield the busy core to the run's own start-up
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            assert all(os.getpriority(os.PRIO_PROCESS, p.pid) >= min(mine + 1, 19) for p in workers)
    finally:
        head_start.finish()
    assert [without_seconds(r["outcome"]) for r in results] == [
        without_seconds(r["outcome"]) for r in expected
    ]
    assert stored(tmp_path / "data") == stored(tmp_path / "plain")
    assert not [p for p in (tmp_path / "data" / "prices").iterdir() if p.name.startswith(".")]


def test_a_head_start_no_task_takes_leaves_the_store_as_it_was(source: Path, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "data", processes=2)
    early = cfg.model_copy(update={"universe": cfg.universe.model_copy(update={"end": dt.date(2024, 5, 31)})})
    fetch_batch(early, SYMBOLS)
    before = stored(tmp_path / "data")
    identities = {p.name: file_identity(p) for p in (tmp_path / "data" / "prices").iterdir()}
    try:
        assert head_start.start(cfg)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(f.done() for f in head_start._CURRENT.jobs.values()):  # type: ignore[union-attr]
            time.sleep(0.05)
    finally:
        head_start.finish()  # e.g. the flow failed before its fetch
    assert stored(tmp_path / "data") == before
    assert {p.name: file_identity(p) for p in (tmp_path / "data" / "prices").iterdir()} == identities


def test_no_head_start_when_switched_off_or_without_worker_processes(source: Path, tmp_path: Path) -> None:
    try:
        assert not head_start.start(make_config(tmp_path, "data", fetch_head_start=False))
        assert not head_start.start(make_config(tmp_path, "data", processes=0))
        assert head_start._CURRENT is None
    finally:
        head_start.finish()
