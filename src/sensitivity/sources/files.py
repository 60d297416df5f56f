"""Prices from a folder of files: one ``<SYMBOL>.csv`` or ``<SYMBOL>.parquet`` per symbol.

Accepted layouts (detected, never configured):

* the classic one-header Yahoo CSV: ``Date,Open,High,Low,Close,Adj Close,Volume`` with optional
  ``Dividends`` and ``Stock Splits`` columns, in any order (``Ticker.history().to_csv()``
  writes ``Date,Open,High,Low,Close,Volume,Dividends,Stock Splits``);
* the three-header-line CSV that ``yf.download(...).to_csv()`` writes::

      Price,Adj Close,Close,High,Low,Open,Volume
      Ticker,AAPL,AAPL,AAPL,AAPL,AAPL,AAPL
      Date,,,,,,
      2020-08-31,125.82,129.04,131.0,126.0,127.58,225702700

  (columns in alphabetical order, CRLF on Windows; the ``Ticker`` line must name the file's
  symbol);
* Parquet with the same Yahoo column names or the project's lower-case names (``date``,
  ``open``, ..., ``adj_close``, ``splits``; extra columns are ignored).

``Date`` and ``Close`` are required; every other column is optional and is NaN when absent
(``adj_close`` NaN means "no adjusted close": the model then uses ``close``; ``dividends`` and
``splits`` NaN mean "actions not reported").  Dates are ``YYYY-MM-DD``, optionally with a time
and a UTC offset as pandas writes a tz-aware index (``2020-08-31 00:00:00-04:00``); the trading
date is the date written, i.e. the exchange's local date.

Values are parsed to float64 exactly as written (correctly rounded, the same as pandas'
``float_precision="round_trip"``), never rounded and never filled.  Rows whose prices are all
missing (Yahoo writes ``null``) are dropped; unsorted rows are sorted; a date that appears twice
is an error naming the date and both lines.

The file name comes only from the validated symbol (:func:`sensitivity.symbols.normalize_symbol`)
and the file must resolve inside the folder: a symlink that leads out of it is refused.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.prices import PRICE_COLUMNS, check_price_frame
from sensitivity.sources.base import check_date_range, trading_date_index
from sensitivity.sources.quality import REASON_NO_PRICE, CheckedPrices, QualityIssue, clean_price_frame
from sensitivity.symbols import normalize_symbol

__all__ = [
    "FILE_SUFFIXES",
    "FilesSource",
    "canonical_column",
    "csv_price_frame",
    "table_price_frame",
]

log = logging.getLogger(__name__)

#: The file suffixes a symbol may have, in the order they are named in messages.
FILE_SUFFIXES: tuple[str, ...] = (".csv", ".parquet")

#: Column names as written in files (lower-cased, blanks as "_") -> price-frame column.
_COLUMN_ALIASES: dict[str, str] = {
    "date": "date",
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "adj_close": "adj_close",
    "adjclose": "adj_close",
    "adjusted_close": "adj_close",
    "volume": "volume",
    "dividends": "dividends",
    "stock_splits": "splits",
    "splits": "splits",
}

#: The prices (not volume or actions): a row where all of these are missing carries nothing.
_PRICE_ONLY: tuple[str, ...] = ("open", "high", "low", "close", "adj_close")

#: Cell texts that mean "no value".
_MISSING = frozenset({"", "null", "nan", "na", "n/a", "none", "-"})

_DATE_RE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
    r"(?P<offset>Z|[+-]\d{2}(?::?\d{2})?)?$"
)

_EXAMPLE_HEADER = "Date,Open,High,Low,Close,Adj Close,Volume"

#: Says where a row was read (``line 7`` of a CSV, ``row 5`` of a Parquet file).
Locator = Callable[[int], str]


def canonical_column(name: str) -> str | None:
    """The price-frame column a file's column name means, or None for columns we ignore.

    >>> canonical_column("Adj Close"), canonical_column("Stock Splits"), canonical_column("x")
    ('adj_close', 'splits', None)
    """
    key = re.sub(r"[\s_]+", "_", name.strip().lower())
    return _COLUMN_ALIASES.get(key)


class FilesSource:
    """Prices from ``<folder>/<SYMBOL>.csv`` or ``<folder>/<SYMBOL>.parquet``.

    ``folder`` must exist when the source is built (a :class:`ConfigError` names it
    otherwise), so a typo fails before any work starts.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"source.path {str(path)!r} is not a folder (it must hold one <SYMBOL>.csv or "
                "<SYMBOL>.parquet per symbol)"
            )
        self.folder = path
        self.name = f"files:{path}"

    def __repr__(self) -> str:
        return f"FilesSource({str(self.folder)!r})"

    # -- extract -------------------------------------------------------------------------

    def path_for(self, symbol: str) -> Path:
        """The file holding ``symbol``'s prices; raises when there is none or it is unsafe.

        The name is built from the normalised symbol only, and the file (after following
        symlinks) must lie inside the folder.
        """
        sym = normalize_symbol(symbol)
        names = [f"{sym}{suffix}" for suffix in FILE_SUFFIXES]
        found = [self.folder / n for n in names if os.path.lexists(self.folder / n)]
        if not found:
            raise SymbolNotFoundError(
                f"{sym}: no price file for this symbol in {self.folder} (expected "
                f"{' or '.join(names)}{self._near_misses(names)}; add the file or remove the "
                "symbol)",
                symbol=sym,
            )
        if len(found) > 1:
            raise SourceError(
                f"{sym}: both {' and '.join(p.name for p in found)} exist in {self.folder}; "
                "it is ambiguous which to read (keep one of them)",
                symbol=sym,
            )
        path = found[0]
        root = self.folder.resolve()
        target = path.resolve()
        if not target.is_relative_to(root):
            raise SourceError(
                f"{sym}: {path.name} in {self.folder} links to {target}, outside the folder; "
                "refusing to read it (copy the file into the folder instead)",
                symbol=sym,
            )
        if not target.is_file():
            raise SourceError(
                f"{sym}: {path.name} in {self.folder} is not a readable file (a broken link or "
                "a folder?); replace it with the price file",
                symbol=sym,
            )
        return path

    def _near_misses(self, names: Sequence[str]) -> str:
        """Files whose name differs from an expected one only by case, for the message."""
        wanted = {n.lower() for n in names}
        try:
            close = sorted(p.name for p in self.folder.iterdir() if p.name.lower() in wanted)
        except OSError:
            return ""
        if not close:
            return ""
        return f"; found {', '.join(close)}: the name must be the upper-case symbol"

    def read(self, symbol: str, *, empty_rows: list[dt.date] | None = None) -> pd.DataFrame:
        """Every row of ``symbol``'s file as a checked price frame (no date selection).

        Rows without any price are dropped; their dates are appended to ``empty_rows`` when
        it is given.
        """
        sym = normalize_symbol(symbol)
        path = self.path_for(sym)
        origin = path.name
        try:
            if path.suffix == ".parquet":
                table = pq.read_table(path)
                return table_price_frame(table, sym, origin=origin, empty_rows=empty_rows)
            data = path.read_bytes()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataValidationError(
                f"{sym}: {origin} in {self.folder} is not a readable Parquet file ({exc}); "
                "rewrite it or replace it with a CSV"
            ) from exc
        except OSError as exc:
            raise SourceError(
                f"{sym}: cannot read {origin} in {self.folder} ({exc.strerror or exc}); check "
                "the file's permissions",
                symbol=sym,
            ) from exc
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataValidationError(
                f"{sym}: {origin} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
            ) from exc
        return csv_price_frame(text, sym, origin=origin, empty_rows=empty_rows)

    def fetch_checked(self, symbol: str, start: dt.date, end: dt.date) -> CheckedPrices:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive) and its quality
        report (rows without a price, and the boundary checks of
        :func:`~sensitivity.sources.quality.clean_price_frame`)."""
        check_date_range(start, end)
        sym = normalize_symbol(symbol)
        empty: list[dt.date] = []
        frame = self.read(sym, empty_rows=empty)
        return clean_price_frame(
            frame,
            sym,
            origin=f"{sym}'s file in {self.folder}",
            start=start,
            end=end,
            dropped=[QualityIssue(d.isoformat(), REASON_NO_PRICE) for d in empty],
        )

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive)."""
        return self.fetch_checked(symbol, start, end).frame


