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

CSV files are read by a vectorised fast path (:func:`csv_price_frame_fast`, pyarrow) that
handles the plain files every writer produces; anything unusual (a malformed line, quoting, a
blank-looking row, a value or date it cannot prove it parses the same way) falls back to the
reference parser (:func:`csv_price_frame_reference`), which gives every message.  Both return the
same frame whenever the fast path answers.

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
import pyarrow.csv as pa_csv
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
    "csv_price_frame_fast",
    "csv_price_frame_reference",
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

    Tries :func:`csv_price_frame_fast` first and falls back to
    :func:`csv_price_frame_reference` whenever the fast path declines the text; the result (and
    every error) is the reference parser's.
    """
    frame = csv_price_frame_fast(text, symbol, origin=origin, empty_rows=empty_rows)
    if frame is not None:
        return frame
    return csv_price_frame_reference(text, symbol, origin=origin, empty_rows=empty_rows)


def csv_price_frame_reference(
    text: str, symbol: str, *, origin: str, empty_rows: list[dt.date] | None = None
) -> pd.DataFrame:
    """The reference CSV parser: Python's ``csv`` module and per-cell parsing.

    Defines what :func:`csv_price_frame` accepts and every message it gives; slow (tens of ms
    for 5,000 rows), so :func:`csv_price_frame` only uses it when the fast path declines.
    Same arguments as :func:`csv_price_frame`.  Pure: no I/O.
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
    columns = _header_columns(header, symbol, origin, log_ignored=True)
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


def _header_columns(header: Sequence[str], symbol: str, origin: str, *, log_ignored: bool) -> dict[str, int]:
    """Price-frame column -> position in ``header``; refuses duplicates and a missing Date/Close.

    Columns we do not use are logged (at debug level) when ``log_ignored``.
    """
    columns: dict[str, int] = {}
    for pos, name in enumerate(header):
        canon = canonical_column(name)
        if canon is None:
            if log_ignored and name.strip():
                log.debug("%s: %s: ignoring column %r", symbol, origin, name)
            continue
        if canon in columns:
            raise DataValidationError(
                f"{symbol}: {origin} has two columns meaning {canon} ({header[columns[canon]]!r} "
                f"and {name!r}); keep one"
            )
        columns[canon] = pos
    _require_columns(columns, header, symbol, origin)
    return columns


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


# -- transform: CSV text -> price frame, the vectorised fast path (pure) ---------------------

#: What ``str.strip()`` removes from an ASCII text (the fast path only reads ASCII files).
_ASCII_BLANKS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"

_MISSING_SET = pa.array(sorted(_MISSING), pa.string())

#: The spellings of the missing markers pyarrow's typed read takes as null (exact match; any
#: other spelling fails that read and the cells are then matched case-insensitively).
_MISSING_SPELLINGS = sorted(
    {v for m in _MISSING for v in (m, m.upper(), m.title(), m.capitalize())} | {"NaN"}
)

#: :data:`_DATE_RE` split by whether the UTC offset is written (RE2 syntax, full match).
_DATE_NAIVE_RE = r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?$"
_DATE_AWARE_RE = r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)$"

#: One record per line, no quoting or escapes, an empty line kept as a row of empty cells
#: (its empty date then sends the file to the reference parser, which skips such lines).
_FAST_PARSE = pa_csv.ParseOptions(
    delimiter=",",
    quote_char=False,
    double_quote=False,
    escape_char=False,
    newlines_in_values=False,
    ignore_empty_lines=False,
)


