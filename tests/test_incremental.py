"""Incremental updates: fetch only what is new, detect a restated history and refetch it, never
lose or damage stored prices (pipeline.fetch_symbol, plan_fetch, restatement, PriceStore coverage)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from yahoo_stub import YahooStub, with_dividend

from sensitivity.config import Config
from sensitivity.errors import DataValidationError, SourceError, StoreError, SymbolNotFoundError
from sensitivity.pipeline import FetchPlan, fetch_symbol, plan_fetch, refetch_range, restatement
from sensitivity.prices import PRICE_COLUMNS
from sensitivity.sources.base import fetch_checked
from sensitivity.sources.files import FilesSource
from sensitivity.sources.quality import CheckedPrices
from sensitivity.sources.yahoo import YahooSource  # at import: yfinance adds warning filters then
from sensitivity.store import PriceStore

pytestmark = pytest.mark.filterwarnings(
    "ignore:The inplace keyword:DeprecationWarning",
    "ignore:The inplace keyword:FutureWarning",
    "ignore::pandas.errors.Pandas4Warning",
)

D = dt.date


def prices(start: str, periods: int, seed: int = 1) -> pd.DataFrame:
    """Business-day prices with known values (random walk, full-precision floats)."""
    rng = np.random.default_rng(seed)
    idx = pd.DatetimeIndex(pd.bdate_range(start, periods=periods).as_unit("ns"), freq=None, name="date")
    close = 50.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, periods)))
    return pd.DataFrame(
        {
            "open": close * 1.001,
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "adj_close": close * 0.98,
            "volume": rng.integers(1_000, 9_000, periods).astype(np.float64),
            "dividends": np.zeros(periods),
            "splits": np.zeros(periods),
        },
        index=idx,
    )


def write_csv(folder: Path, symbol: str, frame: pd.DataFrame) -> None:
    out = frame.rename(
        columns={
            "open": "Open",
            "high": "High",
            "low": "Low",
            "close": "Close",
            "adj_close": "Adj Close",
            "volume": "Volume",
            "dividends": "Dividends",
            "splits": "Stock Splits",
        }
    )
    out.index = out.index.strftime("%Y-%m-%d").rename("Date")
    out.to_csv(folder / f"{symbol}.csv", float_format="%.17g")


def config(data: Path, start: dt.date, end: dt.date, **source: Any) -> Config:
    source.setdefault("kind", "files")
    if "path" in source:
        source["path"] = str(source["path"])
    return Config.model_validate(
        {
            "universe": {"index": "^GSPC", "tickers": ["ACME"], "start": start, "end": end},
            "source": source,
            "output": {"data_dir": str(data)},
        }
    )


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored(data: Path, symbol: str = "ACME") -> pd.DataFrame:
    frame = PriceStore(data).read(symbol)
    assert frame is not None
    return frame


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    folder = tmp_path / "csv"
    folder.mkdir()
    return folder


# -- plan_fetch (pure) -----------------------------------------------------------------------------


def days(*isos: str) -> pd.DatetimeIndex:
    return pd.DatetimeIndex([pd.Timestamp(d) for d in isos])


STORED = pd.DatetimeIndex(pd.bdate_range("2024-01-01", "2024-01-31"))
COVERED = [(D(2024, 1, 1), D(2024, 1, 31))]


@pytest.mark.parametrize(
    ("stored_dates", "coverage", "start", "end", "expected"),
    [
        pytest.param(
            None, None, D(2024, 1, 1), D(2024, 2, 5), ("full", D(2024, 1, 1), D(2024, 2, 5)), id="empty"
        ),
        pytest.param(
            STORED,
            COVERED,
            D(2024, 1, 1),
            D(2024, 2, 5),
            ("incremental", D(2024, 1, 25), D(2024, 2, 5)),
            id="next",
        ),
        pytest.param(
            STORED,
            COVERED,
            D(2024, 1, 30),
            D(2024, 2, 5),
            ("incremental", D(2024, 1, 30), D(2024, 2, 5)),
            id="late",
        ),
        pytest.param(
            STORED, COVERED, D(2023, 12, 1), D(2024, 2, 5), ("full", D(2023, 12, 1), D(2024, 2, 5)), id="head"
        ),
        pytest.param(
            STORED,
            COVERED,
            D(2024, 1, 2),
            D(2024, 1, 12),
            ("incremental", D(2024, 1, 8), D(2024, 1, 12)),
            id="inside",
        ),
        pytest.param(
            STORED[:5].append(STORED[-5:]),
            [(D(2024, 1, 1), D(2024, 1, 5)), (D(2024, 1, 25), D(2024, 1, 31))],
            D(2024, 1, 1),
            D(2024, 2, 5),
            ("full", D(2024, 1, 1), D(2024, 2, 5)),
            id="gap",
        ),
        pytest.param(  # a listing after start: the coverage says start was asked for already
            days("2024-01-29", "2024-01-30", "2024-01-31"),
            COVERED,
            D(2024, 1, 1),
            D(2024, 2, 5),
            ("incremental", D(2024, 1, 29), D(2024, 2, 5)),
            id="late-listing",
        ),
    ],
)
def test_plan_fetch(
    stored_dates: pd.DatetimeIndex | None,
    coverage: list[tuple[dt.date, dt.date]] | None,
    start: dt.date,
    end: dt.date,
    expected: tuple[str, dt.date, dt.date],
) -> None:
    plan = plan_fetch(stored_dates, coverage, start, end, overlap=5)
    assert isinstance(plan, FetchPlan)
    assert (plan.mode, plan.start, plan.end) == expected
    assert plan.reason


def test_plan_fetch_names_the_missing_part() -> None:
    plan = plan_fetch(STORED, COVERED, D(2023, 12, 1), D(2024, 2, 5), overlap=5)
    assert plan.reason == "the store starts at 2024-01-01, after the requested start 2023-12-01"
    two = [(D(2024, 1, 1), D(2024, 1, 5)), (D(2024, 1, 25), D(2024, 1, 31))]
    gap = plan_fetch(STORED, two, D(2024, 1, 1), D(2024, 2, 5), overlap=5)
    assert gap.reason == "the store lacks 2024-01-06 to 2024-01-24"
    with pytest.raises(ValueError, match="overlap must be >= 1, got 0"):
        plan_fetch(STORED, COVERED, D(2024, 1, 1), D(2024, 2, 5), overlap=0)


def test_restatement_compares_adjusted_close_close_and_actions_only() -> None:
    old = prices("2024-01-01", 10)
    assert restatement(old, old.copy(), D(2024, 1, 1), D(2024, 1, 31)) is None
    noisy = old.copy()
    noisy["adj_close"] *= 1 + 1e-12  # float noise
    noisy["volume"] += 100  # Yahoo revises volumes
    assert restatement(old, noisy, D(2024, 1, 1), D(2024, 1, 31)) is None
    restated = with_dividend(old, "2024-01-10", 0.5)
    why = restatement(old, restated, D(2024, 1, 1), D(2024, 1, 31))
    assert why is not None
    assert why.startswith("adj close differs on 7 day(s) (first 2024-01-01: stored ")
    assert "dividends differs on 1 day(s) (first 2024-01-10" in why
    assert restatement(old, restated, D(2024, 1, 10), D(2024, 1, 12)) == (
        "dividends differs on 1 day(s) (first 2024-01-10: stored 0.0, now 0.5)"
    )
    missing = restatement(old, old.drop(old.index[3]), D(2024, 1, 1), D(2024, 1, 31))
    assert missing == "1 stored date(s) no longer in the source (first 2024-01-04)"
    added = pd.concat([old, prices("2024-02-01", 1)])
    assert restatement(old, added, D(2024, 1, 1), D(2024, 2, 28)) is None


def test_refetch_range_spans_the_request_and_everything_stored() -> None:
    cov = [(D(2020, 1, 1), D(2020, 6, 30)), (D(2021, 1, 1), D(2021, 3, 31))]
    assert refetch_range(cov, D(2020, 3, 1), D(2020, 4, 1)) == (D(2020, 1, 1), D(2021, 3, 31))
    assert refetch_range(cov, D(2019, 1, 1), D(2022, 1, 1)) == (D(2019, 1, 1), D(2022, 1, 1))
    assert refetch_range(None, D(2019, 1, 1), D(2022, 1, 1)) == (D(2019, 1, 1), D(2022, 1, 1))


# -- coverage in the store ---------------------------------------------------------------------------


def test_store_coverage_is_merged_and_replaced(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    assert store.coverage("ACME") is None
    frame = prices("2024-01-02", 5)  # 2024-01-02 .. 2024-01-08
    store.merge("ACME", frame, source="t", covers=(D(2024, 1, 1), D(2024, 1, 8)))
    assert store.coverage("ACME") == [(D(2024, 1, 1), D(2024, 1, 8))]
    store.merge("ACME", prices("2024-03-01", 3), source="t", covers=(D(2024, 3, 1), D(2024, 3, 5)))
    store.merge("ACME", prices("2024-01-09", 1), source="t")  # default: the frame's span
    assert store.coverage("ACME") == [(D(2024, 1, 1), D(2024, 1, 9)), (D(2024, 3, 1), D(2024, 3, 5))]
    store.merge("ACME", frame, source="t", replace=True, covers=(D(2023, 12, 1), D(2024, 1, 31)))
    assert store.coverage("ACME") == [(D(2023, 12, 1), D(2024, 1, 31))]
    assert_one_read_snapshot(store, "ACME")
    with pytest.raises(ValueError, match=r"covers must be \(start, end\) with start <= end"):
        store.merge("ACME", frame, source="t", covers=(D(2024, 2, 1), D(2024, 1, 1)))


def test_store_without_coverage_metadata_covers_its_stored_span(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    store = PriceStore(tmp_path)
    store.merge("ACME", prices("2024-01-02", 5), source="t", covers=(D(2024, 1, 1), D(2024, 1, 31)))
    path = store.path_for("ACME")
    table = pq.read_table(path)
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"sensitivity.coverage"}
    pq.write_table(table.replace_schema_metadata(meta), path)  # as an older version wrote it
    assert store.coverage("ACME") == [(D(2024, 1, 2), D(2024, 1, 8))]
    assert_one_read_snapshot(store, "ACME")


def assert_one_read_snapshot(store: PriceStore, symbol: str) -> None:
    """What a fetch merges into, read once: the frame with provenance and the coverage, as
    :meth:`PriceStore.read` and :meth:`PriceStore.coverage` give them apart."""
    snapshot = store.read_with_coverage(symbol)
    assert snapshot is not None
    frame, coverage = snapshot
    stored = store.read(symbol, with_provenance=True)
    assert stored is not None
    pd.testing.assert_frame_equal(frame, stored, check_exact=True)
    assert coverage == store.coverage(symbol)
    assert store.read_with_coverage("NEVER") is None
    table_snapshot = store.read_table_with_coverage(symbol)
    assert table_snapshot is not None
    assert table_snapshot[1] == coverage
    assert table_snapshot[0].num_rows == len(frame)
    assert store.read_table_with_coverage("NEVER") is None


def test_a_fetch_compares_the_stored_rows_of_its_range_only(tmp_path: Path) -> None:
    """What the restatement check gets of the stored history: the rows from the plan's start
    to its end, both included, in the compared columns -- the rows the whole frame has there."""
    from sensitivity.pipeline import RESTATEMENT_COLUMNS, _read_stored

    store = PriceStore(tmp_path)
    store.merge("ACME", prices("2024-01-02", 10), source="t")
    stored = _read_stored(store, "ACME")
    whole = store.read("ACME")
    assert whole is not None
    assert stored.dates is not None
    pd.testing.assert_index_equal(stored.dates, whole.index)
    for lo, hi in [
        (D(2024, 1, 5), D(2024, 1, 10)),  # stored dates at both ends
        (D(2024, 1, 6), D(2024, 1, 7)),  # a weekend: nothing stored
        (D(2023, 12, 1), D(2024, 1, 3)),  # before the first stored date
        (D(2024, 1, 12), D(2024, 3, 1)),  # beyond the last one
    ]:
        compared = [c for c in PRICE_COLUMNS if c in RESTATEMENT_COLUMNS]
        inside = whole.loc[pd.Timestamp(lo) : pd.Timestamp(hi), compared]
        pd.testing.assert_frame_equal(stored.between(lo, hi), inside, check_exact=True, check_freq=False)


def test_the_sources_checked_prefix_is_kept_until_the_next_merge(tmp_path: Path) -> None:
    """A merge keeps the source's ``checked_prefix`` with the prices; the next merge replaces
    it, or leaves none when it brings none (another source, a file it could not vouch for)."""
    store = PriceStore(tmp_path)
    assert store.read_snapshot("ACME") is None
    store.merge("ACME", prices("2024-01-02", 5), source="t", checked_prefix='{"a": 1}')
    snapshot = store.read_snapshot("ACME")
    assert snapshot is not None
    assert snapshot.checked_prefix == '{"a": 1}'
    assert snapshot.coverage == store.coverage("ACME")
    assert snapshot.table.num_rows == 5
    store.merge("ACME", prices("2024-01-09", 1), source="t", checked_prefix='{"b": 2}')
    assert store.read_snapshot("ACME").checked_prefix == '{"b": 2}'  # type: ignore[union-attr]
    store.merge("ACME", prices("2024-01-10", 1), source="t")
    assert store.read_snapshot("ACME").checked_prefix is None  # type: ignore[union-attr]
    assert_one_read_snapshot(store, "ACME")
    with pytest.raises(ValueError, match="checked_prefix must be a string"):
        store.merge("ACME", prices("2024-01-10", 1), source="t", checked_prefix=b"x")  # type: ignore[arg-type]


# -- fetch_symbol with the files source ------------------------------------------------------------------


def test_second_run_fetches_only_the_new_rows(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 30)  # 2024-01-01 .. 2024-02-09
    write_csv(csv, "ACME", history.iloc[:29])
    first = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 8), path=csv), "ACME")
    assert (first.mode, first.rows_fetched, first.rows_added, first.restated) == ("full", 29, 29, False)
    assert (first.fetch_start, first.fetch_end) == ("2024-01-01", "2024-02-08")

    write_csv(csv, "ACME", history)  # the next day's data arrived
    second = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv), "ACME")
    assert second.mode == "incremental"
    assert (second.fetch_start, second.fetch_end) == ("2024-02-02", "2024-02-09")  # 5 stored days again
    assert (second.rows_fetched, second.rows_added, second.rows_changed) == (6, 1, 0)
    assert (second.requested_start, second.requested_end) == ("2024-01-01", "2024-02-09")
    assert not second.restated
    assert second.restatement is None
    assert second.rows_stored == 30
    pd.testing.assert_frame_equal(stored(tmp_path), history, check_freq=False)
    assert "incremental fetch 2024-02-02 to 2024-02-09" in second.describe()


def test_a_daily_fetch_parses_only_the_new_lines_and_stores_what_a_whole_read_stores(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored price file keeps the CSV's checked prefix; the next day's fetch hands it
    back, parses only the file's last lines and ends exactly where a fetch reading the whole
    file ends; a line damaged among the checked ones still fails the symbol, naming it."""
    from sensitivity.sources import files

    answered: list[bool] = []
    update = files.csv_update_frame

    def spy(*args: Any, **kwargs: Any) -> Any:
        got = update(*args, **kwargs)
        answered.append(got is not None)
        return got

    monkeypatch.setattr(files, "csv_update_frame", spy)
    history = prices("2023-01-02", 300)
    write_csv(csv, "ACME", history.iloc[:299])
    last = history.index[-1].date()
    for data in (tmp_path / "a", tmp_path / "b"):
        fetch_symbol(config(data, D(2023, 1, 1), last - dt.timedelta(days=1), path=csv), "ACME")
        snapshot = PriceStore(data).read_snapshot("ACME")
        assert snapshot is not None
        assert (
            snapshot.checked_prefix
            == files.CheckedPrefix.of_whole((csv / "ACME.csv").read_bytes(), "ACME").dumps()
        )  # type: ignore[union-attr]
    assert answered == []  # a backfill reads whole

    write_csv(csv, "ACME", history)
    # "b" forgets its prefix (as a file written before prefixes were kept): a whole read.
    PriceStore(tmp_path / "b").merge("ACME", prices("2022-01-03", 1), source="t")
    outcomes = [
        fetch_symbol(config(d, D(2023, 1, 1), last, path=csv), "ACME")
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert answered == [True]
    drop = {"seconds", "rows_stored"}
    assert {k: v for k, v in outcomes[0].to_dict().items() if k not in drop} == {
        k: v for k, v in outcomes[1].to_dict().items() if k not in drop
    }
    assert (outcomes[0].mode, outcomes[0].rows_fetched, outcomes[0].rows_added) == ("incremental", 6, 1)
    a = PriceStore(tmp_path / "a").read("ACME")
    b = PriceStore(tmp_path / "b").read("ACME")
    assert a is not None
    assert b is not None
    pd.testing.assert_frame_equal(a, b.iloc[1:], check_exact=True, check_freq=False)
    pd.testing.assert_frame_equal(a, history, check_exact=True, check_freq=False)
    assert (
        PriceStore(tmp_path / "a").read_snapshot("ACME").checked_prefix
        == files.CheckedPrefix.of_whole(  # type: ignore[union-attr]
            (csv / "ACME.csv").read_bytes(), "ACME"
        ).dumps()
    )  # type: ignore[union-attr]

    # A close among the checked lines damaged: the whole file is read and its line named.
    lines = (csv / "ACME.csv").read_text().split("\n")
    cells = lines[10].split(",")
    cells[4] = "abc"
    lines[10] = ",".join(cells)
    (csv / "ACME.csv").write_text("\n".join(lines))
    before = checksum(PriceStore(tmp_path / "a").path_for("ACME"))
    with pytest.raises(DataValidationError, match=r"ACME\.csv line 11"):
        fetch_symbol(config(tmp_path / "a", D(2023, 1, 1), last, path=csv), "ACME")
    assert checksum(PriceStore(tmp_path / "a").path_for("ACME")) == before
    assert answered == [True, False]


def test_restated_history_is_detected_and_refetched(
    tmp_path: Path, csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history = prices("2024-01-01", 30)
    write_csv(csv, "ACME", history.iloc[:29])
    fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 8), path=csv), "ACME")

    restated = with_dividend(history, "2024-02-09", 0.25)  # goes ex on the new day
    write_csv(csv, "ACME", restated)
    caplog.set_level("INFO", logger="sensitivity.pipeline")
    out = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv), "ACME")
    assert out.mode == "refetch"
    assert out.restated
    assert out.restatement is not None
    assert out.restatement.startswith("adj close differs on 5 day(s)")
    assert (out.fetch_start, out.fetch_end) == ("2024-01-01", "2024-02-09")
    assert (out.rows_fetched, out.rows_added, out.rows_changed, out.rows_removed) == (30, 1, 29, 0)
    pd.testing.assert_frame_equal(stored(tmp_path), restated, check_freq=False)
    assert "the source restated the stored history (adj close differs" in caplog.text
    assert out.to_dict()["mode"] == "refetch"