# -- transform: CSV text -> price frame (pure) ----------------------------------------------


def csv_price_frame(
    text: str, symbol: str, *, origin: str, empty_rows: list[dt.date] | None = None
) -> pd.DataFrame:
    """Parse a Yahoo-style CSV (one-header or ``yf.download`` three-header) into a price frame.

    ``origin`` names the file in messages; the dates of rows dropped for having no price are
    appended to ``empty_rows`` when it is given.  Pure: no I/O.
    """
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise EmptyDataError(
            f"{symbol}: {origin} is empty (write the header {_EXAMPLE_HEADER} and one row per day)",
            symbol=symbol,
        )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise DataValidationError(
            f"{symbol}: {origin} line {reader.line_num} is not valid CSV ({exc}); fix the line"
        ) from exc
    header, body = _split_header(rows, symbol, origin)

    columns: dict[str, int] = {}
    for pos, name in enumerate(header):
        canon = canonical_column(name)
        if canon is None:
            if name.strip():
                log.debug("%s: %s: ignoring column %r", symbol, origin, name)
            continue
        if canon in columns:
            raise DataValidationError(
                f"{symbol}: {origin} has two columns meaning {canon} ({header[columns[canon]]!r} "
                f"and {name!r}); keep one"
            )
        columns[canon] = pos
    _require_columns(columns, header, symbol, origin)
    if not body:
        raise EmptyDataError(
            f"{symbol}: {origin} has a header but no rows (add one row per trading day)",
            symbol=symbol,
        )

    width = len(header)
    lines = np.array([line for line, _ in body], dtype=np.int64)
    for line, row in body:
        if len(row) != width:
            raise DataValidationError(
                f"{symbol}: {origin} line {line} has {len(row)} fields but the header has "
                f"{width}; fix the line"
            )

    def locate(i: int) -> str:
        return f"line {lines[i]}"

    date_texts = [row[columns["date"]] for _, row in body]
    dates = parse_date_texts(date_texts, symbol, origin, locate)
    values = {
        col: parse_number_texts([row[pos] for _, row in body], col, symbol, origin, locate)
        for col, pos in columns.items()
        if col != "date"
    }
    return _assemble(dates, values, symbol, origin, locate, empty_rows)


