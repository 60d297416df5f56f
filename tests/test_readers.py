"""The stored tables as analysts read them: pandas, polars and DuckDB see the same table.

The SPEC promises Parquet "readable by pandas, polars, DuckDB".  Each folder the pipeline
writes (``prices/``, ``reports/sensitivity/``, ``summary/``, ``scenarios/``) is read whole by
each of them and compared value for value: the same rows, the same keys and dates, float64
numbers to the bit, and a missing value as a null (``IS NULL`` in DuckDB, ``is_null()`` in
polars, NaN in pandas).  Run on the bundled sample (no Prefect, no network).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from sensitivity.config import load_config
from sensitivity.pipeline import fetch_symbol, fit_universe

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("prices", "reports/sensitivity", "reports/summary", "reports/scenarios")
KEYS = {
    "prices": ["date"],  # one file per symbol, without a symbol column: compared file by file
    "reports/sensitivity": ["index_ticker", "ticker", "window", "date"],
    "reports/summary": ["as_of", "index_ticker", "ticker", "window"],
    "reports/scenarios": ["as_of", "index_ticker", "ticker", "window", "index_move"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("readers")
    cfg = load_config(
        ROOT / "config" / "sample.toml",
        {
            "tickers": ["AAPL", "KO", "SPY"],
            "start": dt.date(2016, 1, 1),
            "data_dir": data,
            "window": 126,
            "min_obs": 60,
        },
    )
    for symbol in cfg.fetch_symbols:
        fetch_symbol(cfg, symbol)
    fit_universe(cfg, list(cfg.universe.tickers))
    return data


def _pandas(folder: Path, keys: list[str]) -> pd.DataFrame:
    frame = pd.read_parquet(folder)
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _compare(reference: pd.DataFrame, other: pa.Table, where: str) -> None:
    """``other`` (what polars or DuckDB read, as Arrow) holds ``reference``'s table."""
    assert other.column_names == list(reference.columns), where
    assert other.num_rows == len(reference), where
    for name in reference.columns:
        ours, theirs = reference[name], other.column(name)
        if pd.api.types.is_float_dtype(ours.dtype):
            assert pa.types.is_float64(theirs.type), (where, name, theirs.type)
            values = theirs.to_numpy(zero_copy_only=False)
            # Nulls stay nulls (never NaN payloads), every other value to the bit.
            assert theirs.null_count == int(ours.isna().sum()), (where, name)
            np.testing.assert_array_equal(
                np.isnan(values), ours.isna().to_numpy(), err_msg=f"{where}: {name}"
            )
            present = ~ours.isna().to_numpy()
            np.testing.assert_array_equal(
                values[present].view(np.int64), ours.to_numpy()[present].view(np.int64), err_msg=name
            )
        elif name in ("date", "as_of"):
            assert pa.types.is_date32(theirs.type), (where, name, theirs.type)
            assert theirs.to_pylist() == list(ours), (where, name)
        else:
            assert theirs.null_count == 0, (where, name)
            assert theirs.to_pylist() == ours.tolist(), (where, name)


@pytest.mark.parametrize("folder", FOLDERS)
def test_polars_reads_each_folder_as_pandas_does(data_dir: Path, folder: str) -> None:
    path = data_dir / folder
    keys = KEYS[folder]
    if folder == "prices":
        files = sorted(path.glob("*.parquet"))
        assert len(files) == 4  # ^GSPC and the three tickers
        for file in files:
            _compare(_pandas(file, keys), pl.read_parquet(file).sort(keys).to_arrow(), file.name)
        return
    theirs = pl.read_parquet(path / "*.parquet").sort(keys, maintain_order=True)
    _compare(_pandas(path, keys), theirs.to_arrow(), folder)


@pytest.mark.parametrize("folder", FOLDERS)
def test_duckdb_reads_each_folder_as_pandas_does(data_dir: Path, folder: str) -> None:
    path = data_dir / folder
    keys = KEYS[folder]
    files = sorted(path.glob("*.parquet")) if folder == "prices" else [path]
    with duckdb.connect() as db:
        for file in files:
            pattern = str(file) if file.is_file() else str(file / "*.parquet")
            order = ", ".join(f'"{k}"' for k in keys)
            result = db.sql(f"SELECT * FROM read_parquet($path) ORDER BY {order}", params={"path": pattern})
            theirs = result.arrow()
            if isinstance(theirs, pa.RecordBatchReader):  # DuckDB 2 answers a stream
                theirs = theirs.read_all()
            _compare(_pandas(file, keys), theirs, str(file.relative_to(data_dir)))


def test_a_missing_value_is_null_to_duckdb_and_polars(data_dir: Path) -> None:
    # The first windows of each ticker have too few returns for a fit: no sensitivity.
    folder = data_dir / "reports" / "sensitivity"
    expected = int(pd.read_parquet(folder)["sensitivity"].isna().sum())
    assert expected > 0
    with duckdb.connect() as db:
        (nulls,) = db.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE sensitivity IS NULL", [str(folder / "*.parquet")]
        ).fetchone()
        (nans,) = db.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE isnan(sensitivity)", [str(folder / "*.parquet")]
        ).fetchone()
    assert (nulls, nans) == (expected, 0)
    frame = pl.read_parquet(folder / "*.parquet")
    assert frame["sensitivity"].is_null().sum() == expected
    assert frame["sensitivity"].is_nan().sum() == 0