def test_refetch_keeps_stored_history_outside_the_requested_range(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 60)
    write_csv(csv, "ACME", history)
    fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 3, 22), path=csv), "ACME")
    restated = with_dividend(history, "2024-03-19", 0.4)  # reported late, within the overlap
    write_csv(csv, "ACME", restated)
    out = fetch_symbol(config(tmp_path, D(2024, 3, 1), D(2024, 3, 22), path=csv), "ACME")
    assert out.mode == "refetch"
    # The whole stored history moved to the new adjustment basis, not only March.
    assert (out.fetch_start, out.fetch_end) == ("2024-01-01", "2024-03-22")
    pd.testing.assert_frame_equal(stored(tmp_path), restated, check_freq=False)


def test_an_earlier_start_fetches_the_missing_head(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 40)
    write_csv(csv, "ACME", history)
    fetch_symbol(config(tmp_path, D(2024, 2, 1), D(2024, 2, 23), path=csv), "ACME")
    out = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 23), path=csv), "ACME")
    assert (out.mode, out.fetch_start, out.rows_added, out.restated) == ("full", "2024-01-01", 23, False)
    pd.testing.assert_frame_equal(stored(tmp_path), history, check_freq=False)
    again = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 2, 23), path=csv), "ACME")
    assert (again.mode, again.rows_fetched, again.rows_added) == ("incremental", 5, 0)


