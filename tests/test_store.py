"""The Parquet store: schemas, exact round trips, atomic replace, merge, paths, reports, lock."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensitivity import store as store_mod
from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    StoreError,
    StoreLockedError,
)
from sensitivity.prices import (
    POSITIVE_COLUMNS,
    PRICE_COLUMNS,
    check_price_arrays,
    check_price_frame,
    float_columns,
)
from sensitivity.store import (
    PRICE_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    SENSITIVITY_COLUMNS,
    SENSITIVITY_SCHEMA,
    SUMMARY_COLUMNS,
    SUMMARY_SCHEMA,
    MergeResult,
    PriceStore,
    ReportStore,
    one_sweep_per_folder,
    read_price_file,
    store_lock,
    write_bytes_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
UTC = dt.UTC
T0 = dt.datetime(2024, 1, 2, 22, 0, tzinfo=UTC)
T1 = dt.datetime(2024, 2, 1, 22, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------ helpers


def prices(dates: list[str] | pd.DatetimeIndex, base: float = 100.0, seed: int = 0) -> pd.DataFrame:
    """A valid price frame with distinct, awkward float64 values."""
    index = pd.DatetimeIndex(pd.to_datetime(list(dates)), name="date").as_unit("ns")  # as the store reads
    rng = np.random.default_rng(seed)
    n = len(index)
    close = base * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    data = {
        "open": close * (1 + rng.normal(0, 1e-3, n)),
        "high": close * 1.01,
        "low": close * 0.99,
        "close": close,
        "adj_close": close / 3.0,
        "volume": rng.integers(1, 10**9, n).astype(np.float64),
        "dividends": np.zeros(n),
        "splits": np.zeros(n),
    }
    return pd.DataFrame(data, index=index).loc[:, list(PRICE_COLUMNS)]


def sens_frame(index: str, ticker: str, window: int, dates: list[str], seed: int = 0) -> pd.DataFrame:
    """A valid sensitivity table for one combination."""
    rng = np.random.default_rng(seed)
    n = len(dates)
    data: dict[str, Any] = {
        "date": pd.to_datetime(dates),
        "index_ticker": [index] * n,
        "ticker": [ticker] * n,
        "window": np.full(n, window, dtype=np.int64),
        "n_obs": np.arange(n, dtype=np.int64) + 1,
    }
    for c in SENSITIVITY_COLUMNS[5:]:
        data[c] = rng.normal(size=n) * 10.0 ** rng.integers(-12, 12, n)
    data["se_type"] = ["hac"] * n
    data["alpha"][0] = np.nan  # a null fitted value
    return pd.DataFrame(data).loc[:, list(SENSITIVITY_COLUMNS)]


def summary_frame(as_of: str, rows: list[tuple[str, str, int]], seed: int = 0) -> pd.DataFrame:
    parts = []
    for k, (index, ticker, window) in enumerate(rows):
        part = sens_frame(index, ticker, window, [as_of], seed=seed + k)
        part.insert(0, "as_of", pd.Timestamp(as_of))
        part["fit"] = "ols"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).view(np.int64)


# ------------------------------------------------------------------------------ schemas


def test_schemas_have_the_documented_columns_types_and_version() -> None:
    assert SENSITIVITY_COLUMNS == (
        "date", "index_ticker", "ticker", "window", "n_obs", "index_return", "stock_return",
        "alpha", "beta", "gamma", "sensitivity", "sensitivity_se", "sensitivity_ci_lower",
        "sensitivity_ci_upper", "alpha_se", "beta_se", "gamma_se", "linear_beta", "r2", "close",
        "prev_close", "dollar_sensitivity",
        # schema version 2
        "se_type", "risk_free_return", "cov_alpha_beta", "cov_alpha_gamma", "cov_beta_gamma",
        "gamma_t", "gamma_p", "aic_linear", "aic_quadratic", "delta_aic", "secant_slope",
        "up_beta", "down_beta", "huber_alpha", "huber_beta", "huber_gamma", "huber_alpha_se",
        "huber_beta_se", "huber_gamma_se", "huber_cov_alpha_beta", "huber_cov_alpha_gamma",
        "huber_cov_beta_gamma", "huber_sensitivity", "huber_sensitivity_se",
    )  # fmt: skip
    assert ("as_of", *SENSITIVITY_COLUMNS, "fit") == SUMMARY_COLUMNS
    assert SENSITIVITY_SCHEMA.field("date").type == pa.date32()
    assert SENSITIVITY_SCHEMA.field("window").type == pa.int64()
    assert SENSITIVITY_SCHEMA.field("n_obs").type == pa.int64()
    assert SENSITIVITY_SCHEMA.field("ticker").type == pa.string()
    assert SENSITIVITY_SCHEMA.field("se_type").type == pa.string()
    assert not SENSITIVITY_SCHEMA.field("se_type").nullable
    floats = [c for c in SENSITIVITY_COLUMNS[5:] if c != "se_type"]
    assert all(SENSITIVITY_SCHEMA.field(c).type == pa.float64() for c in floats)
    assert SUMMARY_SCHEMA.field("as_of").type == pa.date32()
    assert SUMMARY_SCHEMA.field("fit").type == pa.string()
    assert PRICE_SCHEMA.names == ["date", *PRICE_COLUMNS, "fetched_at", "source"]
    assert all(PRICE_SCHEMA.field(c).type == pa.float64() for c in PRICE_COLUMNS)
    assert PRICE_SCHEMA.field("fetched_at").type == pa.timestamp("us", tz="UTC")
    assert not PRICE_SCHEMA.field("date").nullable
    assert SCHEMA_VERSIONS == {"prices": 1, "sensitivity": 2, "summary": 2, "scenarios": 1}
    assert max(SCHEMA_VERSIONS.values()) == SCHEMA_VERSION
    for schema, kind in (
        (PRICE_SCHEMA, "prices"),
        (SENSITIVITY_SCHEMA, "sensitivity"),
        (SUMMARY_SCHEMA, "summary"),
        (store_mod.SCENARIO_SCHEMA, "scenarios"),
    ):
        assert schema.metadata[b"sensitivity.schema_version"] == str(SCHEMA_VERSIONS[kind]).encode()
        assert schema.metadata[b"sensitivity.kind"] == kind.encode()


def test_price_file_carries_schema_and_version_metadata(tmp_path: Path) -> None:
    PriceStore(tmp_path).merge("AAPL", prices(["2024-01-02", "2024-01-03"]), source="test", fetched_at=T0)
    schema = pq.read_schema(tmp_path / "prices" / "AAPL.parquet")
    assert schema.remove_metadata() == PRICE_SCHEMA.remove_metadata()
    assert schema.metadata[b"sensitivity.schema_version"] == b"1"
    assert schema.metadata[b"sensitivity.kind"] == b"prices"
    assert (
        pq.ParquetFile(tmp_path / "prices" / "AAPL.parquet").metadata.row_group(0).column(1).compression
        == "ZSTD"
    )


# ------------------------------------------------------------------------------ price round trip


def test_prices_round_trip_float64_bit_for_bit(tmp_path: Path) -> None:
    frame = prices(pd.bdate_range("2020-01-01", periods=300))
    frame.iloc[5, 0] = np.nan
    frame.iloc[7, 3] = 1e-300  # tiny
    frame.iloc[8, 3] = 1.7976931348623157e308  # largest double
    frame.iloc[9, 3] = 0.1 + 0.2
    frame["adj_close"] = np.nan  # a source without adjusted close
    store = PriceStore(tmp_path)
    store.merge("MSFT", frame, source="test", fetched_at=T0)
    back = store.read("MSFT")
    assert back is not None
    pd.testing.assert_index_equal(back.index, frame.index)
    assert back.index.dtype == "datetime64[ns]"
    assert back.index.name == "date"
    assert list(back.columns) == list(PRICE_COLUMNS)
    for c in PRICE_COLUMNS:
        assert back[c].dtype == np.float64
        np.testing.assert_array_equal(bits(back[c].to_numpy()), bits(frame[c].to_numpy()))
    # Missing values are Parquet nulls (what DuckDB and polars users expect), not NaN payloads.
    table = pq.read_table(tmp_path / "prices" / "MSFT.parquet")
    assert table.column("adj_close").null_count == 300
    assert table.column("open").null_count == 1


def test_read_returns_provenance_per_row(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    store.merge("AAPL", prices(["2024-01-02", "2024-01-03"]), source="yahoo", fetched_at=T0)
    store.merge("AAPL", prices(["2024-01-03", "2024-01-04"], seed=1), source="files:x", fetched_at=T1)
    back = store.read("AAPL", with_provenance=True)
    assert back is not None
    assert back["source"].tolist() == ["yahoo", "files:x", "files:x"]
    assert back["fetched_at"].tolist() == [pd.Timestamp(T0), pd.Timestamp(T1), pd.Timestamp(T1)]
    assert str(back["fetched_at"].dtype) == "datetime64[us, UTC]"
    assert back["source"].dtype == "str"


def test_read_of_a_symbol_never_stored_is_none(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    assert store.read("AAPL") is None
    assert store.last_date("AAPL") is None
    assert store.read_many(["AAPL"]) == {}
    assert store.symbols() == []


def test_read_many_filters_dates_and_skips_unknown_symbols(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=10)
    store.merge("^GSPC", prices(days), source="t", fetched_at=T0)
    store.merge("brk-b", prices(days[3:], seed=2), source="t", fetched_at=T0)
    out = store.read_many(["^GSPC", "BRK-B", "NOPE"], start=dt.date(2024, 1, 3), end="2024-01-09")
    assert list(out) == ["^GSPC", "BRK-B"]
    assert out["^GSPC"].index[0] == pd.Timestamp("2024-01-03")
    assert out["^GSPC"].index[-1] == pd.Timestamp("2024-01-09")
    assert out["BRK-B"].index[0] == pd.Timestamp("2024-01-04")
    empty = store.read_many(["BRK-B"], start="2030-01-01")
    assert empty["BRK-B"].empty
    assert list(empty["BRK-B"].columns) == list(PRICE_COLUMNS)
    assert store.last_date("BRK-B") == dt.date(2024, 1, 12)
    assert store.symbols() == ["BRK-B", "^GSPC"]


def test_read_many_of_some_columns_reads_only_those(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=10)
    store.merge("KO", prices(days), source="t", fetched_at=T0)
    whole = store.read_many(["KO"], start="2024-01-03")["KO"]
    some = store.read_many(["KO"], start="2024-01-03", columns=["adj_close", "close"])["KO"]
    assert list(some.columns) == ["close", "adj_close"]  # in the stored order
    pd.testing.assert_frame_equal(some, whole[["close", "adj_close"]], check_exact=True)
    traced = read_price_file(store.path_for("KO"), columns=["volume"], with_provenance=True)
    assert list(traced.columns) == ["volume", "fetched_at", "source"]
    with pytest.raises(ValueError, match=r"unknown price column\(s\): Close"):
        store.read_many(["KO"], columns=["Close"])


def test_read_many_arrays_are_read_many_without_frames(tmp_path: Path) -> None:
    """The fit's read: the same rows, values and date range as read_many, as plain arrays
    (a missing adjusted close, stored as a null, reads as NaN)."""
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=10)
    index = prices(days)
    index.loc[index.index[4], "adj_close"] = np.nan
    store.merge("^GSPC", index, source="t", fetched_at=T0)
    store.merge("brk-b", prices(days[3:], seed=2), source="t", fetched_at=T0)
    for start, end in ((None, None), (dt.date(2024, 1, 3), "2024-01-09"), ("2030-01-01", None)):
        frames = store.read_many(
            ["^GSPC", "BRK-B", "NOPE"], start=start, end=end, columns=["close", "adj_close"]
        )
        arrays = store.read_many_arrays(["^GSPC", "brk-b", "NOPE"], start=start, end=end)
        assert list(arrays) == list(frames) == ["^GSPC", "BRK-B"]
        for symbol, frame in frames.items():
            got = arrays[symbol]
            assert len(got) == len(frame)
            pd.testing.assert_frame_equal(got.frame(), frame, check_exact=True)
            assert got.days.dtype == np.int64
    assert np.isnan(store.read_many_arrays(["^GSPC"])["^GSPC"].columns["adj_close"][4])
    with pytest.raises(ValueError, match=r"unknown price column\(s\): Close"):
        store.read_many_arrays(["KO"], columns=["Close"])


def test_sample_files_hold_the_exact_csv_values() -> None:
    aapl = read_price_file(SAMPLE / "AAPL.parquet", with_provenance=True)
    assert len(aapl) == 2553
    assert aapl.index[0] == pd.Timestamp("2008-12-31")
    assert aapl.index[-1] == pd.Timestamp("2019-02-22")
    first = aapl.iloc[0]  # 2008-12-31,12.281428,12.534286,12.191428,12.192857,8.130234,151885300
    assert first["open"] == float("12.281428")
    assert first["close"] == float("12.192857")
    assert first["adj_close"] == float("8.130234")
    assert first["volume"] == 151885300.0
    assert aapl["close"].iloc[-1] == float("172.970001")
    assert aapl["dividends"].isna().all()
    assert aapl["splits"].isna().all()
    assert aapl["source"].iloc[0] == "yahoo-classic-csv:jiewwantan/StarTrader@a2bbf17"
    assert aapl["fetched_at"].iloc[0] == pd.Timestamp("2019-03-04", tz="UTC")
    files = sorted(p.name for p in SAMPLE.glob("*.parquet"))
    assert len(files) == 14
    assert "^GSPC.parquet" in files
    vix = read_price_file(SAMPLE / "^VIX.parquet")
    assert (vix["volume"] == 0).all()


# ------------------------------------------------------------------------------ merge


def test_merge_unions_by_date_and_the_new_fetch_wins(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=10)
    first = prices(days[:6])
    r1 = store.merge("AAPL", first, source="yahoo", fetched_at=T0)
    assert r1 == MergeResult(
        symbol="AAPL", rows_before=0, rows_after=6, rows_added=6, rows_changed=0,
        first_date=dt.date(2024, 1, 1), last_date=dt.date(2024, 1, 8), rows_removed=0,
        path=tmp_path / "prices" / "AAPL.parquet",
    )  # fmt: skip
    second = prices(days[4:], seed=9)  # overlaps days 4 and 5 with different values
    second.iloc[0] = first.iloc[4]  # ... except day 4, which is the same
    r2 = store.merge("aapl", second, source="yahoo", fetched_at=T1)
    assert (r2.rows_before, r2.rows_after, r2.rows_added, r2.rows_changed) == (6, 10, 4, 1)
    assert (r2.first_date, r2.last_date) == (dt.date(2024, 1, 1), dt.date(2024, 1, 12))
    back = store.read("AAPL")
    assert back is not None
    pd.testing.assert_frame_equal(back.iloc[:4], first.iloc[:4], check_freq=False)
    pd.testing.assert_frame_equal(back.iloc[4:], second, check_freq=False)


def test_merge_keeps_stored_rows_outside_a_partial_fetch(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=20)
    full = prices(days)
    store.merge("KO", full, source="t", fetched_at=T0)
    partial = full.iloc[8:10].copy()  # a fetch that returned two days only
    r = store.merge("KO", partial, source="t", fetched_at=T1)
    assert (r.rows_before, r.rows_after, r.rows_added, r.rows_changed, r.rows_removed) == (20, 20, 0, 0, 0)
    back = store.read("KO")
    assert back is not None
    pd.testing.assert_frame_equal(back, full, check_freq=False)


def test_merge_counts_restated_history_as_changed(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=5)
    old = prices(days)
    store.merge("MSFT", old, source="t", fetched_at=T0)
    restated = old.copy()
    restated["adj_close"] = old["adj_close"] * 0.99  # a dividend restates adjusted history
    restated.loc[days[2], "dividends"] = np.nan  # NaN vs 0.0 is a change too
    r = store.merge("MSFT", restated, source="t", fetched_at=T1)
    assert r.rows_changed == 5
    assert r.rows_added == 0
    same = store.merge("MSFT", restated, source="t", fetched_at=T1)
    assert same.rows_changed == 0  # NaN == NaN for this purpose


def test_merge_replace_makes_the_fetch_the_whole_history(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    days = pd.bdate_range("2024-01-01", periods=10)
    store.merge("XOM", prices(days), source="t", fetched_at=T0)
    refetch = prices(days[3:7], seed=5)
    r = store.merge("XOM", refetch, source="t", fetched_at=T1, replace=True)
    assert (r.rows_before, r.rows_after, r.rows_added, r.rows_changed, r.rows_removed) == (10, 4, 0, 4, 6)
    back = store.read("XOM")
    assert back is not None
    pd.testing.assert_frame_equal(back, refetch, check_freq=False)


def test_merge_validates_the_frame_before_writing(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    good = prices(pd.bdate_range("2024-01-01", periods=3))
    store.merge("JPM", good, source="t", fetched_at=T0)
    path = store.path_for("JPM")
    before = path.read_bytes()
    dup = pd.concat([good, good.iloc[:1]])
    with pytest.raises(DataValidationError, match="JPM: date 2024-01-01 appears more than once"):
        store.merge("JPM", dup, source="t", fetched_at=T1)
    with pytest.raises(EmptyDataError, match="JPM: the source returned no prices"):
        store.merge("JPM", good.iloc[:0], source="t", fetched_at=T1)
    intraday = good.copy()
    intraday.index = intraday.index + pd.Timedelta(hours=16)
    with pytest.raises(DataValidationError, match="column date must hold dates, got a time of day"):
        store.merge("JPM", intraday, source="t", fetched_at=T1)
    float32 = good.astype({"close": np.float32})
    with pytest.raises(DataValidationError, match="column close must be float64"):
        store.merge("JPM", float32, source="t", fetched_at=T1)
    with pytest.raises(ValueError, match="fetched_at must be timezone-aware"):
        store.merge("JPM", good, source="t", fetched_at=dt.datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        store.merge("JPM", good, source=" ", fetched_at=T1)
    assert path.read_bytes() == before
    assert visible(path.parent) == ["JPM.parquet"]


def test_merge_default_fetched_at_is_now_utc(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    before = pd.Timestamp.now(tz="UTC")
    store.merge("PG", prices(["2024-01-02"]), source="t")
    back = store.read("PG", with_provenance=True)
    assert back is not None
    assert before <= back["fetched_at"].iloc[0] <= pd.Timestamp.now(tz="UTC")


@st.composite
def _fetches(draw: st.DrawFn) -> list[list[int]]:
    return draw(
        st.lists(
            st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=12, unique=True),
            min_size=1,
            max_size=4,
        )
    )


@given(_fetches())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_merge_property_union_of_dates_latest_fetch_wins(tmp_path: Path, fetches: list[list[int]]) -> None:
    """Each merge's file is the union by date of what was stored and what was fetched, the
    fetch winning: the very table the generic conversion gives for that union (pandas)."""
    folder = tmp_path / f"run-{os.urandom(4).hex()}"
    store = PriceStore(folder)
    days = pd.bdate_range("2024-01-01", periods=31)
    expected = pd.DataFrame()
    for k, positions in enumerate(fetches):
        frame = prices(days[sorted(positions)], seed=k)
        frame["close"] = float(k + 1) + np.arange(len(frame)) / 100
        frame.iloc[0, list(frame.columns).index("volume")] = np.nan
        fetched_at = T0 + dt.timedelta(hours=k)
        r = store.merge("AAA", frame, source=f"fetch{k}", fetched_at=fetched_at)
        records = frame.assign(fetched_at=pd.Timestamp(fetched_at).tz_convert("UTC"), source=f"fetch{k}")
        rest = expected.loc[~expected.index.isin(records.index)] if len(expected) else expected
        expected = pd.concat([rest, records]).sort_index() if len(rest) else records
        assert r.rows_after == len(expected)
        oracle = store_mod._price_table(expected, "AAA")
        assert pq.read_table(store.path_for("AAA")).cast(PRICE_SCHEMA).equals(oracle)
    back = store.read("AAA")
    assert back is not None
    assert list(back.index) == list(expected.index)


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("symbol", "name"),
    [
        ("^GSPC", "^GSPC.parquet"),
        ("BRK-B", "BRK-B.parquet"),
        ("EURUSD=X", "EURUSD=X.parquet"),
        ("aapl", "AAPL.parquet"),
    ],
)
def test_path_for_maps_symbols_inside_the_prices_folder(tmp_path: Path, symbol: str, name: str) -> None:
    path = PriceStore(tmp_path).path_for(symbol)
    assert path == tmp_path / "prices" / name
    assert path.resolve().parent == (tmp_path / "prices").resolve()


@pytest.mark.parametrize(
    "symbol", ["../x", "a/b", "..", ".", "", "/etc/passwd", "..\\x", "A\x00B", "x" * 300], ids=repr
)
def test_path_for_refuses_symbols_that_could_leave_the_folder(tmp_path: Path, symbol: str) -> None:
    with pytest.raises(ConfigError, match="symbol"):
        PriceStore(tmp_path).path_for(symbol)
    with pytest.raises(ConfigError):
        PriceStore(tmp_path).merge(symbol, prices(["2024-01-02"]), source="t")
    with pytest.raises(ConfigError):
        ReportStore(tmp_path).sensitivity_path("^GSPC", symbol, 252)
    assert not (tmp_path / "prices").exists()


def test_child_guard_refuses_names_that_escape(tmp_path: Path) -> None:
    folder = tmp_path / "prices"
    folder.mkdir()
    for name in ["../x.parquet", ".hidden", "a/b", ""]:
        with pytest.raises(StoreError, match="folder"):
            store_mod._child(folder, name)
    (folder / "LINK.parquet").symlink_to(tmp_path / "elsewhere.parquet")
    with pytest.raises(StoreError, match="resolves outside"):
        store_mod._child(folder, "LINK.parquet")
    (folder / "UP.parquet").symlink_to(Path("..") / "prices" / ".." / "elsewhere.parquet")
    with pytest.raises(StoreError, match="resolves outside"):
        store_mod._child(folder, "UP.parquet")  # relative, through the folder itself
    (folder / "KO.parquet").write_bytes(b"x")
    (folder / "SAME.parquet").symlink_to("KO.parquet")  # a link that stays inside is fine
    assert store_mod._child(folder, "SAME.parquet") == folder / "SAME.parquet"
    assert store_mod._child(folder, "KO.parquet") == folder / "KO.parquet"
    assert store_mod._child(folder, "NEW.parquet") == folder / "NEW.parquet"  # not there yet
    linked = tmp_path / "linked"
    linked.symlink_to(folder, target_is_directory=True)  # the folder reached through a link
    assert store_mod._child(linked, "KO.parquet") == linked / "KO.parquet"


def test_report_paths_follow_the_layout(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    assert rs.sensitivity_path("^GSPC", "EURUSD=X", 0) == (
        tmp_path / "reports" / "sensitivity" / "^GSPC__EURUSD=X__w0.parquet"
    )
    assert (
        rs.summary_path(dt.date(2024, 5, 1))
        == tmp_path / "reports" / "summary" / "summary-2024-05-01.parquet"
    )
    html, manifest = rs.report_paths("2024-05-01")
    assert html == tmp_path / "reports" / "daily" / "2024-05-01" / "report.html"
    assert manifest == html.with_name("manifest.json")
    with pytest.raises(ValueError, match="window must be an integer >= 0, got -1"):
        rs.sensitivity_path("^GSPC", "AAPL", -1)


# ------------------------------------------------------------------------------ unreadable files


def _write_with_metadata(path: Path, version: bytes | None, kind: bytes = b"prices") -> None:
    table = store_mod.price_table(prices(["2024-01-02"]), symbol="X", source="t", fetched_at=T0)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"sensitivity.schema_version"}
    meta[b"sensitivity.kind"] = kind
    if version is not None:
        meta[b"sensitivity.schema_version"] = version
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_newer_schema_is_refused_with_upgrade_advice(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    _write_with_metadata(store.path_for("AAPL"), str(SCHEMA_VERSIONS["prices"] + 1).encode())
    msg = r"AAPL.parquet was written by a newer version of stock-sensitivity \(schema 2 > 1\); upgrade"
    with pytest.raises(StoreError, match=msg):
        store.read("AAPL")
    # A merge (even a full refetch) must not downgrade the newer file.
    before = store.path_for("AAPL").read_bytes()
    for replace in (False, True):
        with pytest.raises(StoreError, match="newer version"):
            store.merge("AAPL", prices(["2024-01-03"]), source="t", fetched_at=T0, replace=replace)
    assert store.path_for("AAPL").read_bytes() == before


def test_foreign_and_mislabelled_files_are_refused(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    _write_with_metadata(store.path_for("AAPL"), None)
    with pytest.raises(StoreError, match="was not written by stock-sensitivity"):
        store.read("AAPL")
    _write_with_metadata(store.path_for("MSFT"), b"1", kind=b"summary")
    with pytest.raises(StoreError, match="holds 'summary' data, not 'prices'"):
        store.read("MSFT")
    _write_with_metadata(store.path_for("KO"), b"one")
    with pytest.raises(StoreError, match="unreadable schema version"):
        store.read("KO")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_a_store_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    store = PriceStore(tmp_path)
    store.merge("AAPL", prices(pd.bdate_range("2024-01-01", periods=50)), source="t", fetched_at=T0)
    path = store.path_for("AAPL")
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not parquet at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(
        StoreError, match=r"AAPL\.parquet .*delete it and rerun to refetch the prices"
    ) as info:
        store.read("AAPL")
    assert str(path) in str(info.value)
    with pytest.raises(StoreError, match="delete it and rerun"):
        store.read_many(["AAPL"])
    with pytest.raises(StoreError, match="delete it and rerun"):
        store.merge("AAPL", prices(["2024-06-03"]), source="t", fetched_at=T1)
    # A full refetch replaces the damaged file.
    r = store.merge("AAPL", prices(["2024-06-03"]), source="t", fetched_at=T1, replace=True)
    assert (r.rows_before, r.rows_after) == (0, 1)
    assert store.read("AAPL") is not None


def test_file_missing_a_column_is_refused(tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    path = store.path_for("AAPL")
    table = store_mod.price_table(prices(["2024-01-02"]), symbol="AAPL", source="t", fetched_at=T0)
    path.parent.mkdir(parents=True)
    pq.write_table(table.drop_columns(["volume"]), path)
    with pytest.raises(StoreError, match="lacks column"):
        store.read("AAPL")


# ------------------------------------------------------------------------------ atomic writes


@pytest.fixture
def stored(tmp_path: Path) -> tuple[PriceStore, Path, bytes]:
    store = PriceStore(tmp_path)
    store.merge("AAPL", prices(pd.bdate_range("2024-01-01", periods=5)), source="t", fetched_at=T0)
    path = store.path_for("AAPL")
    return store, path, path.read_bytes()


def test_failed_replace_leaves_the_old_file_and_no_temp(
    stored: tuple[PriceStore, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, before = stored

    def boom(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(StoreError, match=r"cannot write .*AAPL\.parquet.*previous file was left unchanged"):
        store.merge(
            "AAPL", prices(pd.bdate_range("2024-02-01", periods=5), seed=3), source="t", fetched_at=T1
        )
    assert path.read_bytes() == before
    assert visible(path.parent) == ["AAPL.parquet"]


def test_disk_full_midway_is_a_store_error_and_the_old_file_survives(
    stored: tuple[PriceStore, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, before = stored

    def half_then_full(table: pa.Table, where: IO[bytes], **kwargs: Any) -> None:
        where.write(b"PAR1 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", half_then_full)
    with pytest.raises(
        StoreError, match=r"AAPL\.parquet: the disk is full \(free some space and rerun\)"
    ) as info:
        store.merge("AAPL", prices(pd.bdate_range("2024-02-01", periods=5)), source="t", fetched_at=T1)
    assert isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == before
    assert visible(path.parent) == ["AAPL.parquet"]


def test_permission_denied_is_a_store_error(
    stored: tuple[PriceStore, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, before = stored
    real_open = os.open

    def deny(file: Any, flags: int, mode: int = 0o777) -> int:
        if str(file).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, mode)

    monkeypatch.setattr(store_mod.os, "open", deny)
    with pytest.raises(StoreError, match="permission denied"):
        store.merge("AAPL", prices(["2024-03-01"]), source="t", fetched_at=T1)
    assert path.read_bytes() == before


def test_interrupt_midway_removes_the_temp_and_propagates(
    stored: tuple[PriceStore, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, before = stored

    def interrupted(table: pa.Table, where: IO[bytes], **kwargs: Any) -> None:
        where.write(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.pq, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.merge("AAPL", prices(["2024-03-01"]), source="t", fetched_at=T1)
    assert path.read_bytes() == before
    assert visible(path.parent) == ["AAPL.parquet"]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(proc.stdout)


def test_stale_temp_files_are_ignored_by_readers_and_cleaned_by_the_next_write(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, ["2024-01-02", "2024-01-03"]))
    folder = rs.sensitivity_dir
    stale = folder / f".^GSPC__MSFT__w252.parquet.{_dead_pid()}.0123456789ab.tmp"
    stale.write_bytes(b"half a parquet file from a killed run")
    live = folder / f".^GSPC__KO__w252.parquet.{os.getpid()}.0123456789ab.tmp"
    live.write_bytes(b"a write in progress in this process")
    other = folder / ".notes.txt"
    other.write_bytes(b"not ours")
    assert len(pd.read_parquet(folder)) == 2
    assert ds.dataset(folder, format="parquet").to_table().num_rows == 2
    assert len(rs.read_sensitivity()) == 2
    rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, ["2024-01-04"]))
    assert not stale.exists()
    assert live.exists()
    assert other.exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_the_temp_file_of_a_killed_writer_not_yet_reaped_is_cleaned_too(tmp_path: Path) -> None:
    """A writer killed with its parent stays a zombie where nothing reaps orphans (a container
    whose first process does not): it writes nothing more, so its temporary file goes too."""
    import sensitivity.store as store_module

    rs = ReportStore(tmp_path)
    rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, ["2024-01-02"]))
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not store_module._zombie(zombie.pid):
        time.sleep(0.01)
    try:
        assert store_module._zombie(zombie.pid)
        assert not store_module._pid_alive(zombie.pid)
        stale = rs.sensitivity_dir / f".^GSPC__MSFT__w252.parquet.{zombie.pid}.0123456789ab.tmp"
        stale.write_bytes(b"half a file")
        rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, ["2024-01-03"]))
        assert not stale.exists()
    finally:
        zombie.wait()
    assert not store_module._zombie(os.getpid())
    assert store_module._pid_alive(os.getpid())


def test_a_batch_of_writes_looks_for_stale_temp_files_once_per_folder(
    tmp_path: Path, swept_folders: list[Path]
) -> None:
    rs = ReportStore(tmp_path)
    frame = pd.concat(
        [sens_frame("^GSPC", t, 252, ["2024-01-02", "2024-01-03"]) for t in ("AAPL", "KO", "MSFT")],
        ignore_index=True,
    )
    assert len(rs.write_sensitivity(frame)) == 3
    assert swept_folders == [rs.sensitivity_dir]  # each file's own look at the folder is skipped
    write_bytes_atomic(tmp_path / "one.bin", b"x")
    assert swept_folders[-1] == tmp_path  # a single write still looks


def test_writes_in_one_batch_look_for_stale_temp_files_once_per_folder(
    tmp_path: Path, swept_folders: list[Path]
) -> None:
    store = PriceStore(tmp_path)
    store.folder.mkdir(parents=True)
    stale = store.folder / f".AAA.parquet.{_dead_pid()}.0123456789ab.tmp"
    stale.write_bytes(b"half a parquet file from a killed run")
    with one_sweep_per_folder():
        for i, symbol in enumerate(["AAA", "BBB", "CCC"]):
            store.merge(symbol, prices(["2024-01-02", "2024-01-03"], seed=i), source="test", fetched_at=T0)
            assert not stale.exists()  # the batch's first write removed it
        write_bytes_atomic(tmp_path / "one.bin", b"x")
        write_bytes_atomic(tmp_path / "two.bin", b"y")
    assert swept_folders == [store.folder, tmp_path]
    store.merge("DDD", prices(["2024-01-02"]), source="test", fetched_at=T0)
    write_bytes_atomic(tmp_path / "one.bin", b"z")
    assert swept_folders[2:] == [store.folder, tmp_path]  # outside a batch every write looks


def test_write_bytes_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.bin"
    write_bytes_atomic(path, b"one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert visible(path.parent) == ["b.bin"]
    with pytest.raises(TypeError, match="must be bytes"):
        write_bytes_atomic(path, "text")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sensitivity reports


def test_write_sensitivity_writes_one_file_per_combination(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    frame = pd.concat(
        [
            sens_frame("^GSPC", "AAPL", 252, ["2024-01-03", "2024-01-02"], seed=1),
            sens_frame("^GSPC", "AAPL", 0, ["2024-01-02"], seed=2),
            sens_frame("^GSPC", "BRK-B", 252, ["2024-01-02", "2024-01-03"], seed=3),
        ],
        ignore_index=True,
    )
    paths = rs.write_sensitivity(frame)
    assert sorted(p.name for p in paths) == [
        "^GSPC__AAPL__w0.parquet",
        "^GSPC__AAPL__w252.parquet",
        "^GSPC__BRK-B__w252.parquet",
    ]
    back = rs.read_sensitivity()
    assert list(back.columns) == list(SENSITIVITY_COLUMNS)
    assert len(back) == 5
    one = back[(back["ticker"] == "AAPL") & (back["window"] == 252)]
    assert one["date"].tolist() == [dt.date(2024, 1, 2), dt.date(2024, 1, 3)]  # sorted by date
    assert back["n_obs"].dtype == np.int64
    assert back["window"].dtype == np.int64
    for c in SENSITIVITY_COLUMNS[5:]:
        assert back[c].dtype == (np.float64 if c != "se_type" else pd.Series(["x"]).dtype)
    expected = frame.sort_values(["index_ticker", "ticker", "window", "date"]).reset_index(drop=True)
    for c in SENSITIVITY_COLUMNS[5:]:
        if c == "se_type":
            assert back[c].tolist() == expected[c].tolist()
            continue
        np.testing.assert_array_equal(bits(back[c].to_numpy()), bits(expected[c].to_numpy()))
    assert pq.read_table(paths[0]).column("alpha").null_count == 1  # NaN stored as null


def test_repetitive_columns_are_dictionary_encoded_and_distinct_ones_are_not(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    days = [str(d.date()) for d in pd.bdate_range("2024-01-02", periods=50)]
    (per_day,) = rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, days))
    (summary,) = rs.write_summary(summary_frame("2024-01-02", [("^GSPC", t, 252) for t in ("AAPL", "KO")]))

    def dictionary_encoded(path: Path) -> dict[str, bool]:
        group = pq.ParquetFile(path).metadata.row_group(0)
        return {
            group.column(i).path_in_schema: any("DICTIONARY" in e for e in group.column(i).encodings)
            for i in range(group.num_columns)
        }

    encoded = dictionary_encoded(per_day)
    # One row per day: a dictionary of the dates would only repeat them.
    assert not encoded["date"]
    assert all(encoded[c] for c in ("index_ticker", "ticker", "window", "se_type"))
    assert not any(encoded[c] for c in ("alpha", "beta", "gamma", "sensitivity"))
    # Known without counting (one row per date): so also in a file of one row, and n_obs
    # (mostly the window) is always a dictionary.
    (one_day,) = rs.write_sensitivity(sens_frame("^GSPC", "KO", 252, days[:1]))
    encoded = dictionary_encoded(one_day)
    assert not encoded["date"]
    assert all(encoded[c] for c in ("index_ticker", "ticker", "window", "n_obs", "se_type"))
    # A price file: one row per date as well; a fetch's time and its source repeat.
    store = PriceStore(tmp_path)
    for day in days[:3]:  # three fetches: three distinct fetched_at values over three rows
        store.merge(
            "AAPL", prices([day]), source="test", fetched_at=pd.Timestamp(day, tz="UTC").to_pydatetime()
        )
    encoded = dictionary_encoded(store.path_for("AAPL"))
    assert not encoded["date"]
    assert encoded["fetched_at"]
    assert encoded["source"]
    encoded = dictionary_encoded(summary)
    assert encoded["as_of"]  # the same day on every row
    assert encoded["date"]
    assert not encoded["ticker"]  # one row per ticker


def test_write_sensitivity_replaces_only_the_combinations_it_wrote(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_sensitivity(
        pd.concat(
            [
                sens_frame("^GSPC", "AAPL", 252, ["2024-01-02", "2024-01-03", "2024-01-04"]),
                sens_frame("^GSPC", "MSFT", 252, ["2024-01-02"]),
            ]
        )
    )
    msft = rs.sensitivity_path("^GSPC", "MSFT", 252)
    msft_bytes = msft.read_bytes()
    rs.write_sensitivity(sens_frame("^GSPC", "AAPL", 252, ["2024-01-05"], seed=7))
    back = rs.read_sensitivity(tickers=["AAPL"])
    assert back["date"].tolist() == [dt.date(2024, 1, 5)]  # the combination was replaced
    assert msft.read_bytes() == msft_bytes  # the other one left alone


def test_write_sensitivity_accepts_date_objects_and_datetimes_alike(tmp_path: Path) -> None:
    a, b = ReportStore(tmp_path / "a"), ReportStore(tmp_path / "b")
    frame = sens_frame("^GSPC", "AAPL", 21, ["2024-01-02", "2024-01-03"])
    a.write_sensitivity(frame)
    with_dates = frame.assign(date=[d.date() for d in frame["date"]])
    b.write_sensitivity(with_dates)
    pd.testing.assert_frame_equal(a.read_sensitivity(), b.read_sensitivity())


def test_read_sensitivity_filters_by_file_name(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_sensitivity(
        pd.concat(
            [
                sens_frame("^GSPC", "AAPL", 252, ["2024-01-02"]),
                sens_frame("^GSPC", "AAPL", 0, ["2024-01-02"]),
                sens_frame("^IXIC", "AAPL", 252, ["2024-01-02"]),
                sens_frame("^GSPC", "MSFT", 252, ["2024-01-02"]),
            ]
        )
    )
    got = rs.read_sensitivity(index_ticker="^GSPC", window=252, tickers=["AAPL", "MSFT"])
    assert got[["index_ticker", "ticker", "window"]].values.tolist() == [
        ["^GSPC", "AAPL", 252],
        ["^GSPC", "MSFT", 252],
    ]
    assert len(rs.read_sensitivity(tickers=["AAPL"])) == 3
    assert rs.read_sensitivity(tickers=["NONE"]).empty


def test_read_sensitivity_of_nothing_is_an_empty_table_with_the_columns(tmp_path: Path) -> None:
    empty = ReportStore(tmp_path).read_sensitivity()
    assert empty.empty
    assert list(empty.columns) == list(SENSITIVITY_COLUMNS)
    assert ReportStore(tmp_path).read_summary().columns.tolist() == list(SUMMARY_COLUMNS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["r2", "alpha_se"]), "missing column\\(s\\) alpha_se, r2"),
        (lambda f: f.assign(extra=1.0), "unknown column\\(s\\) extra"),
        (lambda f: f.assign(beta=f["beta"].astype(str)), "column beta must hold double values"),
        (lambda f: f.assign(n_obs=np.where(f.index == 0, np.nan, 5.0)), "column n_obs has 1 missing value"),
        (
            lambda f: f.assign(n_obs=f["n_obs"] + 0.5),
            "column n_obs .* cannot be stored as int64 without loss",
        ),
        (
            lambda f: f.assign(date=f["date"] + pd.Timedelta(hours=1)),
            "column date must hold dates, got a time",
        ),
        (
            lambda f: f.assign(date=f["date"].dt.tz_localize("UTC")),
            "column date must hold dates, got tz-aware",
        ),
        (lambda f: f.assign(ticker="aapl"), "ticker 'aapl' is not a normalised symbol; use 'AAPL'"),
        (
            lambda f: f.assign(date=f["date"].iloc[0]),
            "AAPL against \\^GSPC \\(window 252\\) has date .* more than once",
        ),
    ],
    ids=[
        "missing",
        "extra",
        "text-in-float",
        "null-int",
        "fractional-int",
        "time-of-day",
        "tz-aware",
        "case",
        "dup",
    ],
)
def test_write_sensitivity_refuses_bad_frames_before_writing(
    tmp_path: Path, change: Any, message: str
) -> None:
    rs = ReportStore(tmp_path)
    frame = sens_frame("^GSPC", "AAPL", 252, ["2024-01-02", "2024-01-03"])
    with pytest.raises(DataValidationError, match=message):
        rs.write_sensitivity(change(frame))
    assert not rs.sensitivity_dir.exists()


def test_write_sensitivity_refuses_an_implausible_ticker(tmp_path: Path) -> None:
    frame = sens_frame("^GSPC", "AAPL", 252, ["2024-01-02"]).assign(ticker="../../etc")
    with pytest.raises(ConfigError, match="not a plausible ticker"):
        ReportStore(tmp_path).write_sensitivity(frame)
    assert not (tmp_path / "reports").exists()


def test_float32_results_are_widened_never_narrowed(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    frame = sens_frame("^GSPC", "AAPL", 252, ["2024-01-02"])
    frame["beta"] = np.float32(1.1)
    rs.write_sensitivity(frame)
    assert rs.read_sensitivity()["beta"].iloc[0] == float(np.float32(1.1))


@pytest.mark.parametrize("kind", ["sensitivity", "summary"])
def test_report_folders_read_as_one_table_with_pandas_and_pyarrow(tmp_path: Path, kind: str) -> None:
    rs = ReportStore(tmp_path)
    combos = [("^GSPC", "AAPL", 252), ("^GSPC", "EURUSD=X", 252), ("^GSPC", "BRK-B", 0)]
    if kind == "sensitivity":
        rs.write_sensitivity(pd.concat([sens_frame(*c, ["2024-01-02", "2024-01-03"]) for c in combos]))
        folder, columns, rows = rs.sensitivity_dir, SENSITIVITY_COLUMNS, 6
    else:
        rs.write_summary(summary_frame("2024-01-02", combos))
        rs.write_summary(summary_frame("2024-01-03", combos[:1]))
        folder, columns, rows = rs.summary_dir, SUMMARY_COLUMNS, 4
    got = pd.read_parquet(folder)
    assert list(got.columns) == list(columns)  # no partition columns were discovered
    assert len(got) == rows
    assert got["date"].iloc[0] in {dt.date(2024, 1, 2), dt.date(2024, 1, 3)}
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.schema.names == list(columns)
    assert table.num_rows == rows
    assert pq.read_table(folder).num_rows == rows
    assert set(got["ticker"]) == {t for _, t, _ in combos}


# ------------------------------------------------------------------------------ summary


def test_write_summary_replaces_rows_of_the_same_as_of_and_keeps_other_days(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_summary(summary_frame("2024-01-02", [("^GSPC", "AAPL", 252), ("^GSPC", "MSFT", 252)], seed=1))
    day1 = rs.summary_path("2024-01-02")
    day1_bytes = day1.read_bytes()
    rs.write_summary(summary_frame("2024-01-03", [("^GSPC", "AAPL", 252)], seed=2))
    assert day1.read_bytes() == day1_bytes  # earlier days stay untouched
    rerun = summary_frame("2024-01-03", [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 0)], seed=3)
    rs.write_summary(rerun)
    rs.write_summary(summary_frame("2024-01-03", [("^GSPC", "MSFT", 252)], seed=4))
    all_rows = rs.read_summary()
    assert all_rows[["as_of", "ticker", "window"]].values.tolist() == [
        [dt.date(2024, 1, 2), "AAPL", 252],
        [dt.date(2024, 1, 2), "MSFT", 252],
        [dt.date(2024, 1, 3), "AAPL", 252],
        [dt.date(2024, 1, 3), "KO", 0],
        [dt.date(2024, 1, 3), "MSFT", 252],
    ]
    latest_aapl = all_rows[(all_rows["as_of"] == dt.date(2024, 1, 3)) & (all_rows["ticker"] == "AAPL")]
    assert latest_aapl["beta"].iloc[0] == rerun["beta"].iloc[0]  # replaced by the rerun
    one_day = rs.read_summary(as_of=dt.date(2024, 1, 2))
    assert one_day["ticker"].tolist() == ["AAPL", "MSFT"]
    assert rs.read_summary(as_of="2030-01-01").empty


def test_write_summary_handles_several_as_of_dates_at_once(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    frame = pd.concat(
        [
            summary_frame("2024-01-02", [("^GSPC", "AAPL", 252)]),
            summary_frame("2024-01-03", [("^GSPC", "AAPL", 252)]),
        ]
    )
    paths = rs.write_summary(frame)
    assert [p.name for p in paths] == ["summary-2024-01-02.parquet", "summary-2024-01-03.parquet"]


def test_write_summary_refuses_duplicate_keys(tmp_path: Path) -> None:
    frame = summary_frame("2024-01-02", [("^GSPC", "AAPL", 252), ("^GSPC", "AAPL", 252)])
    with pytest.raises(DataValidationError, match="appears more than once for one as_of"):
        ReportStore(tmp_path).write_summary(frame)
    with pytest.raises(DataValidationError, match="missing column\\(s\\) as_of"):
        ReportStore(tmp_path).write_summary(frame.drop(columns=["as_of"]))


def test_corrupt_summary_is_not_silently_overwritten(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_summary(summary_frame("2024-01-02", [("^GSPC", "AAPL", 252)]))
    rs.summary_path("2024-01-02").write_bytes(b"junk")
    with pytest.raises(StoreError, match=r"summary-2024-01-02\.parquet is not a readable Parquet file"):
        rs.write_summary(summary_frame("2024-01-02", [("^GSPC", "MSFT", 252)]))
    assert rs.summary_path("2024-01-02").read_bytes() == b"junk"


# ------------------------------------------------------------------------------ daily report


def test_write_report_writes_html_and_a_pretty_sorted_manifest(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    manifest = {
        "z": 1,
        "a": {"nan": float("nan"), "inf": np.inf, "n": np.int64(3), "x": np.float64(0.5)},
        "l": (1, True),
    }
    html_path, manifest_path = rs.write_report(dt.date(2024, 1, 3), b"<html>ok</html>", manifest)
    assert html_path == tmp_path / "reports" / "daily" / "2024-01-03" / "report.html"
    assert html_path.read_bytes() == b"<html>ok</html>"
    text = manifest_path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": {"inf": None, "n": 3, "nan": None, "x": 0.5}, "l": [1, True], "z": 1}
    assert text.startswith('{\n  "a"')
    assert "NaN" not in text
    assert visible(html_path.parent) == ["manifest.json", "report.html"]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"when": dt.date(2024, 1, 1)}, r"manifest\['when'\] is a date"),
        ({"a": [{"p": Path("x")}]}, r"manifest\['a'\]\[0\]\['p'\] is a PosixPath"),
        ({1: "x"}, "must be a string"),
    ],
    ids=["date", "path", "int-key"],
)
def test_write_report_refuses_non_json_values_before_writing(
    tmp_path: Path, manifest: Any, message: str
) -> None:
    rs = ReportStore(tmp_path)
    with pytest.raises(TypeError, match=message):
        rs.write_report(dt.date(2024, 1, 3), b"<html/>", manifest)
    assert not rs.daily_dir.exists()
    with pytest.raises(TypeError, match="html must be bytes"):
        rs.write_report(dt.date(2024, 1, 3), "<html/>", {})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ lock

_HOLDER = """
import sys
from sensitivity.store import store_lock
with store_lock(sys.argv[1], timeout_s=5):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_lock_is_exclusive_across_processes(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    msg = (
        rf"another run \(pid {holder.pid}, started \d{{4}}-\d\d-\d\dT[^)]*\) is writing to {tmp_path}; "
        r"wait for it to finish or pass a different --data-dir"
    )
    t0 = time.monotonic()
    with pytest.raises(StoreLockedError, match=msg), store_lock(tmp_path, timeout_s=0.3, poll_s=0.05):
        pass
    assert 0.25 <= time.monotonic() - t0 < 5
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(timeout=10)
    with store_lock(tmp_path, timeout_s=5) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_waiting_run_takes_the_lock_soon_after_it_is_released(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """Writers hold the lock for milliseconds at a time: a waiter polls from a millisecond up
    (doubling to poll_s), so it does not sleep a whole poll_s after the lock came free."""
    assert holder.stdin is not None

    def release_soon() -> None:
        time.sleep(0.3)
        holder.stdin.write("\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]

    threading.Thread(target=release_soon).start()
    t0 = time.monotonic()
    with store_lock(tmp_path, timeout_s=30, poll_s=10.0):
        waited = time.monotonic() - t0
    assert 0.25 <= waited < 3.0  # at most one doubled wait late, never the 10 s poll_s


def test_threads_waiting_behind_another_runs_lock_all_name_that_run(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    """Several threads of one run wait for another run's lock: whichever gives up first -- the
    one polling the file lock or one queued behind it in this process -- names the other run."""
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            with store_lock(tmp_path, timeout_s=0.3, poll_s=0.05):
                pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    for exc in errors:
        assert isinstance(exc, StoreLockedError)
        assert f"another run (pid {holder.pid}, started " in str(exc), str(exc)


def test_lock_of_a_killed_holder_is_released(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with store_lock(tmp_path, timeout_s=5):
        pass


def test_lock_is_reentrant_in_one_thread_and_exclusive_between_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with store_lock(tmp_path, timeout_s=0.2):
                pass
        except BaseException as exc:
            errors.append(exc)

    with store_lock(tmp_path, timeout_s=1), store_lock(tmp_path, timeout_s=1):  # nesting never deadlocks
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1
    assert isinstance(errors[0], StoreLockedError)
    assert "another thread of this process" in str(errors[0])
    t = threading.Thread(target=other)  # released: the other thread gets it now
    t.start()
    t.join()
    assert len(errors) == 1


def test_lock_arguments_are_checked(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="timeout_s must be a finite number >= 0, got -1"),
        store_lock(tmp_path, timeout_s=-1),
    ):
        pass
    with pytest.raises(ValueError, match="poll_s must be > 0, got 0"), store_lock(tmp_path, poll_s=0):
        pass


def test_batch_write_failure_keeps_each_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rs = ReportStore(tmp_path)
    combos = [("^GSPC", t, 252) for t in ("AAPL", "KO", "MSFT", "PG")]
    rs.write_sensitivity(pd.concat([sens_frame(*c, ["2024-01-02"]) for c in combos]))
    before = {p.name: p.read_bytes() for p in rs.sensitivity_dir.iterdir()}
    real_replace = os.replace

    def fail_for_ko(src: str, dst: str) -> None:
        if "__KO__" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", fail_for_ko)
    with pytest.raises(StoreError, match=r"\^GSPC__KO__w252\.parquet: the disk is full"):
        rs.write_sensitivity(pd.concat([sens_frame(*c, ["2024-01-03"], seed=5) for c in combos]))
    after = {p.name: p.read_bytes() for p in rs.sensitivity_dir.iterdir()}
    assert set(after) == set(before)  # no temporary file left behind
    assert after["^GSPC__KO__w252.parquet"] == before["^GSPC__KO__w252.parquet"]
    dates = rs.read_sensitivity().groupby("ticker")["date"].first().to_dict()
    assert dates == {
        "AAPL": dt.date(2024, 1, 3),
        "KO": dt.date(2024, 1, 2),
        "MSFT": dt.date(2024, 1, 3),
        "PG": dt.date(2024, 1, 3),
    }


# ------------------------------------------------------------------------------ schema 2


def _as_version_1(frame: pd.DataFrame, kind: str) -> pa.Table:
    """A table exactly as version 1 of the store wrote it (the columns of that version only)."""
    schema = SUMMARY_SCHEMA if kind == "summary" else SENSITIVITY_SCHEMA
    v1 = [n for n in schema.names if n not in store_mod._V2_ADDED and n != "fit"]
    table = store_mod.table_from_frame(frame, schema, kind).select(v1)
    meta = {b"sensitivity.schema_version": b"1", b"sensitivity.kind": kind.encode()}
    return table.replace_schema_metadata(meta)


def test_version_1_report_files_are_read_with_the_new_columns_filled(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    old = sens_frame("^GSPC", "AAPL", 252, ["2024-01-02", "2024-01-03"], seed=5)
    path = rs.sensitivity_path("^GSPC", "AAPL", 252)
    path.parent.mkdir(parents=True)
    pq.write_table(_as_version_1(old, "sensitivity"), path)
    rs.write_sensitivity(sens_frame("^GSPC", "MSFT", 252, ["2024-01-03"], seed=6))  # a version-2 file
    back = rs.read_sensitivity()
    assert list(back.columns) == list(SENSITIVITY_COLUMNS)
    aapl = back[back["ticker"] == "AAPL"]
    assert (aapl["se_type"] == "classical").all()  # version 1 was always classical OLS ...
    assert (aapl["risk_free_return"] == 0.0).all()  # ... on raw returns
    assert aapl["gamma_p"].isna().all()
    assert aapl["huber_beta"].isna().all()
    np.testing.assert_array_equal(aapl["beta"], old["beta"])
    assert (back.loc[back["ticker"] == "MSFT", "se_type"] == "hac").all()

    summary = summary_frame("2024-01-03", [("^GSPC", "AAPL", 252)], seed=7)
    spath = rs.summary_path("2024-01-03")
    spath.parent.mkdir(parents=True)
    pq.write_table(_as_version_1(summary, "summary"), spath)
    got = rs.read_summary()
    assert list(got.columns) == list(SUMMARY_COLUMNS)
    assert got["fit"].tolist() == ["ols"]
    assert got["se_type"].tolist() == ["classical"]
    # A rerun for that as_of keeps the old file's other rows, now in version 2.
    rs.write_summary(summary_frame("2024-01-03", [("^GSPC", "KO", 0)], seed=8))
    assert rs.read_summary()["ticker"].tolist() == ["AAPL", "KO"]
    assert pq.read_schema(spath).metadata[b"sensitivity.schema_version"] == b"2"


def test_a_version_1_file_lacking_an_old_column_is_still_refused(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    path = rs.sensitivity_path("^GSPC", "AAPL", 252)
    path.parent.mkdir(parents=True)
    table = _as_version_1(sens_frame("^GSPC", "AAPL", 252, ["2024-01-02"]), "sensitivity")
    pq.write_table(table.drop_columns(["beta"]), path)
    with pytest.raises(StoreError, match="lacks column"):
        rs.read_sensitivity()


def scenario_frame(
    as_of: str, rows: list[tuple[str, str, int]], moves=(-0.05, 0.05), seed: int = 0
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    records = []
    for index, ticker, window in rows:
        for m in moves:
            rec: dict[str, Any] = {
                "as_of": pd.Timestamp(as_of),
                "index_ticker": index,
                "ticker": ticker,
                "window": window,
                "date": pd.Timestamp(as_of),
                "n_obs": 252,
                "fit": "ols",
                "se_type": "classical",
                "level": 0.95,
                "index_move": m,
            }
            for c in store_mod.SCENARIO_COLUMNS[10:]:
                rec[c] = float(rng.normal())
            records.append(rec)
    return pd.DataFrame(records)


def test_scenarios_are_upserted_per_as_of_like_the_summary(tmp_path: Path) -> None:
    rs = ReportStore(tmp_path)
    rs.write_scenarios(scenario_frame("2024-01-02", [("^GSPC", "AAPL", 252), ("^GSPC", "MSFT", 252)], seed=1))
    day1 = rs.scenarios_path("2024-01-02")
    assert day1 == tmp_path / "reports" / "scenarios" / "scenarios-2024-01-02.parquet"
    before = day1.read_bytes()
    rs.write_scenarios(scenario_frame("2024-01-03", [("^GSPC", "AAPL", 252)], seed=2))
    assert day1.read_bytes() == before
    rerun = scenario_frame("2024-01-02", [("^GSPC", "AAPL", 252)], moves=(0.1,), seed=3)
    rs.write_scenarios(rerun)
    day = rs.read_scenarios(as_of="2024-01-02")
    assert day[["ticker", "index_move"]].values.tolist() == [["AAPL", 0.1], ["MSFT", -0.05], ["MSFT", 0.05]]
    assert day["predicted_return"].iloc[0] == rerun["predicted_return"].iloc[0]
    everything = pd.read_parquet(tmp_path / "reports" / "scenarios")
    assert len(everything) == 5
    assert list(everything.columns) == list(store_mod.SCENARIO_COLUMNS)
    assert pq.read_schema(day1).metadata[b"sensitivity.kind"] == b"scenarios"
    with pytest.raises(
        DataValidationError,
        match=r"AAPL against \^GSPC \(window 252, index_move 0\.1\) appears more than once",
    ):
        rs.write_scenarios(pd.concat([rerun, rerun]))
    assert rs.read_scenarios(as_of="2030-01-01").empty


def test_fetched_price_table_equals_the_generic_conversion() -> None:
    """The merge's direct conversion of a fetch gives the very table of the generic, validating one."""
    frame = prices(pd.bdate_range("2024-01-01", periods=60))
    frame.iloc[3, list(frame.columns).index("open")] = np.nan  # a missing value becomes a null
    frame["adj_close"] = np.nan  # a source without adjusted closes
    stamp = pd.Timestamp(T0).tz_convert("UTC")
    fast = store_mod._fetched_price_table(frame, "KO", stamp, "files")
    records = frame.assign(fetched_at=stamp, source="files")
    assert fast.equals(store_mod._price_table(records, "KO"))
    assert fast.schema == PRICE_SCHEMA
    assert fast.column("open").null_count == 1
    # A time of day is not a trading date: refused, as by the generic conversion.
    odd = frame.copy()
    odd.index = odd.index + pd.Timedelta(hours=1)
    with pytest.raises(DataValidationError, match="time of day"):
        store_mod._fetched_price_table(odd, "KO", stamp, "files")


def test_float_columns_are_the_columns_a_lookup_gives() -> None:
    """One conversion of a price frame gives each column's very values; any other frame (a
    column that is not float64, a non-consolidated frame, repeated names) the lookups'."""
    frame = prices(pd.bdate_range("2024-01-01", periods=7))
    frame.iloc[2, 0] = np.nan
    pieces = pd.concat([frame[["open", "close"]], frame[["adj_close"]] * 1.0], axis=1)  # two blocks
    mixed = frame.assign(volume=frame["volume"].astype(np.int64))
    nullable = frame.astype({"close": "Float64"})
    nullable.iloc[1, list(frame.columns).index("close")] = pd.NA
    for case in (frame, pieces, mixed, nullable, frame[["close", "open", "close"]]):
        names = [c for c in ("close", "open", "adj_close") if c in case.columns]
        got = float_columns(case, names)
        assert list(got) == names
        for name in names:
            want = np.asarray(case[name].to_numpy(dtype=np.float64, na_value=np.nan))
            assert got[name].dtype == np.float64
            assert np.array_equal(got[name], want, equal_nan=True), name
    with pytest.raises(KeyError):
        float_columns(frame, ["close", "nope"])


@pytest.mark.parametrize(
    "damage",
    [
        "no close",
        "duplicate date",
        "unsorted",
        "negative open",
        "zero adjusted close",
        "empty",
    ],
)
def test_check_price_arrays_says_what_check_price_frame_says(damage: str) -> None:
    """The merge checks its Arrow rows with the frame check's very messages."""
    frame = prices(pd.bdate_range("2024-01-01", periods=8))
    if damage == "no close":
        frame["close"] = np.nan
    elif damage == "duplicate date":
        frame.index = frame.index[[0, 1, 2, 3, 3, 5, 6, 7]]
    elif damage == "unsorted":
        frame.index = frame.index[[0, 1, 3, 2, 4, 5, 6, 7]]
    elif damage == "negative open":
        frame.iloc[5, 0] = -1.5
    elif damage == "zero adjusted close":
        frame.iloc[2, list(frame.columns).index("adj_close")] = 0.0
    else:
        frame = frame.iloc[:0]
    with pytest.raises((DataValidationError, EmptyDataError)) as by_frame:
        check_price_frame(frame, "KO")
    days = frame.index.to_numpy(dtype="datetime64[D]").astype(np.int64)
    with pytest.raises(type(by_frame.value)) as by_arrays:
        check_price_arrays(days, {c: frame[c].to_numpy() for c in POSITIVE_COLUMNS}, "KO")
    assert str(by_arrays.value) == str(by_frame.value)


def test_a_large_frame_converts_on_threads_to_the_same_table_and_names_the_first_bad_column(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above _THREADED_CONVERSION_CELLS the columns convert on threads: the table is the one
    the loop gives, and of two bad columns the error names the first in schema order."""
    dates = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("1990-01-01", periods=30_000)]
    frame = sens_frame("^GSPC", "AAPL", 252, dates)
    assert frame.size >= store_mod._THREADED_CONVERSION_CELLS
    monkeypatch.setattr(store_mod, "available_cpus", lambda: 2)
    threaded = store_mod.table_from_frame(frame, SENSITIVITY_SCHEMA, "big table")
    with monkeypatch.context() as m:
        m.setattr(store_mod, "_THREADED_CONVERSION_CELLS", 10**12)
        looped = store_mod.table_from_frame(frame, SENSITIVITY_SCHEMA, "big table")
    assert threaded.equals(looped)
    assert threaded.column("alpha").null_count == 1  # NaN became a null on the threads too
    bad = frame.copy()
    bad["n_obs"] = bad["n_obs"].astype(object)
    bad.loc[7, "n_obs"] = "seven"
    bad["gamma_p"] = "x"
    with pytest.raises(DataValidationError, match="column n_obs"):
        store_mod.table_from_frame(bad, SENSITIVITY_SCHEMA, "big table")


def test_rows_read_for_a_daily_run_survive_their_file_being_replaced_or_removed(tmp_path: Path) -> None:
    """The per-day files a daily run keeps are memory-mapped while they are decoded: a file
    replaced by a rename, as every write here does, or removed while its rows are held leaves
    the rows as they were read."""
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252)]
    days = [f"2024-01-{d:02d}" for d in range(2, 12)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    held = rs.read_sensitivity_tables(keys)
    copies = {k: pa.Table.from_pylist(t.to_pylist(), schema=t.schema) for k, (t, _) in held.items()}
    assert all(held[k][0].equals(store_mod.read_table(rs.sensitivity_path(*k), "sensitivity")) for k in keys)
    rs.write_sensitivity(sens_frame(*keys[0], days, seed=9))  # replaced by a rename
    rs.sensitivity_path(*keys[1]).unlink()  # removed
    for k in keys:
        assert held[k][0].equals(copies[k])


def test_columns_a_daily_run_discards_are_not_decoded_and_come_back_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unused`` names columns of a kept file that the caller drops: they are left out of
    the decoding and come back all null (slices of one shared array, no memory per file);
    every other column is the whole read's, and the files ``unused`` leaves alone, or that
    ``keep`` refuses, are read as before."""
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252), ("^GSPC", "MSFT", 252)]
    days = [f"2024-01-{d:02d}" for d in range(2, 12)]
    huber = [n for n in SENSITIVITY_SCHEMA.names if n.startswith("huber_")]
    frames = []
    for i, k in enumerate(keys):
        frame = sens_frame(*k, days, seed=i)
        for n in huber:
            frame[n] = np.arange(len(days), dtype=np.float64) + i  # values in every row
        frames.append(frame)
    rs.write_sensitivity(pd.concat(frames))
    whole = {k: t for k, (t, _) in rs.read_sensitivity_tables(keys).items()}
    assert all(whole[k].column(n).null_count == 0 for k in keys for n in huber)
    decoded: list[list[str]] = []
    real_read = pq.ParquetFile.read

    def spy(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> pa.Table:
        decoded.append(list(kwargs["columns"]))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    held = rs.read_sensitivity_tables(keys, unused=lambda key: huber if key[1] != "KO" else ())
    assert len(decoded) == 3
    assert sorted(len(cols) for cols in decoded) == [len(SENSITIVITY_SCHEMA) - len(huber)] * 2 + [
        len(SENSITIVITY_SCHEMA)
    ]
    assert not any(n in cols for cols in decoded for n in huber if len(cols) < len(SENSITIVITY_SCHEMA))
    for k in keys:
        table = held[k][0]
        assert table.schema.equals(whole[k].schema)
        if k[1] == "KO":
            assert table.equals(whole[k])
            continue
        for n in SENSITIVITY_SCHEMA.names:
            if n in huber:
                assert table.column(n).null_count == table.num_rows
            else:
                assert table.column(n).equals(whole[k].column(n))
    before = pa.total_allocated_bytes()
    again = rs.read_sensitivity_tables(keys[:1], keep=lambda key, stamp: False, unused=lambda key: huber)
    assert again == {}  # no stamp to keep: nothing decoded, ``unused`` not asked
    nulls = [store_mod._null_column(pa.float64(), 5000) for _ in range(20)]
    assert pa.total_allocated_bytes() - before <= 5000 * 8 + 1024  # one shared buffer at most
    assert all(a.null_count == 5000 and len(a) == 5000 for a in nulls)


def test_rewriting_files_read_whole_skips_only_the_version_check_of_unchanged_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daily run reads each per-day file whole, then writes it back with new rows: a file
    still the one it read (its version checked by the read) is not opened again for its
    version, but one replaced meanwhile -- here by a newer version of the package -- is, and
    is left alone."""
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252), ("^GSPC", "MSFT", 252)]
    days = [f"2024-01-{d:02d}" for d in range(2, 12)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    held = {k: t for k, (t, _) in rs.read_sensitivity_tables(keys[:2]).items()}  # not MSFT
    checked: list[str] = []
    real = store_mod._refuse_newer

    def counted(path: Path, kind: str) -> None:
        checked.append(path.name)
        real(path, kind)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod, "_refuse_newer", counted)
    msft = store_mod.read_table(rs.sensitivity_path(*keys[2]), "sensitivity")
    rs.write_sensitivity_tables({**held, keys[2]: msft})
    assert checked == [rs.sensitivity_path(*keys[2]).name]  # only the file not read whole
    checked.clear()
    held = {k: t for k, (t, _) in rs.read_sensitivity_tables(keys[:2]).items()}
    newer = rs.sensitivity_path(*keys[1])
    _write_with_metadata(newer, str(SCHEMA_VERSIONS["sensitivity"] + 1).encode(), kind=b"sensitivity")
    before = newer.read_bytes()
    with pytest.raises(StoreError, match="newer version"):
        rs.write_sensitivity_tables(held)
    assert checked == [newer.name]
    assert newer.read_bytes() == before


def test_a_tail_read_decodes_the_last_row_group_and_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_sensitivity_tails`` decodes only the last row group of a file whose groups
    before it a splice can keep, and gives their rows, fitted rows and first date; a file of
    one group is read whole."""
    monkeypatch.setattr(store_mod, "SENSITIVITY_ROW_GROUP", 4)
    rs = ReportStore(tmp_path)
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=11)]
    frame = sens_frame("^GSPC", "AAPL", 252, days)
    frame.loc[[0, 1, 5], "sensitivity"] = np.nan  # not fitted: null in the file
    short = sens_frame("^GSPC", "KO", 252, days[:3])
    rs.write_sensitivity(pd.concat([frame, short]))
    tails = rs.read_sensitivity_tails([("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252)])
    aapl, ko = tails[("^GSPC", "AAPL", 252)], tails[("^GSPC", "KO", 252)]
    whole = store_mod.read_table(rs.sensitivity_path("^GSPC", "AAPL", 252), "sensitivity")
    assert (aapl.skipped, aapl.skipped_fitted, aapl.rows) == (8, 5, 11)
    assert aapl.first_date == dt.date(2024, 1, 2)
    assert aapl.table.equals(whole.slice(8))
    assert aapl.kept_bytes is not None
    assert aapl.held is not None
    assert (ko.skipped, ko.kept_bytes, ko.held, ko.table.num_rows) == (0, None, None, 3)
    # StoredRows gives the file's rows back from the tail and the held file.
    rows = aapl.rows_from(aapl.table, ["date", "sensitivity"])
    assert isinstance(rows, store_mod.StoredRows)
    assert rows.read(["date", "sensitivity"]).equals(whole.select(["date", "sensitivity"]))
    assert ko.rows_from(ko.table, ["date"]).equals(ko.table.select(["date"]))


@pytest.mark.parametrize("statistics", [True, False])
def test_a_per_day_files_first_date_comes_from_its_statistics_or_its_rows(
    tmp_path: Path, statistics: bool
) -> None:
    """The first row's date: group 0's least date where statistics were written (rows are in
    date order), else decoded; the same either way."""
    days = [dt.date(2024, 1, 2) + dt.timedelta(days=i) for i in range(10)]
    path = tmp_path / "f.parquet"
    pq.write_table(
        pa.table({"date": pa.array(days, pa.date32()), "x": np.arange(10.0)}),
        path,
        row_group_size=4,
        write_statistics=statistics,
    )
    pf = pq.ParquetFile(path)
    assert pf.metadata.row_group(0).column(0).is_stats_set is statistics
    assert store_mod._first_date(pf) == dt.date(2024, 1, 2)


def test_a_tail_read_holds_no_more_files_than_the_limit_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tail read holds its file open until the write; beyond what the open-file limit
    allows (less a margin for the rest of the process) the files are read whole instead."""
    monkeypatch.setattr(store_mod, "SENSITIVITY_ROW_GROUP", 4)
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", t, 252) for t in ("AAPL", "KO", "MSFT")]
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=11)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    monkeypatch.setattr(store_mod, "_holdable", lambda n: 2)
    tails = rs.read_sensitivity_tails(keys)
    assert [tails[k].skipped for k in keys] == [8, 8, 0]
    assert tails[keys[2]].table.num_rows == 11
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    monkeypatch.undo()
    assert store_mod._holdable(3) == 3
    assert store_mod._holdable(10**9) <= max(soft, hard)


def test_a_tail_write_copies_the_file_as_read_even_if_replaced_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows before a tail are copied from the file as this run read it (held open): if
    another run renamed a file over it meanwhile, this run's file is still its own rows (as
    a whole read then a whole write gives: the last writer's file, never a mix)."""
    monkeypatch.setattr(store_mod, "SENSITIVITY_ROW_GROUP", 4)
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252)]
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=11)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    heads = {k: store_mod.read_table(rs.sensitivity_path(*k), "sensitivity").slice(0, 8) for k in keys}
    tails = rs.read_sensitivity_tails(keys)
    more = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=12)]
    grown = {
        k: store_mod.table_from_frame(sens_frame(*k, more, seed=i), SENSITIVITY_SCHEMA, "t").slice(8)
        for i, k in enumerate(keys)
    }
    ReportStore(tmp_path).write_sensitivity(sens_frame(*keys[1], days[:5], seed=7))  # another run
    rs.write_sensitivity_tables(grown, kept=tails)
    for k in keys:
        got = store_mod.read_table(rs.sensitivity_path(*k), "sensitivity")
        assert got.equals(
            pa.concat_tables([heads[k], grown[k].replace_schema_metadata(heads[k].schema.metadata)])
        )
        assert pq.read_metadata(rs.sensitivity_path(*k)).num_row_groups == 3
    with pytest.raises(DataValidationError, match="does not begin where the rows read"):
        rs.write_sensitivity_tables({keys[0]: grown[keys[0]].slice(1)}, kept=tails)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads open files in /proc")
def test_after_a_tail_write_the_rows_are_read_back_from_the_file_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a spliced file is in place, its kept rows are read back from it (its first
    groups are the held file's, byte for byte), and the file spliced from, renamed over, is
    closed by the write (its blocks freed there, not when the run lets its rows go)."""
    monkeypatch.setattr(store_mod, "SENSITIVITY_ROW_GROUP", 4)
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", "AAPL", 252), ("^GSPC", "KO", 252)]
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=11)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    tails = rs.read_sensitivity_tails(keys)
    read = {k: tails[k].held for k in keys}
    assert all(h is not None and h.metadata is not None for h in read.values())

    def links() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in out if link.startswith(f"{tmp_path}{os.sep}")]

    before = sorted(links())
    assert before == sorted(str(rs.sensitivity_path(*k)) for k in keys)
    more = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=13)]
    grown = {
        k: store_mod.table_from_frame(sens_frame(*k, more, seed=i), SENSITIVITY_SCHEMA, "t").slice(8)
        for i, k in enumerate(keys)
    }
    rs.write_sensitivity_tables(grown, kept=tails)
    assert sorted(links()) == before  # the files written, not "... (deleted)"
    for k in keys:
        held = tails[k].held
        assert held is read[k]
        assert held is not None
        assert held.metadata is not None
        path = rs.sensitivity_path(*k)
        assert os.fstat(held.fd).st_ino == os.stat(path).st_ino
        assert held.metadata.equals(pq.read_metadata(path))
        rows = tails[k].rows_from(grown[k], SENSITIVITY_SCHEMA.names)
        assert isinstance(rows, store_mod.StoredRows)
        got = rows.read(SENSITIVITY_SCHEMA.names)
        written = store_mod.read_table(path, "sensitivity")
        assert got.equals(written.replace_schema_metadata(got.schema.metadata))
    for k in keys:
        tails[k].held.close()  # type: ignore[union-attr]
    assert links() == []


def test_a_held_file_hands_over_and_refuses_reads_once_closed(tmp_path: Path) -> None:
    """:meth:`HeldFile.hold_instead`: the other file is held from then on, the first closed;
    a closed held file is never read (its number may name another file by then)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    first = store_mod.HeldFile(os.open(a, os.O_RDONLY), a)
    second = store_mod.HeldFile(os.open(b, os.O_RDONLY), b)
    old_fd = first.fd
    first.hold_instead(second)
    assert second.closed
    assert not first.closed
    assert (first.path, first.mapped().read()) == (b, b"second")
    with pytest.raises(OSError):
        os.fstat(old_fd)
    with pytest.raises(OSError, match="closed"):
        first.hold_instead(second)
    first.close()
    with pytest.raises(OSError, match="closed"):
        first.mapped()


def test_a_prepared_file_held_is_the_committed_file_or_closed_when_discarded(tmp_path: Path) -> None:
    """``PreparedFile(hold=True)``: the file stays open as ``held`` (after the commit, the
    one in place); a discarded one closes it with the temporary file."""

    def writing(data: bytes) -> Callable[[IO[bytes]], None]:
        def write(fh: IO[bytes]) -> None:
            fh.write(data)

        return write

    kept = store_mod.PreparedFile(tmp_path / "kept", writing(b"kept"), hold=True)
    assert kept.held is not None
    kept.commit()
    assert os.fstat(kept.held.fd).st_ino == os.stat(tmp_path / "kept").st_ino
    assert kept.held.mapped().read() == b"kept"
    dropped = store_mod.PreparedFile(tmp_path / "dropped", writing(b"x"), hold=True)
    assert dropped.held is not None
    dropped.discard()
    assert dropped.held.closed
    assert not (tmp_path / "dropped").exists()
    kept.held.close()


def _open_fds(folder: Path) -> int:
    """This process's open files under ``folder`` (other tests' files come and go)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}{os.sep}")
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_tail_read_of_a_file_replaced_meanwhile_is_left_out_and_nothing_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file renamed over while its last group is read is left out (its ticker is fitted in
    full), and its held file is closed; the others' are closed once their rows are let go."""
    import gc

    monkeypatch.setattr(store_mod, "SENSITIVITY_ROW_GROUP", 4)
    rs = ReportStore(tmp_path)
    keys = [("^GSPC", t, 252) for t in ("AAPL", "KO", "MSFT")]
    days = [d.strftime("%Y-%m-%d") for d in pd.bdate_range("2024-01-02", periods=11)]
    rs.write_sensitivity(pd.concat([sens_frame(*k, days, seed=i) for i, k in enumerate(keys)]))
    real = store_mod._read_opened

    def replacing(path: Path, *args: Any, **kwargs: Any) -> pa.Table:
        table = real(path, *args, **kwargs)
        if "__KO__" in path.name:
            ReportStore(tmp_path).write_sensitivity(sens_frame(*keys[1], days, seed=5))
        return table

    assert _open_fds(tmp_path) == 0
    monkeypatch.setattr(store_mod, "_read_opened", replacing)
    tails = rs.read_sensitivity_tails(keys)
    assert sorted(tails) == [keys[0], keys[2]]
    assert _open_fds(tmp_path) == 2  # the two kept files are held
    del tails
    gc.collect()
    assert _open_fds(tmp_path) == 0
