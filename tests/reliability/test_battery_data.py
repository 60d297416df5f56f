"""Battery, part 2: bad data from the files source and damaged files in the store.

Every case starts from a copy of a store holding one clean run (``files_universe``), breaks
one thing, runs ``sensitivity run`` (the CLI in this process, the real Prefect flow) and checks
the exit status, the one ``error:`` line naming the culprit, and that the culprit's stored
files are byte-identical to before (SHA-256 of every file under ``<data_dir>``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import battery
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import Universe

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _rows(text: str) -> list[str]:
    return text.splitlines()


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _set_close(text: str, row: int, value: str) -> str:
    lines = _rows(text)
    cells = lines[row].split(",")
    cells[4] = value  # Date,Open,High,Low,Close,...
    lines[row] = ",".join(cells)
    return _join(lines)


def _all_nan(text: str) -> str:
    lines = _rows(text)
    return _join([lines[0], *(line.split(",")[0] + ",,,,,," for line in lines[1:])])


def _duplicate_date(text: str) -> str:
    lines = _rows(text)
    return _join([*lines, lines[7]])


def _mixed_tz(text: str) -> str:
    lines = _rows(text)
    day = lines[1][:10]
    lines[1] = lines[1].replace(day, f"{day} 00:00:00-05:00", 1)
    return _join(lines)


def _drop_close(text: str) -> str:
    return _join([",".join(c for i, c in enumerate(line.split(",")) if i != 4) for line in _rows(text)])


def _garbage_line(text: str) -> str:
    lines = _rows(text)
    return _join([*lines[:10], "<html><body>502 Bad Gateway</body></html>", *lines[10:]])


def _foreign_download(text: str) -> str:
    lines = _rows(text)
    return _join(
        [
            "Price,Adj Close,Close,High,Low,Open,Volume",
            "Ticker,MSFT,MSFT,MSFT,MSFT,MSFT,MSFT",
            "Date,,,,,,",
            *lines[1:],
        ]
    )


#: (id, rewrite of KO.csv's text (None: random bytes), pattern of the one error line)
BAD_CSV = [
    ("all-nan-series", _all_nan, r"^error: KO: KO\.csv has no row with a price$"),
    (
        "zero-price",
        lambda t: _set_close(t, 5, "0"),
        r"^error: KO: KO\.csv line 6 \(2020-01-08\): close is 0\.0; prices must be positive",
    ),
    (
        "negative-price",
        lambda t: _set_close(t, 5, "-3.5"),
        r"^error: KO: KO\.csv line 6 \(2020-01-08\): close is -3\.5; prices must be positive",
    ),
    (
        "infinite-price",
        lambda t: _set_close(t, 5, "inf"),
        r"^error: KO: KO\.csv line 6 .*close is inf, not a finite",
    ),
    (
        "duplicated-date",
        _duplicate_date,
        r"^error: KO: KO\.csv has the date 2020-01-1\d twice \(line 8 and line 42\); keep one row per date",
    ),
    (
        "tz-aware-and-naive-dates",
        _mixed_tz,
        r"^error: KO: KO\.csv mixes dates with a UTC offset \(line 2: '2020-01-02 00:00:00-05:00'\) "
        r"and without one \(line 3",
    ),
    (
        "missing-close-column",
        _drop_close,
        r"^error: KO: KO\.csv has no Close column \(its columns: Date,Open",
    ),
    (
        "garbage-line",
        _garbage_line,
        r"^error: KO: KO\.csv line 11 has 1 fields but the header has 7; fix the line",
    ),
    (
        "garbage-cell",
        lambda t: _set_close(t, 3, "12,5O"),
        r"^error: KO: KO\.csv line 4 has 8 fields but the header has 7",
    ),
    (
        "not-a-number",
        lambda t: _set_close(t, 3, "N/A?"),
        r"^error: KO: KO\.csv line 4: close value 'N/A\?' is not a number",
    ),
    ("empty-file", lambda t: "", r"^error: KO: KO\.csv is empty \(write the header Date,Open,High,Low,Close"),
    ("header-only", lambda t: _rows(t)[0] + "\n", r"^error: KO: KO\.csv has a header but no rows"),
    ("binary-file", None, r"^error: KO: KO\.csv is not UTF-8 text \(byte \d+\); save it as UTF-8 CSV"),
    (
        "another-tickers-file",
        _foreign_download,
        r"^error: KO: KO\.csv holds prices for MSFT \(its Ticker header line\), not KO",
    ),
]


@pytest.mark.parametrize(("rewrite", "pattern"), [pytest.param(r, p, id=i) for i, r, p in BAD_CSV])
def test_bad_csv_fails_only_its_symbol_and_leaves_its_files(
    files_universe: Universe, rewrite: Callable[[str], str] | None, pattern: str
) -> None:
    u = files_universe
    path = u.csv / "KO.csv"
    if rewrite is None:
        path.write_bytes(bytes(np.random.default_rng(7).integers(128, 256, 300, dtype=np.uint8)))
    else:
        path.write_text(rewrite(path.read_text()))
    before = battery.checksums(u.data)
    summary_before = _summary_rows(u.data, "KO")
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(outcome, 3, pattern)
    after = battery.checksums(u.data)
    assert battery.files_of("KO", after) == battery.files_of("KO", before)
    pd.testing.assert_frame_equal(_summary_rows(u.data, "KO"), summary_before)
    assert "MSFT" in outcome.stdout  # the other ticker was fitted and reported
    assert battery.temp_files(u.data) == []


def _summary_rows(data: Path, ticker: str) -> pd.DataFrame:
    summary = pd.read_parquet(data / "reports" / "summary")
    return summary[summary["ticker"] == ticker].reset_index(drop=True)


def test_unsorted_dates_are_sorted_and_give_the_same_tables(files_universe: Universe) -> None:
    u = files_universe
    lines = _rows((u.csv / "KO.csv").read_text())
    (u.csv / "KO.csv").write_text(_join([lines[0], *reversed(lines[1:])]))
    before = battery.tables(u.data)
    battery.assert_succeeded(battery.run(u.config, u.data))
    battery.assert_same_tables(before, battery.tables(u.data))


def _fresh(u: Universe) -> Path:
    """An empty data folder (the case needs a first run, not an update)."""
    shutil.rmtree(u.data)
    return u.data


def test_one_row_only_has_no_return_and_is_named(files_universe: Universe) -> None:
    u = files_universe
    data = _fresh(u)
    (u.csv / "KO.csv").write_text(_join(_rows((u.csv / "KO.csv").read_text())[:2]))
    outcome = battery.run(u.config, data)
    battery.assert_refused(
        outcome,
        3,
        r"^error: KO: no date between 2020-01-01 and 2020-03-31 on which both it and \^GSPC traded",
    )
    table = pd.read_parquet(data / "reports" / "sensitivity")
    assert set(table["ticker"]) == {"MSFT"}


def test_constant_index_gives_null_fits_not_a_crash(files_universe: Universe) -> None:
    u = files_universe
    data = _fresh(u)
    flat = battery.price_frame(0)
    for col in ("open", "high", "low", "close", "adj_close"):
        flat[col] = 100.0
    (u.csv / "^GSPC.csv").write_text(battery.csv_text(flat))
    battery.assert_succeeded(battery.run(u.config, data))
    table = pd.read_parquet(data / "reports" / "sensitivity")
    assert len(table) == 2 * (battery.ROWS - 1)  # every row stays
    assert (table["index_return"] == 0.0).all()
    for col in ("alpha", "beta", "gamma", "sensitivity", "sensitivity_se", "linear_beta", "r2"):
        assert table[col].isna().all(), col  # a singular design: null, never a number or a crash
    assert table["stock_return"].notna().all()


def test_all_nan_index_fails_the_run_and_touches_no_report(files_universe: Universe) -> None:
    u = files_universe
    (u.csv / "^GSPC.csv").write_text(_all_nan((u.csv / "^GSPC.csv").read_text()))
    before = battery.checksums(u.data)
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(
        outcome, 3, r"^error: \^GSPC: the index could not be fetched: \^GSPC\.csv has no row"
    )
    after = battery.checksums(u.data)
    untouched = {k for k in before if not k.startswith("prices/") or k == "prices/^GSPC.parquet"}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}


def test_corrupt_parquet_source_file_fails_its_symbol(files_universe: Universe) -> None:
    u = files_universe
    (u.csv / "KO.csv").unlink()
    (u.csv / "KO.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    before = battery.checksums(u.data)
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(outcome, 3, r"^error: KO: KO\.parquet in .* is not a readable Parquet file")
    assert battery.files_of("KO", battery.checksums(u.data)) == battery.files_of("KO", before)


def test_csv_and_parquet_for_one_symbol_is_ambiguous(files_universe: Universe) -> None:
    u = files_universe
    battery.price_frame(1).reset_index().to_parquet(u.csv / "KO.parquet")
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(
        outcome, 3, r"^error: KO: both KO\.csv and KO\.parquet exist in .*; it is ambiguous"
    )


# -- damaged and foreign files in the store -----------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _newer(path: Path) -> None:
    table = pq.read_table(path)
    meta = dict(table.schema.metadata or {})
    meta[b"sensitivity.schema_version"] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), path)


def _foreign(path: Path) -> None:
    battery.price_frame(1).reset_index().to_parquet(path)  # plain pandas: no stock-sensitivity metadata


def _only_file(folder: Path, pattern: str) -> Path:
    (path,) = sorted(folder.glob(pattern))
    return path


#: (id, file under data_dir (glob), damage, pattern of the one error line)
STORE_CASES = [
    (
        "corrupt-price-file",
        "prices/KO.parquet",
        _truncate,
        r"^error: .*prices/KO\.parquet is not a readable Parquet file \(.*\); delete it and rerun to refetch",
    ),
    (
        "corrupt-index-price-file",
        "prices/^GSPC.parquet",
        lambda p: p.write_bytes(b"not parquet at all"),
        r"^error: .*prices/\^GSPC\.parquet is not a readable Parquet file",
    ),
    (
        "newer-schema-price-file",
        "prices/KO.parquet",
        _newer,
        r"^error: .*prices/KO\.parquet was written by a newer version of stock-sensitivity "
        r"\(schema 99 > 1\); "
        r"upgrade stock-sensitivity",
    ),
    (
        "foreign-price-file",
        "prices/KO.parquet",
        _foreign,
        r"^error: .*prices/KO\.parquet was not written by stock-sensitivity \(no sensitivity\.schema_version",
    ),
    (
        "newer-schema-sensitivity-file",
        "reports/sensitivity/*__KO__*.parquet",
        _newer,
        r"^error: .*__KO__w20\.parquet was written by a newer version of stock-sensitivity \(schema 99 > 2\)",
    ),
    (
        "corrupt-summary-file",
        "reports/summary/*.parquet",
        _truncate,
        r"^error: .*summary-2020-02-26\.parquet is not a readable Parquet file .*restore it from a backup",
    ),
    (
        "newer-schema-summary-file",
        "reports/summary/*.parquet",
        _newer,
        r"^error: .*summary-2020-02-26\.parquet was written by a newer version of stock-sensitivity",
    ),
]


@pytest.mark.parametrize(
    ("target", "damage", "pattern"), [pytest.param(t, d, p, id=i) for i, t, d, p in STORE_CASES]
)
def test_damaged_store_file_is_refused_and_left_as_it_is(
    files_universe: Universe, target: str, damage: Callable[[Path], None], pattern: str
) -> None:
    u = files_universe
    path = _only_file(u.data, target)
    damage(path)
    damaged = battery.checksums(u.data)
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(outcome, 4, pattern)
    after = battery.checksums(u.data)
    key = str(path.relative_to(u.data))
    assert after[key] == damaged[key]  # never silently replaced
    reports = {k: v for k, v in damaged.items() if k.startswith("reports/")}
    assert {k: after[k] for k in reports} == reports
    assert battery.temp_files(u.data) == []


def test_corrupt_sensitivity_file_is_recomputed(files_universe: Universe) -> None:
    """A derived file is rewritten whole from the stored prices: the run repairs it."""
    u = files_universe
    clean = battery.tables(u.data)
    _truncate(_only_file(u.data, "reports/sensitivity/*__KO__*.parquet"))
    battery.assert_succeeded(battery.run(u.config, u.data))
    battery.assert_same_tables(clean, battery.tables(u.data))


def test_stale_temporary_file_is_ignored_and_cleaned(files_universe: Universe) -> None:
    u = files_universe
    clean = battery.tables(u.data)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = u.data / "prices" / f".KO.parquet.{dead}.0123456789ab.tmp"
    stale.write_bytes(b"PAR1 half a file from a killed run")
    assert len(pd.read_parquet(u.data / "prices")) > 0  # readers skip it
    battery.assert_succeeded(battery.run(u.config, u.data))
    assert not stale.exists()
    battery.assert_same_tables(clean, battery.tables(u.data))


def test_data_dir_that_is_a_file_is_refused(files_universe: Universe, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    outcome = battery.run(files_universe.config, target)
    battery.assert_refused(
        outcome,
        2,
        r"output\.data_dir must be a folder, not a file \(name a new or existing folder\), got '.*a-file'",
    )
    assert target.read_text() == "not a folder"