def csv_price_frame_fast(
    text: str, symbol: str, *, origin: str, empty_rows: list[dt.date] | None = None
) -> pd.DataFrame | None:
    """The price frame of a plain CSV, parsed vectorised with pyarrow; None when it declines.

    Handles the files writers produce: ASCII, no quotes, ``\\n`` or ``\\r\\n`` line ends, the
    header (or the three ``yf.download`` header lines) on the first lines, then one row per
    line with as many fields as the header.  Values must be numbers or the missing markers
    (any case, blanks around them allowed), dates ``YYYY-MM-DD`` (or all with, or all
    without, a time and UTC offset).  On anything else, including any header or row that
    :func:`csv_price_frame_reference` refuses, it returns None, having logged nothing and
    left ``empty_rows`` alone, and the reference parser decides.  When it answers, the frame,
    the logs and ``empty_rows`` are exactly the reference parser's (both end in the same
    checks).

    Exactness: pyarrow parses numbers with fast_float, correctly rounded like Python's
    ``float()``, so the values are the reference parser's bit for bit.  Texts the two may
    read differently (``inf``, ``nan(1)``, ``1_000``) give a non-finite value or an error in
    pyarrow, and the fast path declines.
    """
    text = text.removeprefix("\ufeff")
    if not text.isascii() or '"' in text or "\x00" in text:
        return None
    if "\r" in text and text.count("\r") != text.count("\r\n"):
        return None  # a lone CR ends a line for the csv module: leave it to the reference
    parsed = _fast_header(text, symbol, origin)
    if parsed is None:
        return None
    columns, header, body_start = parsed
    body = text[body_start:].encode("ascii")
    if not body or not _lines_shorter_than_field_limit(body):
        return None
    names = [f"f{i}" for i in range(len(header))]
    numeric = {names[pos] for col, pos in columns.items() if col != "date"}
    dates: np.ndarray | None = None
    values: dict[str, np.ndarray] | None = None
    # First with the numbers typed (the common file); then, when a cell is unusual (blanks
    # around a missing marker, an odd case), as texts matched like the reference does.
    for typed in (True, False):
        table = _fast_table(body, names, numeric if typed else set())
        if table is None:
            if typed:
                continue  # a cell pyarrow does not take for a number: read the texts
            return None  # a row with the wrong number of fields, or anything pyarrow refuses
        if dates is None:
            dates = _fast_dates(table.column(names[columns["date"]]))
            if dates is None:
                return None
        values = {}
        for col, pos in columns.items():
            if col == "date":
                continue
            column = table.column(names[pos])
            numbers = _typed_numbers(column) if typed else _text_numbers(column)
            if numbers is None:
                break
            values[col] = numbers
        else:
            break
        if not typed:
            return None
    assert dates is not None
    assert values is not None

    for name in header:
        if canonical_column(name) is None and name.strip():
            log.debug("%s: %s: ignoring column %r", symbol, origin, name)
    first_line = text.count("\n", 0, body_start) + 1
    lines = np.arange(first_line, first_line + len(dates), dtype=np.int64)

    def locate(i: int) -> str:
        return f"line {lines[i]}"

    return _assemble(dates, values, symbol, origin, locate, empty_rows)


def _fast_header(text: str, symbol: str, origin: str) -> tuple[dict[str, int], list[str], int] | None:
    """(columns, header names, offset of the first data line) when the text's first line (or
    first three, ``yf.download``) is a header the reference parser accepts; else None."""
    ends: list[int] = []
    while len(ends) < 3:
        end = text.find("\n", ends[-1] if ends else 0)
        if end < 0:
            return None  # no data line after the header: the reference gives the message
        ends.append(end + 1)
        if len(ends) == 1 and text[:end].split(",", 1)[0].strip().lower() not in ("price", "ticker"):
            break
    try:
        lines = list(csv.reader(io.StringIO(text[: ends[-1]], newline=""), strict=True))
        if len(lines) != len(ends) or not all(any(cell.strip() for cell in row) for row in lines):
            return None  # a blank-looking header line: the reference skips it
        header, rest = _split_header([(k + 1, row) for k, row in enumerate(lines)], symbol, origin)
        columns = _header_columns(header, symbol, origin, log_ignored=False)
    except (csv.Error, DataValidationError):
        return None  # the reference parser gives the message
    if rest:
        return None
    return columns, header, ends[-1]


def _lines_shorter_than_field_limit(body: bytes) -> bool:
    """True when no line of ``body`` can hold a field the ``csv`` module refuses as too long.

    A line of ``csv.field_size_limit()`` characters or more covers a whole aligned block of
    half that size, so it is enough that every such block holds a line break.
    """
    block = csv.field_size_limit() // 2
    if block < 4096:
        return len(body) < block
    return all(
        body.find(b"\n", start, start + block) >= 0 for start in range(0, len(body) - block + 1, block)
    )