def test_a_gap_between_two_backfills_is_filled(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 60)
    write_csv(csv, "ACME", history)
    fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 1, 19), path=csv), "ACME")
    fetch_symbol(config(tmp_path, D(2024, 3, 1), D(2024, 3, 22), path=csv), "ACME")
    out = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 3, 22), path=csv), "ACME")
    assert out.mode == "full"
    pd.testing.assert_frame_equal(stored(tmp_path), history, check_freq=False)


def test_a_late_listing_is_updated_incrementally(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-03-01", 20)  # lists long after the requested start
    write_csv(csv, "ACME", history.iloc[:19])
    first = fetch_symbol(config(tmp_path, D(2023, 1, 1), D(2024, 3, 27), path=csv), "ACME")
    assert first.mode == "full"
    write_csv(csv, "ACME", history)
    second = fetch_symbol(config(tmp_path, D(2023, 1, 1), D(2024, 3, 28), path=csv), "ACME")
    assert (second.mode, second.rows_fetched, second.rows_added) == ("incremental", 6, 1)


def test_quality_records_reach_the_outcome(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 10)
    history.iloc[4, history.columns.get_loc("high")] = 1.0  # high < low
    write_csv(csv, "ACME", history)
    out = fetch_symbol(config(tmp_path, D(2024, 1, 1), D(2024, 1, 31), path=csv), "ACME")
    assert out.dropped_rows == [{"date": "2024-01-05", "reason": out.dropped_rows[0]["reason"]}]
    assert out.dropped_rows[0]["reason"].startswith("high 1 is below low")
    assert out.rows_stored == 9
    assert "2024-01-05" not in {str(d.date()) for d in stored(tmp_path).index}


def test_a_failed_fetch_leaves_the_store_unchanged_and_a_later_run_recovers(
    tmp_path: Path, csv: Path
) -> None:
    history = prices("2024-01-01", 30)
    write_csv(csv, "ACME", history.iloc[:29])
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv)
    fetch_symbol(cfg, "ACME")
    path = PriceStore(tmp_path).path_for("ACME")
    before = checksum(path)
    (csv / "ACME.csv").rename(csv / "ACME.moved")
    with pytest.raises(SymbolNotFoundError, match=r"^ACME: no price file for this symbol"):
        fetch_symbol(cfg, "ACME")
    assert checksum(path) == before
    write_csv(csv, "ACME", history)
    assert fetch_symbol(cfg, "ACME").rows_added == 1


