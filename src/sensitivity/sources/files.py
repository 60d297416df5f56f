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

import codecs
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
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
    "CHECKS_VERSION",
    "FILE_SUFFIXES",
    "CheckedPrefix",
    "FilesSource",
    "canonical_column",
    "csv_price_frame",
    "csv_price_frame_fast",
    "csv_price_frame_reference",
    "csv_update_frame",
    "table_price_frame",
]

log = logging.getLogger(__name__)


class _Holder(logging.Filter):
    """Keeps back the records this module logs in a thread inside :func:`_held_records`."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(self.local, "held", None)
        if held is None:
            return True
        held.append(record)
        return False


_HOLDER = _Holder()
log.addFilter(_HOLDER)


@contextmanager
def _held_records() -> Iterator[list[logging.LogRecord]]:
    """The records this module logs in this thread meanwhile, kept back (not emitted)."""
    held: list[logging.LogRecord] = []
    _HOLDER.local.held = held
    try:
        yield held
    finally:
        _HOLDER.local.held = None


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
        if path.suffix == ".parquet":
            return self._parquet_frame(sym, path, empty_rows)
        return self._csv_frame(sym, path, self._bytes(sym, path), empty_rows)

    def _parquet_frame(self, sym: str, path: Path, empty_rows: list[dt.date] | None) -> pd.DataFrame:
        try:
            table = pq.read_table(path)
            return table_price_frame(table, sym, origin=path.name, empty_rows=empty_rows)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataValidationError(
                f"{sym}: {path.name} in {self.folder} is not a readable Parquet file ({exc}); "
                "rewrite it or replace it with a CSV"
            ) from exc
        except OSError as exc:
            raise self._unreadable(sym, path, exc) from exc

    def _bytes(self, sym: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._unreadable(sym, path, exc) from exc

    def _unreadable(self, sym: str, path: Path, exc: OSError) -> SourceError:
        return SourceError(
            f"{sym}: cannot read {path.name} in {self.folder} ({exc.strerror or exc}); check "
            "the file's permissions",
            symbol=sym,
        )

    @staticmethod
    def _csv_frame(sym: str, path: Path, data: bytes, empty_rows: list[dt.date] | None) -> pd.DataFrame:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataValidationError(
                f"{sym}: {path.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV"
            ) from exc
        return csv_price_frame(text, sym, origin=path.name, empty_rows=empty_rows)

    #: :func:`~sensitivity.sources.base.fetch_checked` hands this source the
    #: ``checked_prefix`` its last fetch of a symbol reported.
    takes_checked_prefix = True

    def fetch_checked(
        self, symbol: str, start: dt.date, end: dt.date, *, checked_prefix: str | None = None
    ) -> CheckedPrices:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive) and its quality
        report (rows without a price, and the boundary checks of
        :func:`~sensitivity.sources.quality.clean_price_frame`).

        The whole file is read and checked.  A CSV whose data lines all start with their
        ``YYYY-MM-DD`` date, strictly increasing, and hold a price each (no quotes, no lone
        CR) also gets ``checked_prefix`` in the result: a :class:`CheckedPrefix` of the file's
        complete lines.  Handed back to the next fetch, while the file still starts with
        exactly those bytes, only its last lines are parsed and checked (those dated from
        ``start`` on and those added since; :func:`csv_update_frame`), the rest having been
        checked byte for byte: the same frame, report, log records and errors as reading the
        whole file (anything else reads it whole), for a fraction of the work on a daily
        update of a long file.
        """
        check_date_range(start, end)
        sym = normalize_symbol(symbol)
        path = self.path_for(sym)
        origin = f"{sym}'s file in {self.folder}"
        empty: list[dt.date] = []
        if path.suffix == ".parquet":
            frame = self._parquet_frame(sym, path, empty)
            return _checked(frame, sym, origin, start, end, empty)
        data = self._bytes(sym, path)
        mark = CheckedPrefix.loads(checked_prefix)
        if mark is not None:
            # The update's log records are let out only if it answers: read whole after
            # it, the file's records come once, from the whole read.
            with _held_records() as held:
                update = csv_update_frame(data, mark, sym, start, end, origin=path.name)
                try:
                    checked = (
                        None if update is None else _checked(update[0], sym, origin, start, end, update[1])
                    )
                except EmptyDataError:
                    checked = None  # its message names the whole file's dates: read it whole
            if update is not None and checked is not None:
                for record in held:
                    log.handle(record)
                prefix = update[2]
                return replace(checked, checked_prefix=prefix.dumps() if prefix else None)
        frame = self._csv_frame(sym, path, data, empty)
        checked = _checked(frame, sym, origin, start, end, empty)
        prefix = None if empty else CheckedPrefix.of_whole(data, sym)
        return replace(checked, checked_prefix=prefix.dumps() if prefix else None)

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