def _fast_table(body: bytes, names: list[str], numeric: set[str]) -> pa.Table | None:
    """The rows of ``body`` with the ``numeric`` columns read as float64 and the rest as
    texts, or None when pyarrow refuses (a row with the wrong number of fields, a cell that
    is not a number or one of :data:`_MISSING_SPELLINGS`)."""
    try:
        return pa_csv.read_csv(
            io.BytesIO(body),
            read_options=pa_csv.ReadOptions(
                column_names=names, use_threads=False, block_size=max(len(body) + 1, 1 << 20)
            ),
            parse_options=_FAST_PARSE,
            convert_options=pa_csv.ConvertOptions(
                column_types={n: pa.float64() if n in numeric else pa.string() for n in names},
                null_values=_MISSING_SPELLINGS,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=False,
            ),
        )
    except (pa.ArrowException, ValueError):
        return None


def _fast_dates(column: pa.ChunkedArray) -> np.ndarray | None:
    """``datetime64[D]`` trading dates exactly as :func:`parse_date_texts` gives them, or None.

    A cast to ``date32`` accepts exactly ``YYYY-MM-DD`` (ASCII digits, a valid day); other
    texts are trimmed and must all match :data:`_DATE_RE` with, or all without, a UTC offset.
    """
    try:
        return np.asarray(pc.cast(column, pa.date32()).to_numpy(), dtype="datetime64[D]")
    except (pa.ArrowException, ValueError):
        pass
    texts = pc.ascii_trim(column, _ASCII_BLANKS)
    if not (
        pc.all(pc.match_substring_regex(texts, _DATE_NAIVE_RE)).as_py()
        or pc.all(pc.match_substring_regex(texts, _DATE_AWARE_RE)).as_py()
    ):
        return None  # an empty, malformed or mixed date: the reference names the line
    try:
        days = pc.cast(pc.utf8_slice_codeunits(texts, 0, 10), pa.date32())
    except (pa.ArrowException, ValueError):
        return None  # an impossible date (2019-02-30)
    return np.asarray(days.to_numpy(), dtype="datetime64[D]")


def _typed_numbers(column: pa.ChunkedArray) -> np.ndarray | None:
    """The float64 values of a column pyarrow read as numbers (nulls as NaN), or None when one
    is not finite (``inf``, ``nan(1)``: texts Python may read differently, or not at all)."""
    values = np.array(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    if np.count_nonzero(~np.isfinite(values)) != column.null_count:
        return None
    return values


def _text_numbers(column: pa.ChunkedArray) -> np.ndarray | None:
    """float64 values of number texts exactly as :func:`parse_number_texts` gives them, or None.

    Cells are trimmed like ``str.strip()``, missing markers (any case) become NaN and the rest
    is cast; a cell that is not a number, or a non-finite value, declines.
    """
    texts = pc.ascii_trim(column, _ASCII_BLANKS)
    missing = pc.is_in(pc.ascii_lower(texts), value_set=_MISSING_SET)
    try:
        cast = pc.cast(pc.if_else(missing, "0", texts), pa.float64())
    except (pa.ArrowException, ValueError):
        return None  # not a number: the reference names the cell
    values = np.array(cast.to_numpy(), dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    values[np.asarray(missing.to_numpy(), dtype=bool)] = np.nan
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

    index = _date_index(kept_dates)
    frame = pd.DataFrame({c: cols[c][order] for c in PRICE_COLUMNS}, index=index)
    return check_price_frame(frame, symbol)


#: The days a ``datetime64[ns]`` index holds (pandas' Timestamp.min/max, whole days).
_NS_DAYS = (np.datetime64("1677-09-22", "D"), np.datetime64("2262-04-11", "D"))


def _date_index(days: np.ndarray) -> pd.DatetimeIndex:
    """:func:`~sensitivity.sources.base.trading_date_index` of ``datetime64[D]`` days, built
    directly when every day fits ``datetime64[ns]`` (the same index, without pandas inferring a
    frequency on the way); other days go through it and get its error."""
    if days.size and _NS_DAYS[0] <= days.min() and days.max() <= _NS_DAYS[1]:
        return pd.DatetimeIndex(days.astype("datetime64[ns]"), name="date")
    return trading_date_index(days)