def test_a_refetch_that_would_lose_many_stored_dates_is_refused(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 60)
    write_csv(csv, "ACME", history)
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 3, 22), path=csv)
    fetch_symbol(cfg, "ACME")
    path = PriceStore(tmp_path).path_for("ACME")
    before = checksum(path)
    write_csv(csv, "ACME", with_dividend(history, "2024-03-20", 0.3).iloc[30:])  # half of it is gone
    message = (
        r"^ACME: files:.* now lacks 30 of the 60 stored dates \(2024-01-01 to 2024-02-09\) after "
        r"restating the history; the stored prices were left unchanged"
    )
    with pytest.raises(SourceError, match=message):
        fetch_symbol(cfg, "ACME")
    assert checksum(path) == before


def test_a_refetch_may_drop_a_few_glitched_dates(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 60)
    write_csv(csv, "ACME", history)
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 3, 22), path=csv)
    fetch_symbol(cfg, "ACME")
    fixed = with_dividend(history, "2024-03-20", 0.3).drop(history.index[[10, 20]])
    write_csv(csv, "ACME", fixed)
    out = fetch_symbol(cfg, "ACME")
    assert (out.mode, out.rows_removed, out.rows_stored) == ("refetch", 2, 58)
    pd.testing.assert_frame_equal(stored(tmp_path), fixed, check_freq=False)