# -- a daily update of a CSV: only its last lines (pure) -------------------------------------

#: Bump when a change to the CSV checks could refuse a line an earlier version accepted: every
#: :class:`CheckedPrefix` recorded before is then ignored and its file read whole again.
CHECKS_VERSION: int = 1

#: At most this many lines before the unchecked part are parsed again for the asked range;
#: a range reaching further back reads the whole file.
_MAX_LINES_BACK = 512

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CheckedPrefix:
    """The first ``size`` bytes of a CSV price file, read and checked whole without an error.

    Given only for a file whose complete lines (``size`` ends after the last ``\\n``) are
    a header with the date first, then data lines that each start with a ``YYYY-MM-DD`` date
    and a comma, dates strictly increasing, each with a price, without quotes or a lone CR.
    ``sha256`` is the digest of those bytes: a later file that starts with the same bytes
    holds the same checked lines, so only what follows them, and the lines of an asked range,
    need parsing.  ``version`` is :data:`CHECKS_VERSION` when it was made.
    """

    size: int
    sha256: str
    version: int = CHECKS_VERSION

    def dumps(self) -> str:
        """The JSON text kept with the stored prices."""
        return json.dumps({"version": self.version, "size": self.size, "sha256": self.sha256})

    @classmethod
    def loads(cls, text: str | None) -> CheckedPrefix | None:
        """The prefix :meth:`dumps` wrote, or None for None, anything malformed or another
        :data:`CHECKS_VERSION` (the file is then read whole)."""
        if not text:
            return None
        try:
            raw = json.loads(text)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        version, size, digest = raw.get("version"), raw.get("size"), raw.get("sha256")
        if version != CHECKS_VERSION or type(size) is not int or size <= 0:
            return None
        if not isinstance(digest, str) or not _HEX64.match(digest):
            return None
        return cls(size, digest, version)

    @classmethod
    def of_whole(cls, data: bytes, symbol: str) -> CheckedPrefix | None:
        """The prefix of ``symbol``'s file ``data`` just read whole without an error or a row
        without a price, or None when the file is not of the plain form a prefix is given for."""
        cut = data.rfind(b"\n") + 1
        body = _body_start(data, symbol)
        if body is None or cut <= body or _plain_dated_lines(data, body, cut) is None:
            return None
        return cls(cut, hashlib.sha256(memoryview(data)[:cut]).hexdigest())