def _split_header(
    rows: list[tuple[int, list[str]]], symbol: str, origin: str
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Return (column names, data rows), detecting the three-header ``yf.download`` layout."""
    first = [cell.strip() for cell in rows[0][1]]
    lead = first[0].lower() if first else ""
    if lead not in ("price", "ticker"):
        return first, rows[1:]
    # yf.download(...).to_csv(): "Price,..." / "Ticker,..." (either order) / "Date,,,...".
    if len(rows) < 3:
        raise DataValidationError(
            f"{symbol}: {origin} starts like a yf.download CSV (line {rows[0][0]}: {lead.title()},...) "
            "but lacks its other header lines (Price, Ticker, Date); rewrite the file"
        )
    heads = {cells[0].strip().lower(): (line, [c.strip() for c in cells]) for line, cells in rows[:2]}
    date_line, date_row = rows[2][0], [c.strip() for c in rows[2][1]]
    if set(heads) != {"price", "ticker"} or date_row[0].lower() != "date" or any(date_row[1:]):
        raise DataValidationError(
            f"{symbol}: {origin} lines {rows[0][0]}-{date_line} are not the three header lines "
            "yf.download(...).to_csv() writes (Price,... / Ticker,... / Date,,,...); fix the header"
        )
    names = heads["price"][1]
    tickers = {t.upper() for t in heads["ticker"][1][1:] if t}
    if len(tickers) > 1:
        raise DataValidationError(
            f"{symbol}: {origin} holds prices for several tickers ({', '.join(sorted(tickers))}); "
            "save one ticker per file"
        )
    if tickers and tickers != {symbol}:
        raise DataValidationError(
            f"{symbol}: {origin} holds prices for {tickers.pop()} (its Ticker header line), not "
            f"{symbol}; rename the file or fix the header"
        )
    return ["Date", *names[1:]], rows[3:]


def _require_columns(columns: Mapping[str, object], header: Sequence[str], symbol: str, origin: str) -> None:
    for needed, label in (("date", "Date"), ("close", "Close")):
        if needed not in columns:
            shown = ",".join(h for h in header) or "(nothing)"
            raise DataValidationError(
                f"{symbol}: {origin} has no {label} column (its columns: {shown}); the header must "
                f"name the columns, e.g. {_EXAMPLE_HEADER}"
            )


def parse_date_texts(texts: Sequence[str], symbol: str, origin: str, locate: Locator) -> np.ndarray:
    """Parse ``YYYY-MM-DD[ HH:MM[:SS]][±HH:MM]`` texts to ``datetime64[D]`` trading dates.

    The date written is the trading date (for a tz-aware timestamp it is the exchange's local
    date).  Dates with and without a UTC offset must not be mixed.
    """
    days: list[str] = []
    aware_at: int | None = None
    naive_at: int | None = None
    for i, raw in enumerate(texts):
        text = raw.strip()
        m = _DATE_RE.match(text)
        if m is None:
            what = "is empty" if not text else f"{raw!r} is not a date written YYYY-MM-DD"
            raise DataValidationError(f"{symbol}: {origin} {locate(i)}: the date {what}; fix the line")
        if m.group("offset"):
            aware_at = i if aware_at is None else aware_at
        else:
            naive_at = i if naive_at is None else naive_at
        days.append(m.group("date"))
    if aware_at is not None and naive_at is not None:
        raise DataValidationError(
            f"{symbol}: {origin} mixes dates with a UTC offset ({locate(aware_at)}: "
            f"{texts[aware_at].strip()!r}) and without one ({locate(naive_at)}: "
            f"{texts[naive_at].strip()!r}); write every date the same way"
        )
    try:
        return np.array(days, dtype="datetime64[D]")
    except ValueError:
        for i, day in enumerate(days):
            try:
                dt.date.fromisoformat(day)
            except ValueError as exc:
                raise DataValidationError(
                    f"{symbol}: {origin} {locate(i)}: {texts[i].strip()!r} is not a valid date; fix the line"
                ) from exc
        raise


def parse_number_texts(
    texts: Sequence[str], column: str, symbol: str, origin: str, locate: Locator
) -> np.ndarray:
    """Parse number texts to float64 exactly (correctly rounded); missing markers become NaN.

    ``null``, ``NaN``, ``NA``, ``-`` and empty cells are missing values.
    """
    cleaned = ["nan" if t.strip().lower() in _MISSING else t.strip() for t in texts]
    try:
        values = np.array(cleaned, dtype=np.float64)
    except ValueError:
        for i, t in enumerate(cleaned):
            try:
                float(t)
            except ValueError as exc:
                raise DataValidationError(
                    f"{symbol}: {origin} {locate(i)}: {column} value {texts[i].strip()!r} is not a "
                    "number; fix the line"
                ) from exc
        raise
    return values


# -- transform: Parquet table -> price frame (pure) -----------------------------------------


def table_price_frame(
    table: pa.Table, symbol: str, *, origin: str, empty_rows: list[dt.date] | None = None
) -> pd.DataFrame:
    """Turn a Parquet table with Yahoo or project column names into a price frame. Pure.

    The dates of rows dropped for having no price are appended to ``empty_rows`` if given.
    """
    columns: dict[str, str] = {}
    for name in table.column_names:
        canon = canonical_column(name)
        if canon is None:
            continue
        if canon in columns:
            raise DataValidationError(
                f"{symbol}: {origin} has two columns meaning {canon} ({columns[canon]!r} and "
                f"{name!r}); keep one"
            )
        columns[canon] = name
    if "date" not in columns and "__index_level_0__" in table.column_names:
        # A pandas frame written with an unnamed DatetimeIndex.
        columns["date"] = "__index_level_0__"
    _require_columns(columns, table.column_names, symbol, origin)
    if table.num_rows == 0:
        raise EmptyDataError(f"{symbol}: {origin} has no rows (add one row per trading day)", symbol=symbol)

    def locate(i: int) -> str:
        return f"row {i + 1}"

    dates = _table_dates(table.column(columns["date"]), symbol, origin, locate)
    values = {
        col: _table_numbers(table.column(name), col, symbol, origin, locate)
        for col, name in columns.items()
        if col != "date"
    }
    return _assemble(dates, values, symbol, origin, locate, empty_rows)


def _table_dates(column: pa.ChunkedArray, symbol: str, origin: str, locate: Locator) -> np.ndarray:
    if column.null_count:
        first = int(pc.index(pc.is_null(column), True).as_py())
        raise DataValidationError(f"{symbol}: {origin} {locate(first)} has no date; fix the row")
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return parse_date_texts(column.to_pylist(), symbol, origin, locate)
    if pa.types.is_date(kind):
        return np.asarray(column.cast(pa.date32()).to_numpy(), dtype="datetime64[D]")
    if pa.types.is_timestamp(kind):
        stamps = pd.DatetimeIndex(column.to_pandas())
        if stamps.tz is not None:
            # The wall-clock date in the column's own zone: the exchange's trading date.
            stamps = stamps.tz_localize(None)
        return stamps.normalize().to_numpy().astype("datetime64[D]")
    raise DataValidationError(
        f"{symbol}: {origin} has a date column of type {kind}; expected dates, timestamps or "
        "YYYY-MM-DD strings"
    )


def _table_numbers(
    column: pa.ChunkedArray, name: str, symbol: str, origin: str, locate: Locator
) -> np.ndarray:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        texts = ["" if v is None else v for v in column.to_pylist()]
        return parse_number_texts(texts, name, symbol, origin, locate)
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_decimal(kind)
        or pa.types.is_null(kind)
    ):
        series = column.cast(pa.float64()).to_pandas()  # nulls -> NaN, values unchanged
        return np.asarray(series, dtype=np.float64)
    raise DataValidationError(
        f"{symbol}: {origin} column {name} has type {kind}; expected numbers (float64 or integer)"
    )


# -- the shared checks ---------------------------------------------------------------------


def _assemble(
    dates: np.ndarray,
    values: dict[str, np.ndarray],
    symbol: str,
    origin: str,
    locate: Locator,
    empty_rows: list[dt.date] | None = None,
) -> pd.DataFrame:
    """Check parsed rows and build the price frame: drop empty rows (their dates go to
    ``empty_rows``), sort, refuse duplicates."""
    n = len(dates)
    cols = {c: values.get(c, np.full(n, np.nan)) for c in PRICE_COLUMNS}

    for col in PRICE_COLUMNS:
        bad = np.flatnonzero(np.isinf(cols[col]))
        if bad.size:
            i = int(bad[0])
            raise DataValidationError(
                f"{symbol}: {origin} {locate(i)} ({dates[i]}): {col} is {float(cols[col][i])!r}, not a "
                "finite number; fix the line"
            )
    keep = ~np.all(np.isnan(np.vstack([cols[c] for c in _PRICE_ONLY])), axis=0)
    order = np.flatnonzero(keep)
    if order.size < n:
        log.info("%s: %s: dropped %d row(s) without any price", symbol, origin, n - order.size)
        if empty_rows is not None:
            empty_rows.extend(dt.date.fromisoformat(str(d)) for d in dates[~keep])
    if order.size == 0:
        raise EmptyDataError(f"{symbol}: {origin} has no row with a price", symbol=symbol)

    kept_dates = dates[order]
    if not np.all(kept_dates[1:] >= kept_dates[:-1]):
        log.info("%s: %s: rows are not in date order; sorted them by date", symbol, origin)
        order = order[np.argsort(kept_dates, kind="stable")]
        kept_dates = dates[order]
    same = np.flatnonzero(kept_dates[1:] == kept_dates[:-1])
    if same.size:
        first, second = int(order[same[0]]), int(order[same[0] + 1])
        raise DataValidationError(
            f"{symbol}: {origin} has the date {dates[first]} twice ({locate(first)} and "
            f"{locate(second)}); keep one row per date"
        )

    for col in _PRICE_ONLY:
        column = cols[col][order]
        bad = np.flatnonzero(column <= 0)  # NaN compares False
        if bad.size:
            i = int(order[bad[0]])
            raise DataValidationError(
                f"{symbol}: {origin} {locate(i)} ({dates[i]}): {col} is {float(cols[col][i])!r}; prices "
                "must be positive (fix or remove the row)"
            )

    index = trading_date_index(kept_dates)
    frame = pd.DataFrame({c: cols[c][order] for c in PRICE_COLUMNS}, index=index)
    return check_price_frame(frame, symbol)
