"""The files source: every accepted layout, exact float64 values, and every refusal's message."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from yahoo_stub import FIXTURES, iter_chart_bars, load_recorded

from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.prices import PRICE_COLUMNS
from sensitivity.sources import FilesSource, PriceSource
from sensitivity.sources.files import (
    canonical_column,
    csv_price_frame,
    csv_price_frame_fast,
    csv_price_frame_reference,
    table_price_frame,
)

D = dt.date
YF_DOWNLOAD_AAPL = FIXTURES / "files" / "yf_download" / "AAPL.csv"

CLASSIC = """Date,Open,High,Low,Close,Adj Close,Volume
2019-02-19,169.710007,171.440002,169.490005,170.929993,167.617996,18972800
2019-02-20,171.190002,173.320007,170.990005,172.029999,168.696671,26114400
2019-02-21,171.800003,172.369995,170.300003,171.059998,167.745453,17249700
2019-02-22,171.580002,173.000000,171.380005,172.970001,169.618439,18913200
"""


def write(folder: Path, name: str, text: str, newline: str = "\n") -> Path:
    path = folder / name
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "prices"
    path.mkdir()
    return path


# -- layouts ---------------------------------------------------------------------------------------


def test_files_classic_csv_exact_values(folder: Path) -> None:
    write(folder, "AAPL.csv", CLASSIC)
    source = FilesSource(folder)
    frame = source.fetch("AAPL", D(2019, 2, 19), D(2019, 2, 22))
    assert isinstance(source, PriceSource)
    assert source.name == f"files:{folder}"
    assert list(frame.columns) == list(PRICE_COLUMNS)
    assert (frame.dtypes == np.float64).all()
    assert frame.index.name == "date"
    assert frame.index.tz is None
    assert frame.index.freq is None
    assert frame.index.dtype == "datetime64[ns]"
    assert frame["close"].tolist() == [170.929993, 172.029999, 171.059998, 172.970001]
    assert frame["adj_close"].iloc[-1] == 169.618439
    assert frame["volume"].iloc[0] == 18972800.0
    assert frame[["dividends", "splits"]].isna().all().all()  # a classic CSV reports no actions


def test_files_values_are_parsed_exactly_as_written(folder: Path) -> None:
    rng = np.random.default_rng(3)
    # Five decades of magnitudes, sorted so that no day-over-day move looks like a 100x
    # unit mix-up to the boundary checks.
    values = np.sort(10.0 ** rng.uniform(-2.0, 3.7, 400))
    texts = [repr(float(v)) if i % 2 else f"{v:.6f}" for i, v in enumerate(values)]
    dates = pd.bdate_range("2001-01-01", periods=len(texts))
    rows = "\n".join(f"{d.date()},{t}" for d, t in zip(dates, texts, strict=True))
    write(folder, "X.csv", f"Date,Close\n{rows}\n")
    frame = FilesSource(folder).fetch("X", D(2000, 1, 1), D(2030, 1, 1))
    assert frame["close"].tolist() == [float(t) for t in texts]  # correctly rounded, as written
    assert frame[["open", "high", "low", "adj_close", "volume"]].isna().all().all()


def test_files_yf_download_three_header_csv_with_crlf() -> None:
    raw = YF_DOWNLOAD_AAPL.read_bytes()
    assert raw.startswith(
        b"Price,Adj Close,Close,Dividends,High,Low,Open,Stock Splits,Volume\r\nTicker,AAPL,"
    )
    frame = FilesSource(YF_DOWNLOAD_AAPL.parent).fetch("AAPL", D(2020, 8, 31), D(2020, 11, 6))
    body = load_recorded("AAPL")
    bars = [bar for _, bar in iter_chart_bars(body)]
    assert len(frame) == 49
    assert frame["close"].tolist() == [b["close"] for b in bars]
    assert frame["adj_close"].tolist() == [b["adjclose"] for b in bars]
    assert frame["high"].tolist() == [b["high"] for b in bars]
    assert frame.loc["2020-08-31", "splits"] == 4.0
    assert frame.loc["2020-11-06", "dividends"] == 0.205


def test_files_three_header_csv_written_by_hand(folder: Path) -> None:
    text = (
        "Price,Close,High,Low,Open,Volume\n"
        "Ticker,SPY,SPY,SPY,SPY,SPY\n"
        "Date,,,,,\n"
        "2024-01-02,472.6499938964844,473.6700134277344,470.489990234375,472.1600036621094,123623700\n"
        "2024-01-03,468.7900085449219,471.19000244140625,468.1700134277344,470.42999267578125,103585900\n"
    )
    write(folder, "SPY.csv", text, newline="\r\n")
    frame = FilesSource(folder).fetch("SPY", D(2024, 1, 1), D(2024, 1, 31))
    assert frame["close"].tolist() == [472.6499938964844, 468.7900085449219]
    assert frame["adj_close"].isna().all()  # no Adj Close: the model falls back to close


def test_files_history_csv_with_tz_offsets_and_actions(folder: Path) -> None:
    text = (
        "Date,Open,High,Low,Close,Volume,Dividends,Stock Splits\n"
        "2020-11-05 00:00:00-05:00,117.95,119.62,116.87,119.03,126387100,0.0,0.0\n"
        "2020-11-06 00:00:00-05:00,118.32,119.2,116.13,118.69,114457900,0.205,0.0\n"
        "2021-03-12 00:00:00-05:00,1.0,1.0,1.0,1.0,1,0.0,0.0\n"
        "2021-03-15 00:00:00-04:00,2.0,2.0,2.0,2.0,2,0.0,2.0\n"
    )
    write(folder, "AAPL.csv", text)
    frame = FilesSource(folder).fetch("AAPL", D(2020, 1, 1), D(2021, 12, 31))
    assert [str(d.date()) for d in frame.index] == ["2020-11-05", "2020-11-06", "2021-03-12", "2021-03-15"]
    assert frame["dividends"].tolist() == [0.0, 0.205, 0.0, 0.0]
    assert frame["splits"].tolist() == [0.0, 0.0, 0.0, 2.0]


def test_files_dividends_without_splits(folder: Path) -> None:
    write(folder, "KO.csv", "Date,Close,Dividends\n2020-01-02,54.0,0\n2020-01-03,54.5,0.41\n")
    frame = FilesSource(folder).fetch("KO", D(2020, 1, 2), D(2020, 1, 3))
    assert frame["dividends"].tolist() == [0.0, 0.41]
    assert frame["splits"].isna().all()


def test_files_index_and_class_share_symbols(folder: Path) -> None:
    write(folder, "^GSPC.csv", CLASSIC)
    write(folder, "BRK-B.csv", CLASSIC)
    source = FilesSource(folder)
    assert len(source.fetch("^gspc", D(2019, 2, 19), D(2019, 2, 19))) == 1
    assert len(source.fetch("BRK-B", D(2019, 2, 20), D(2019, 2, 21))) == 2


def test_files_null_rows_dropped_unsorted_rows_sorted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = CLASSIC.strip().split("\n")
    text = "\n".join([lines[0], lines[3], "2019-02-20,null,null,null,null,null,null", lines[1], lines[4]])
    write(folder, "X.csv", text + "\n")
    caplog.set_level("INFO", logger="sensitivity.sources.files")
    frame = FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))
    assert [str(d.date()) for d in frame.index] == ["2019-02-19", "2019-02-21", "2019-02-22"]
    assert "sorted them by date" in caplog.text
    assert "dropped 1 row(s) without any price" in caplog.text


@pytest.mark.parametrize("names", ["yahoo", "project"])
def test_files_parquet(folder: Path, names: str) -> None:
    frame = pd.read_csv(pd.io.common.StringIO(CLASSIC), dtype={"Date": str})
    if names == "yahoo":
        frame["Date"] = pd.to_datetime(frame["Date"])
        frame.set_index("Date").to_parquet(folder / "MSFT.parquet")  # Date as the index
    else:
        frame.columns = ["date", "open", "high", "low", "close", "adj_close", "volume"]
        table = pa.table(
            {
                "date": pa.array([D.fromisoformat(d) for d in frame["date"]], pa.date32()),
                **{c: pa.array(frame[c], pa.float64()) for c in frame.columns[1:]},
                "fetched_at": pa.array([pd.Timestamp("2024-01-01", tz="UTC")] * 4, pa.timestamp("us", "UTC")),
                "source": pa.array(["yahoo"] * 4),
            }
        )
        pq.write_table(table, folder / "MSFT.parquet")
    got = FilesSource(folder).fetch("MSFT", D(2019, 2, 20), D(2019, 2, 22))
    assert got["close"].tolist() == [172.029999, 171.059998, 172.970001]
    assert got["volume"].tolist() == [26114400.0, 17249700.0, 18913200.0]


def test_files_parquet_with_tz_aware_timestamps_uses_the_local_date(folder: Path) -> None:
    index = pd.DatetimeIndex(["2021-03-12", "2021-03-15"]).tz_localize("America/New_York").rename("Date")
    pd.DataFrame({"Close": [1.5, 2.5]}, index=index).to_parquet(folder / "X.parquet")
    frame = FilesSource(folder).fetch("X", D(2021, 3, 1), D(2021, 3, 31))
    assert [str(d.date()) for d in frame.index] == ["2021-03-12", "2021-03-15"]


def test_canonical_column() -> None:
    assert canonical_column(" Adj Close ") == "adj_close"
    assert canonical_column("adj_close") == "adj_close"
    assert canonical_column("Stock Splits") == "splits"
    assert canonical_column("Capital Gains") is None


def test_files_range_is_inclusive_and_empty_range_is_an_error(folder: Path) -> None:
    write(folder, "AAPL.csv", CLASSIC)
    source = FilesSource(folder)
    assert len(source.fetch("AAPL", D(2019, 2, 20), D(2019, 2, 21))) == 2
    with pytest.raises(EmptyDataError, match=r"AAPL: AAPL's file in .* has no prices between 2020-01-01 and"):
        source.fetch("AAPL", D(2020, 1, 1), D(2020, 2, 1))
    with pytest.raises(ConfigError, match=r"start 2019-02-22 is after end 2019-02-19"):
        source.fetch("AAPL", D(2019, 2, 22), D(2019, 2, 19))


# -- refusals ---------------------------------------------------------------------------------------


def test_files_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"source.path .*nowhere.* is not a folder"):
        FilesSource(tmp_path / "nowhere")


def test_files_missing_file_names_symbol_files_and_folder(folder: Path) -> None:
    write(folder, "msft.csv", CLASSIC)
    with pytest.raises(
        SymbolNotFoundError,
        match=r"^MSFT: no price file .* in .*prices \(expected MSFT\.csv or "
        r"MSFT\.parquet; found msft\.csv: the name must be the upper-case symbol",
    ):
        FilesSource(folder).fetch("MSFT", D(2019, 1, 1), D(2019, 12, 31))


def test_files_both_csv_and_parquet_is_ambiguous(folder: Path) -> None:
    write(folder, "X.csv", CLASSIC)
    (folder / "X.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match=r"X: both X\.csv and X\.parquet exist .*keep one"):
        FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))


def test_files_refuses_symlinks_leaving_the_folder(folder: Path, tmp_path: Path) -> None:
    outside = write(tmp_path, "secret.csv", CLASSIC)
    os.symlink(outside, folder / "X.csv")
    os.symlink(folder / "X.csv", folder / "Y.csv")  # inside -> inside -> outside
    write(folder, "real.csv", CLASSIC)
    os.symlink(folder / "real.csv", folder / "Z.csv")  # inside -> inside: fine
    source = FilesSource(folder)
    for symbol in ("X", "Y"):
        with pytest.raises(SourceError, match=rf"{symbol}: {symbol}\.csv .* outside the folder; refusing"):
            source.fetch(symbol, D(2019, 1, 1), D(2019, 12, 31))
    assert len(source.fetch("Z", D(2019, 1, 1), D(2019, 12, 31))) == 4


@pytest.mark.parametrize("symbol", ["../X", "X/Y", "..", "A B", ""])
def test_files_refuses_implausible_symbols(folder: Path, symbol: str) -> None:
    with pytest.raises(ConfigError, match=r"symbol"):
        FilesSource(folder).fetch(symbol, D(2019, 1, 1), D(2019, 12, 31))


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        pytest.param("", EmptyDataError, r"X: X\.csv is empty", id="empty"),
        pytest.param("\n \n", EmptyDataError, r"X: X\.csv is empty", id="blank"),
        pytest.param(
            "Date,Open,High,Low,Close,Adj Close,Volume\n",
            EmptyDataError,
            r"has a header but no rows",
            id="header-only",
        ),
        pytest.param(
            "Day,Close\n2019-01-02,1\n",
            DataValidationError,
            r"X: X\.csv has no Date column \(its "
            r"columns: Day,Close\)",
            id="no-date",
        ),
        pytest.param(
            "Date,Open,Adj Close\n2019-01-02,1,1\n",
            DataValidationError,
            r"has no Close column",
            id="no-close",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,1.5\n2019-01-03,abc\n",
            DataValidationError,
            r"X\.csv line 3: close value 'abc' is not a number",
            id="bad-value",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,1.5\n01/03/2019,1.6\n",
            DataValidationError,
            r"X\.csv line 3: the date '01/03/2019' is not a date written YYYY-MM-DD",
            id="bad-date",
        ),
        pytest.param(
            "Date,Close\n2019-02-30,1.5\n",
            DataValidationError,
            r"line 2: '2019-02-30' is not a valid date",
            id="impossible-date",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,1.5,7\n",
            DataValidationError,
            r"line 2 has 3 fields but the header has 2",
            id="extra-field",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,1.5\n2019-01-03,0\n",
            DataValidationError,
            r"X: X\.csv line 3 \(2019-01-03\): close is 0\.0; prices must be positive",
            id="zero-price",
        ),
        pytest.param(
            "Date,Close,Open\n2019-01-02,1.5,-2\n",
            DataValidationError,
            r"open is -2\.0; prices must be",
            id="negative-price",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,inf\n",
            DataValidationError,
            r"close is inf, not a finite number",
            id="infinite",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,1\n2019-01-03,2\n2019-01-02,3\n",
            DataValidationError,
            r"X: X\.csv has the date 2019-01-02 twice \(line 2 and line 4\); keep one row per date",
            id="duplicate-date",
        ),
        pytest.param(
            "Date,Close\n2019-01-02 00:00:00-05:00,1\n2019-01-03,2\n",
            DataValidationError,
            r"mixes dates with a UTC offset \(line 2: .*\) and without one \(line 3",
            id="mixed-tz",
        ),
        pytest.param(
            "Date,Close,Adj Close,adj_close\n2019-01-02,1,1,1\n",
            DataValidationError,
            r"two columns meaning adj_close",
            id="duplicate-column",
        ),
        pytest.param(
            "Date,Close\n2019-01-02,null\n",
            EmptyDataError,
            r"X\.csv has no row with a price",
            id="only-null-rows",
        ),
        pytest.param(
            "Price,Close\nTicker,MSFT\nDate,\n2019-01-02,1\n",
            DataValidationError,
            r"X: X\.csv holds prices for MSFT \(its Ticker header line\), not X",
            id="other-ticker",
        ),
        pytest.param(
            "Price,Close,Close\nTicker,X,Y\nDate,,\n2019-01-02,1,2\n",
            DataValidationError,
            r"holds prices for several tickers \(X, Y\); save one ticker per file",
            id="several-tickers",
        ),
        pytest.param(
            "Price,Close\nTicker,X\n2019-01-02,1\n",
            DataValidationError,
            r"not the three header lines yf\.download",
            id="broken-three-header",
        ),
        pytest.param(
            'Date,Close\n2019-01-02,"1\n',
            DataValidationError,
            r"X\.csv line \d+ is not valid CSV",
            id="unterminated-quote",
        ),
    ],
)
def test_files_csv_refusals(folder: Path, text: str, error: type[Exception], message: str) -> None:
    write(folder, "X.csv", text)
    with pytest.raises(error, match=message):
        FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))


def test_files_not_utf8(folder: Path) -> None:
    (folder / "X.csv").write_bytes(b"Date,Close\n2019-01-02,\xff\n")
    with pytest.raises(DataValidationError, match=r"X: X\.csv is not UTF-8 text"):
        FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))


def test_files_bom_is_accepted(folder: Path) -> None:
    (folder / "X.csv").write_bytes(b"\xef\xbb\xbf" + CLASSIC.encode())
    assert len(FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))) == 4


def test_files_corrupt_parquet(folder: Path) -> None:
    (folder / "X.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match=r"X: X\.parquet in .* is not a readable Parquet file"):
        FilesSource(folder).fetch("X", D(2019, 1, 1), D(2019, 12, 31))


@pytest.mark.parametrize(
    ("table", "error", "message"),
    [
        pytest.param(
            pa.table({"Date": pa.array([], pa.date32()), "Close": pa.array([], pa.float64())}),
            EmptyDataError,
            r"X: X\.parquet has no rows",
            id="no-rows",
        ),
        pytest.param(pa.table({"Close": [1.0]}), DataValidationError, r"has no Date column", id="no-date"),
        pytest.param(
            pa.table({"Date": [D(2019, 1, 2)], "Close": [True]}),
            DataValidationError,
            r"column close has type bool",
            id="bool-close",
        ),
        pytest.param(
            pa.table({"Date": [D(2019, 1, 2), None], "Close": [1.0, 2.0]}),
            DataValidationError,
            r"X\.parquet row 2 has no date",
            id="null-date",
        ),
        pytest.param(
            pa.table({"Date": [D(2019, 1, 2), D(2019, 1, 2)], "Close": [1.0, 2.0]}),
            DataValidationError,
            r"has the date 2019-01-02 twice \(row 1 and row 2\)",
            id="duplicate-date",
        ),
        pytest.param(
            pa.table({"Date": ["2019-01-02"], "Close": ["x"]}),
            DataValidationError,
            r"X\.parquet row 1: close value 'x' is not a number",
            id="string-value",
        ),
    ],
)
def test_files_parquet_refusals(table: pa.Table, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        table_price_frame(table, "X", origin="X.parquet")


def test_csv_price_frame_is_pure_and_matches_the_file_route(folder: Path) -> None:
    frame = csv_price_frame(CLASSIC, "AAPL", origin="AAPL.csv")
    write(folder, "AAPL.csv", CLASSIC)
    pd.testing.assert_frame_equal(frame, FilesSource(folder).read("AAPL"))


def test_fixture_files_are_documented() -> None:
    text = (FIXTURES / "SOURCES.md").read_text(encoding="utf-8")
    for path in FIXTURES.rglob("*"):
        if path.is_file() and path.name != "SOURCES.md":
            assert path.name in text, f"{path.name} has no provenance in tests/fixtures/SOURCES.md"
    assert json.loads((FIXTURES / "yahoo_chart_AAPL_1d_2020-08-31_2020-11-06_div_split.json").read_text())


HISTORY_TZ = (
    "Date,Open,High,Low,Close,Volume,Dividends,Stock Splits\n"
    "2020-11-05 00:00:00-05:00,117.95,119.62,116.87,119.03,126387100,0.0,0.0\n"
    "2020-11-06 00:00:00-05:00,118.32,119.2,116.13,118.69,114457900,0.205,0.0\n"
    "2021-03-15 00:00:00-04:00,2.0,2.0,2.0,2.0,2,0.0,2.0\n"
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(CLASSIC, id="classic"),
        pytest.param(CLASSIC.replace("\n", "\r\n"), id="classic-crlf"),
        pytest.param(YF_DOWNLOAD_AAPL.read_bytes().decode("utf-8"), id="yf-download-crlf"),
        pytest.param(HISTORY_TZ, id="history-tz-offsets"),
        pytest.param(CLASSIC.replace("171.800003", " NULL ").replace("169.710007", "nan"), id="missing"),
    ],
)
def test_csv_fast_path_answers_plain_files_like_the_reference(text: str) -> None:
    """The pyarrow fast path reads the usual layouts (it does not decline) and gives the
    reference parser's frame bit for bit (tests/property/test_csv_fast_path.py does the rest)."""
    symbol = "AAPL"
    fast = csv_price_frame_fast(text, symbol, origin="AAPL.csv")
    assert fast is not None
    want = csv_price_frame_reference(text, symbol, origin="AAPL.csv")
    pd.testing.assert_frame_equal(fast, want, check_exact=True)
    for col in PRICE_COLUMNS:
        assert np.array_equal(fast[col].to_numpy().view(np.int64), want[col].to_numpy().view(np.int64))
    pd.testing.assert_frame_equal(csv_price_frame(text, symbol, origin="AAPL.csv"), want, check_exact=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            CLASSIC + "<html><body>502 Bad Gateway</body></html>\n",
            r"^X: X\.csv line 6 has 1 fields but the header has 7; fix the line$",
            id="garbage-line",
        ),
        pytest.param(
            CLASSIC.replace("171.059998", "12,5O"),
            r"^X: X\.csv line 4 has 8 fields but the header has 7; fix the line$",
            id="wrong-field-count",
        ),
        pytest.param(
            CLASSIC.replace("171.059998", "N/A?"),
            r"^X: X\.csv line 4: close value 'N/A\?' is not a number; fix the line$",
            id="bad-number",
        ),
        pytest.param(
            CLASSIC.replace("2019-02-21", "21/02/2019"),
            r"^X: X\.csv line 4: the date '21/02/2019' is not a date written YYYY-MM-DD; fix the line$",
            id="bad-date",
        ),
    ],
)
def test_csv_fast_path_declines_damaged_files_and_the_reference_names_them(text: str, message: str) -> None:
    assert csv_price_frame_fast(text, "X", origin="X.csv") is None
    with pytest.raises(DataValidationError, match=message):
        csv_price_frame(text, "X", origin="X.csv")
    with pytest.raises(DataValidationError, match=message):
        csv_price_frame_reference(text, "X", origin="X.csv")