class _Racing:
    """A source whose first fetch lets "another run" rewrite the stored file meanwhile."""

    def __init__(self, inner: FilesSource, on_first: Callable[[], None]) -> None:
        self.inner = inner
        self.name = inner.name
        self.on_first: Callable[[], None] | None = on_first
        self.calls = 0

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        return self.fetch_checked(symbol, start, end).frame

    def fetch_checked(self, symbol: str, start: dt.date, end: dt.date) -> CheckedPrices:
        self.calls += 1
        if self.on_first is not None:
            action, self.on_first = self.on_first, None
            action()
        return fetch_checked(self.inner, symbol, start, end)


def test_fetch_starts_over_when_another_run_rewrote_the_file(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 30)
    write_csv(csv, "ACME", history)
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv)
    other = prices("2023-12-01", 10, seed=9)

    def other_run() -> None:
        PriceStore(tmp_path).merge("ACME", other, source="other")

    source = _Racing(FilesSource(csv), other_run)
    out = fetch_symbol(cfg, "ACME", source=source)
    assert source.calls == 2
    assert out.mode == "full"  # planned again from what the other run stored
    back = stored(tmp_path)
    pd.testing.assert_frame_equal(back.loc["2024-01-01":], history, check_freq=False)
    pd.testing.assert_frame_equal(back.loc[:"2023-12-31"], other.loc[:"2023-12-31"], check_freq=False)
    assert not list((tmp_path / "prices").glob(".*")), "the merge prepared first was not removed"


