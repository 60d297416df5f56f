"""The sample source: the project's own Parquet format, read column by column."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.prices import PRICE_COLUMNS
from sensitivity.sources import PriceSource, SampleSource
from sensitivity.sources.sample import DEFAULT_SAMPLE_DIR, sample_price_frame

D = dt.date

#: The schema the bundled sample files are written with.
SAMPLE_SCHEMA = pa.schema(
    [
        ("date", pa.date32()),
        *[(c, pa.float64()) for c in PRICE_COLUMNS],
        ("fetched_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
    ]
)


def sample_table(dates: list[dt.date], close: list[float], *, adj: bool = True) -> pa.Table:
    n = len(dates)
    values = np.asarray(close, dtype=np.float64)
    columns = {
        "date": dates,
        "open": values * 0.99,
        "high": values * 1.01,
        "low": values * 0.98,
        "close": values,
        "adj_close": values * 0.9 if adj else np.full(n, np.nan),
        "volume": np.arange(n, dtype=np.float64) * 1000 + 1,
        "dividends": np.full(n, np.nan),
        "splits": np.full(n, np.nan),
        "fetched_at": [pd.Timestamp("2024-05-01 12:00", tz="UTC")] * n,
        "source": ["sample"] * n,
    }
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "sample"
    folder.mkdir()
    dates = [d.date() for d in pd.bdate_range("2019-02-18", "2019-03-01")]
    closes = [100.0 + i + 0.123456789012345 for i in range(len(dates))]
    pq.write_table(sample_table(dates, closes), folder / "AAPL.parquet")
    pq.write_table(sample_table(dates, closes, adj=False), folder / "^GSPC.parquet")
    return folder


def test_sample_reads_price_columns_exactly(sample_dir: Path) -> None:
    source = SampleSource(sample_dir)
    frame = source.fetch("aapl", D(2019, 2, 19), D(2019, 2, 22))
    assert isinstance(source, PriceSource)
    assert source.name == "sample"
    assert list(frame.columns) == list(PRICE_COLUMNS)
    assert (frame.dtypes == np.float64).all()
    assert frame.index.name == "date"
    assert frame.index.tz is None
    assert frame.index.dtype == "datetime64[ns]"
    assert [str(d.date()) for d in frame.index] == ["2019-02-19", "2019-02-20", "2019-02-21", "2019-02-22"]
    assert frame["close"].tolist() == [
        101.123456789012345,
        102.123456789012345,
        103.123456789012345,
        104.123456789012345,
    ]
    assert frame[["dividends", "splits"]].isna().all().all()


def test_sample_index_without_adjusted_close(sample_dir: Path) -> None:
    frame = SampleSource(sample_dir).fetch("^GSPC", D(2019, 2, 18), D(2019, 3, 1))
    assert len(frame) == 10
    assert frame["adj_close"].isna().all()


def test_sample_unknown_symbol_lists_the_available_ones(sample_dir: Path) -> None:
    with pytest.raises(
        SymbolNotFoundError, match=r"^MSFT: not in the bundled sample \(available: AAPL, \^GSPC\)"
    ):
        SampleSource(sample_dir).fetch("MSFT", D(2019, 1, 1), D(2019, 12, 31))


def test_sample_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"AAPL: the sample folder .* does not exist"):
        SampleSource(tmp_path / "none").fetch("AAPL", D(2019, 1, 1), D(2019, 12, 31))


def test_sample_range_without_rows(sample_dir: Path) -> None:
    with pytest.raises(
        EmptyDataError,
        match=r"AAPL: the bundled sample has no prices between 2020-01-01 and "
        r"2020-12-31 \(it has prices from 2019-02-18 to 2019-03-01",
    ):
        SampleSource(sample_dir).fetch("AAPL", D(2020, 1, 1), D(2020, 12, 31))


def test_sample_bad_arguments(sample_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"start 2019-03-01 is after end 2019-02-01"):
        SampleSource(sample_dir).fetch("AAPL", D(2019, 3, 1), D(2019, 2, 1))
    with pytest.raises(ConfigError, match=r"not a plausible ticker"):
        SampleSource(sample_dir).fetch("../AAPL", D(2019, 1, 1), D(2019, 2, 1))


def test_sample_file_lacking_a_column(sample_dir: Path) -> None:
    table = sample_table([D(2019, 1, 2)], [1.0]).drop_columns(["splits"])
    pq.write_table(table, sample_dir / "BAD.parquet")
    with pytest.raises(DataValidationError, match=r"BAD: sample file .* lacks a column"):
        SampleSource(sample_dir).fetch("BAD", D(2019, 1, 1), D(2019, 1, 31))


def test_sample_price_frame_refuses_bad_prices() -> None:
    with pytest.raises(
        DataValidationError, match=r"X: open is .*-0\.99.* on 2019-01-03; prices must be positive"
    ):
        sample_price_frame(sample_table([D(2019, 1, 2), D(2019, 1, 3)], [1.0, -1.0]), "X")


def test_sample_default_folder_is_the_project_data_sample() -> None:
    assert Path(__file__).resolve().parents[1] / "data" / "sample" == DEFAULT_SAMPLE_DIR
    assert SampleSource().folder == DEFAULT_SAMPLE_DIR


@pytest.mark.skipif(
    not (DEFAULT_SAMPLE_DIR / "^GSPC.parquet").is_file(), reason="the bundled sample is not built yet"
)
def test_sample_bundled_files_read() -> None:
    source = SampleSource()
    assert "^GSPC" in source.symbols()
    for symbol in source.symbols():
        frame = source.fetch(symbol, D(2009, 1, 1), D(2019, 12, 31))
        assert len(frame) > 2000
        assert np.isfinite(frame["close"]).all()