def csv_update_frame(
    data: bytes,
    prefix: CheckedPrefix,
    symbol: str,
    start: dt.date,
    end: dt.date,
    *,
    origin: str,
) -> tuple[pd.DataFrame, list[dt.date], CheckedPrefix | None] | None:
    """The price frame of a CSV's last lines, when ``data`` starts with ``prefix``; or None.

    Parses the header and the lines from the first one dated on or after ``start`` or
    following ``prefix`` (whichever comes first) to the end.  Together with ``prefix``
    (checked when it was made) that covers every line: the frame cut to ``start``..``end``,
    the rows without a price there and the log records are those of :func:`csv_price_frame`
    on the whole ``data`` (the tests hold them to it).  Returns (frame, dates of the rows
    without a price, the prefix of the file as it is now, or None when those rows or its form
    give none).  None whenever it cannot prove that: ``data`` does not start with ``prefix``,
    a line it parses is not a plain dated line later than the one before, the asked range
    reaches more than :data:`_MAX_LINES_BACK` lines into the prefix, or the fast path
    declines or raises.  No error comes from here: the whole file's read then gives it, with
    the line's number in the file.  What it logged before declining belongs to no read, so
    :meth:`FilesSource.fetch_checked` holds its records back until it answers.  ``end`` is
    not used to cut: lines after it are parsed and checked too, as the whole read does.  Pure.
    """
    del end  # every line after the prefix is checked, dated in the range or not
    size = prefix.size
    if prefix.version != CHECKS_VERSION or size > len(data):
        return None
    digest = hashlib.sha256(memoryview(data)[:size])
    if digest.hexdigest() != prefix.sha256:
        return None
    body = _body_start(data, symbol)
    if body is None or body >= size or data[size - 1 : size] != b"\n":
        return None
    key = start.isoformat().encode("ascii")
    first = size  # the first line to parse; ``before``: the line before it, dated before ``start``
    for _ in range(_MAX_LINES_BACK):
        if first <= body:
            return None  # every line is asked for: nothing to spare
        before = max(data.rfind(b"\n", body, first - 1) + 1, body)
        if data[before : before + 10] < key:
            break
        first = before
    else:
        return None
    dates = _plain_dated_lines(data, first, len(data))
    if dates is None:
        return None
    if len(dates) and data[before : before + 10] >= dates[0]:
        return None  # the new lines do not follow the checked ones
    try:
        head = data[:body].removeprefix(_BOM).decode("ascii")
        piece = data[first:].decode("ascii")
    except UnicodeDecodeError:
        return None
    found: list[dt.date] = []
    try:
        frame = csv_price_frame_fast(head + piece, symbol, origin=origin, empty_rows=found)
    except (DataValidationError, EmptyDataError):
        return None  # the whole file's read names the line
    if frame is None:
        return None
    cut = data.rfind(b"\n") + 1
    now = None
    if not found:
        digest.update(memoryview(data)[size:cut])
        now = CheckedPrefix(cut, digest.hexdigest())
    return frame, found, now


_BOM = codecs.BOM_UTF8


def _body_start(data: bytes, symbol: str) -> int | None:
    """Where the first data line of a CSV's ``data`` starts, when its header (one line, or
    the three of ``yf.download``) is ASCII, names the date first and is one the reference
    parser accepts; else None."""
    ends = 0
    for _ in range(3):
        nl = data.find(b"\n", ends)
        if nl < 0:
            break
        ends = nl + 1
    try:
        text = data[:ends].removeprefix(_BOM).decode("ascii")
    except UnicodeDecodeError:
        return None
    parsed = _fast_header(text, symbol, "")
    if parsed is None or parsed[0].get("date") != 0:
        return None
    return len(data[:ends]) - len(text) + parsed[2]


def _plain_dated_lines(data: bytes, begin: int, end: int) -> npt.NDArray[np.bytes_] | None:
    """The dates (``YYYY-MM-DD`` bytes) of the lines of ``data[begin:end]`` (``begin`` at
    the start of a line), when every one starts with such a date and a comma, the dates
    strictly increase and the part holds no quote and no CR other than in CRLF; else None."""
    if end <= begin:
        return np.zeros(0, dtype="S10")
    if data.find(b'"', begin, end) >= 0:
        return None
    if data.find(b"\r", begin, end) >= 0 and data.count(b"\r", begin, end) != data.count(b"\r\n", begin, end):
        return None
    body = np.frombuffer(data, dtype=np.uint8, count=end - begin, offset=begin)
    starts = np.flatnonzero(body == 0x0A) + 1
    starts = np.concatenate(([0], starts[starts < body.size]))
    if int(starts[-1]) + 11 > body.size or (starts.size > 1 and np.diff(starts).min() < 12):
        return None  # a line too short for a date and a comma (a blank line among them)
    cells = body[starts[:, None] + np.arange(11)]
    digits = cells[:, [0, 1, 2, 3, 5, 6, 8, 9]]
    if not (
        ((digits >= 0x30) & (digits <= 0x39)).all()
        and (cells[:, [4, 7]] == 0x2D).all()
        and (cells[:, 10] == 0x2C).all()
    ):
        return None
    dates = np.ascontiguousarray(cells[:, :10]).view("S10").ravel()
    if not (dates[1:] > dates[:-1]).all():
        return None
    return dates


def _checked(
    frame: pd.DataFrame, sym: str, origin: str, start: dt.date, end: dt.date, empty: list[dt.date]
) -> CheckedPrices:
    return clean_price_frame(
        frame,
        sym,
        origin=origin,
        start=start,
        end=end,
        dropped=[QualityIssue(d.isoformat(), REASON_NO_PRICE) for d in empty],
    )


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
            read_options=pa_csv.ReadOptions(column_names=names, use_threads=False, block_size=len(body) + 1),
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