def test_fetch_writes_the_merged_file_before_taking_the_store_lock(
    tmp_path: Path, csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Parquet encoding and fsync happen outside the lock; under it only the identity
    check and the rename: another writer can take the lock while the file is written."""
    import threading

    import sensitivity.store as store_mod

    write_csv(csv, "ACME", prices("2024-01-01", 30))
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv)
    free_during_write: list[bool] = []
    real = store_mod.PreparedFile

    class Probe(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, write: Any, **options: Any) -> None:
            def probed(fh: Any) -> None:
                def other_writer() -> None:
                    try:
                        with store_mod.store_lock(tmp_path, timeout_s=0):
                            free_during_write.append(True)
                    except StoreError:
                        free_during_write.append(False)

                t = threading.Thread(target=other_writer)
                t.start()
                t.join()
                write(fh)

            super().__init__(path, probed, **options)

    monkeypatch.setattr(store_mod, "PreparedFile", Probe)
    fetch_symbol(cfg, "ACME", source=FilesSource(csv))
    assert free_during_write == [True]
    assert len(stored(tmp_path)) == 30


def test_fetch_gives_up_when_the_file_keeps_changing(tmp_path: Path, csv: Path) -> None:
    history = prices("2024-01-01", 30)
    write_csv(csv, "ACME", history)
    cfg = config(tmp_path, D(2024, 1, 1), D(2024, 2, 9), path=csv)
    source = FilesSource(csv)

    class Always(_Racing):
        def fetch_checked(self, symbol: str, start: dt.date, end: dt.date) -> CheckedPrices:
            PriceStore(tmp_path).merge("ACME", prices("2023-11-01", 3, seed=self.calls), source="other")
            self.calls += 1
            return fetch_checked(self.inner, symbol, start, end)

    with pytest.raises(
        StoreError, match=r"^ACME: another run rewrote its stored prices during each of 3 fetches"
    ):
        fetch_symbol(cfg, "ACME", source=Always(source, lambda: None))
    assert not list((tmp_path / "prices").glob(".*")), "a merge prepared in vain was left behind"


# -- the same through real yfinance against the stub -----------------------------------------------------


def test_yahoo_incremental_and_restated_match_the_files_source(
    tmp_path: Path, csv: Path, yahoo_env: YahooStub
) -> None:
    """Day 1, day 2 (one new row, fetched incrementally), day 3 (a dividend restates the history):
    the Yahoo source through the stub and the files source on the same data store the same prices."""
    history = prices("2024-01-01", 32)
    restated = with_dividend(history, "2024-02-13", 0.3)
    days_ = [
        (history.iloc[:30], D(2024, 2, 9)),
        (history.iloc[:31], D(2024, 2, 12)),
        (restated, D(2024, 2, 13)),
    ]
    outcomes: dict[str, list[Any]] = {"yahoo": [], "files": []}
    for frame, end in days_:
        yahoo_env.add_frame("ACME", frame)
        write_csv(csv, "ACME", frame)
        yahoo_env.clear_requests()
        outcomes["yahoo"].append(
            fetch_symbol(
                config(tmp_path / "y", D(2024, 1, 1), end, kind="yahoo", requests_per_second=1000.0),
                "ACME",
                source=YahooSource(timeout_s=5.0),
            )
        )
        first_request = yahoo_env.chart_requests("ACME", "history")[0]
        outcomes["yahoo"][-1] = (outcomes["yahoo"][-1], first_request)
        outcomes["files"].append(fetch_symbol(config(tmp_path / "f", D(2024, 1, 1), end, path=csv), "ACME"))

    modes = [o.mode for o, _ in outcomes["yahoo"]]
    assert modes == ["full", "incremental", "refetch"]
    assert [o.mode for o in outcomes["files"]] == modes
    (second, request) = outcomes["yahoo"][1]
    assert (second.rows_fetched, second.rows_added) == (6, 1)
    first_asked = pd.Timestamp(int(request.query["period1"]), unit="s", tz="UTC").tz_convert(
        "America/New_York"
    )
    assert first_asked.date() == D(2024, 2, 5)  # only the 5 overlap days and the new one were asked for
    third, _ = outcomes["yahoo"][2]
    assert third.restated
    assert third.rows_changed == 31

    yahoo_stored = stored(tmp_path / "y")
    files_stored = stored(tmp_path / "f")
    pd.testing.assert_frame_equal(yahoo_stored, files_stored, check_exact=True)
    pd.testing.assert_frame_equal(yahoo_stored, restated.loc[: D(2024, 2, 13)], check_freq=False)
    assert list(yahoo_stored.columns) == list(PRICE_COLUMNS)
