"""The vectorised CSV fast path against the reference parser (hypothesis).

* for generated Yahoo-style texts (both layouts, any column order, numbers with many digits and
  exponents, missing markers in any case and with blanks, rows without a price, unsorted
  dates, tz offsets, CRLF, ignored columns) :func:`csv_price_frame` gives exactly what
  :func:`csv_price_frame_reference` gives: the same frame bit for bit, the same ``empty_rows``,
  the same log lines, or the same error (type and message);
* on the plain texts every writer produces, the fast path answers (it does not decline);
* damaged texts (a garbage line, a wrong field count, quotes, a BOM, blank lines, a lone CR,
  an unparsable number or date) are declined or end in the reference's error;
* pyarrow parses numbers and dates exactly as Python does (``float()``, ``datetime64[D]``).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensitivity.sources.files import (
    csv_price_frame,
    csv_price_frame_fast,
    csv_price_frame_reference,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SYMBOL = "X"
ORIGIN = "X.csv"

#: Yahoo's column names (Date is added by the layouts).
VALUE_COLUMNS = ["Open", "High", "Low", "Adj Close", "Volume", "Dividends", "Stock Splits"]
IGNORED_COLUMNS = ["Capital Gains", "Note", ""]
MISSING = ["", "null", "nan", "na", "n/a", "none", "-"]
OFFSETS = ["-05:00", "-04:00", "+01:00", "Z", "+0530", "-03"]

#: Damage done to a generated text; the fast path must decline or agree.
DAMAGE = [
    "garbage-line",
    "extra-field",
    "missing-field",
    "bad-number",
    "bad-date",
    "impossible-date",
    "quoted-cell",
    "bom",
    "blank-line",
    "blank-looking-row",
    "lone-cr",
    "infinite",
    "nan-payload",
    "underscore-number",
    "duplicate-date",
    "mixed-date-forms",
    "zero-price",
    "non-ascii",
    "trailing-blank-lines",
    "header-only",
]


# -- generated texts --------------------------------------------------------------------------


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    """A positive number as writers (and people) write it: many digits, exponents, signs."""
    kind = draw(st.sampled_from(["repr", "fixed", "digits", "exponent", "integer"]))
    if kind == "repr":
        return repr(draw(st.floats(min_value=1e-6, max_value=1e9, allow_nan=False)))
    if kind == "fixed":
        return f"{draw(st.floats(min_value=1e-3, max_value=1e6)):.{draw(st.integers(0, 12))}f}"
    if kind == "integer":
        return str(draw(st.integers(1, 10**12)))
    whole = draw(st.text("0123456789", min_size=1, max_size=9))
    frac = draw(st.text("0123456789", min_size=0, max_size=25))
    body = f"{whole}.{frac}" if draw(st.booleans()) else whole
    if whole.strip("0") == "" and frac.strip("0") == "":
        body = "1" + body
    if kind == "exponent":
        sign = draw(st.sampled_from(["", "+", "-"]))
        body += draw(st.sampled_from(["e", "E"])) + sign + str(draw(st.integers(0, 40)))
    return draw(st.sampled_from(["", "+"])) + body


@st.composite
def missing_texts(draw: st.DrawFn) -> str:
    """A missing marker in any case, with blanks around it."""
    marker = draw(st.sampled_from(MISSING))
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in marker)
    return draw(st.sampled_from(["", " ", "  ", "\t"])) + cased + draw(st.sampled_from(["", " ", "\t"]))


@dataclass
class Case:
    text: str
    plain: bool  # no damage: the fast path must answer


def _cell(draw: st.DrawFn, missing_rate: float) -> str:
    if draw(st.floats(0, 1)) < missing_rate:
        return draw(missing_texts())
    text = draw(number_texts())
    if draw(st.integers(0, 9)) == 0:
        text = " " + text + draw(st.sampled_from(["", " ", "\t"]))
    return text


@st.composite
def csv_cases(draw: st.DrawFn) -> Case:
    layout = draw(st.sampled_from(["classic", "download"]))
    values = draw(st.lists(st.sampled_from(VALUE_COLUMNS), unique=True, max_size=len(VALUE_COLUMNS)))
    extra = draw(st.lists(st.sampled_from(IGNORED_COLUMNS), unique=True, max_size=2))
    names = draw(st.permutations(["Close", *values, *extra]))
    if layout == "classic":
        where = draw(st.integers(0, len(names)))
        header = [*names[:where], "Date", *names[where:]]
    else:
        header = ["Date", *names]
    n = draw(st.integers(1, 25))
    start = draw(st.dates(dt.date(1990, 1, 1), dt.date(2030, 1, 1)))
    steps = draw(st.lists(st.integers(1, 5), min_size=n, max_size=n))
    days = [start + dt.timedelta(days=sum(steps[: i + 1])) for i in range(n)]
    if draw(st.booleans()):
        days = draw(st.permutations(days))
    form = draw(st.sampled_from(["plain", "plain", "plain", "padded", "naive-time", "aware"]))
    missing_rate = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    empty_rate = draw(st.sampled_from([0.0, 0.0, 0.2]))
    rows = []
    for day in days:
        date = {
            "plain": day.isoformat(),
            "padded": f" {day.isoformat()}\t",
            "naive-time": f"{day.isoformat()} 00:00:00",
            "aware": f"{day.isoformat()} 00:00:00{draw(st.sampled_from(OFFSETS))}",
        }[form]
        empty = draw(st.floats(0, 1)) < empty_rate
        cells = []
        for name in header:
            if name == "Date":
                cells.append(date)
            elif name in ("Capital Gains", "Note", ""):
                cells.append(draw(st.sampled_from(["", "0.0", "abc", " x y "])))
            elif empty and name in ("Open", "High", "Low", "Close", "Adj Close"):
                cells.append(draw(missing_texts()))
            else:
                cells.append(_cell(draw, missing_rate))
        rows.append(",".join(cells))
    if layout == "classic":
        head = [",".join(header)]
    else:
        head = [
            "Price," + ",".join(names),
            "Ticker," + ",".join(SYMBOL if draw(st.booleans()) else "x" for _ in names),
            "Date" + "," * len(names),
        ]
        if draw(st.booleans()):
            head[0], head[1] = head[1], head[0]
    lines = [*head, *rows]
    damage = draw(st.sampled_from([None, None, None, *DAMAGE]))
    if damage is not None:
        lines = _damage(draw, damage, lines, len(head), header)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + (newline if draw(st.integers(0, 5)) else "")
    if damage == "bom":
        text = "\ufeff" + text
    if damage == "lone-cr":
        text = text.replace(newline, "\r", 1)
    return Case(text, damage is None)


def _damage(draw: st.DrawFn, damage: str, lines: list[str], heads: int, header: list[str]) -> list[str]:
    at = draw(st.integers(heads, len(lines)))
    row = draw(st.integers(heads, len(lines) - 1))
    cells = lines[row].split(",")
    col = draw(st.integers(0, len(cells) - 1))
    date_col = header.index("Date")
    value_col = draw(st.sampled_from([i for i, h in enumerate(header) if h == "Close"]))
    if damage == "garbage-line":
        return [*lines[:at], "<html><body>502 Bad Gateway</body></html>", *lines[at:]]
    if damage == "extra-field":
        cells.append("7")
    elif damage == "missing-field":
        cells.pop()
    elif damage == "bad-number":
        cells[value_col] = draw(st.sampled_from(["abc", "N/A?", "1.2.3", "1e", "0x10", "--1", ". 5"]))
    elif damage == "bad-date":
        cells[date_col] = draw(st.sampled_from(["01/03/2019", "2019-1-02", "", "20190102", "+2019-01-02"]))
    elif damage == "impossible-date":
        cells[date_col] = draw(st.sampled_from(["2019-02-30", "2019-13-01", "2019-00-10", "0000-01-01"]))
    elif damage == "quoted-cell":
        cells[col] = f'"{cells[col]}"'
    elif damage == "blank-line":
        return [*lines[:at], draw(st.sampled_from(["", " ", "\t "])), *lines[at:]]
    elif damage == "blank-looking-row":
        return [*lines[:at], "," * (len(header) - 1), *lines[at:]]
    elif damage == "infinite":
        cells[value_col] = draw(st.sampled_from(["inf", "-Infinity", "1e400", "INF"]))
    elif damage == "nan-payload":
        cells[value_col] = draw(st.sampled_from(["nan(1)", "+nan", "-NaN", "NaN "]))
    elif damage == "underscore-number":
        cells[value_col] = "1_000.5"
    elif damage == "duplicate-date":
        return [*lines, lines[row]]
    elif damage == "mixed-date-forms":
        cells[date_col] = cells[date_col].strip()[:10] + draw(st.sampled_from([" 00:00:00-05:00", " 10:00"]))
    elif damage == "zero-price":
        cells[value_col] = draw(st.sampled_from(["0", "-1.5", "0e5"]))
    elif damage == "non-ascii":
        cells[col] = cells[col] + draw(st.sampled_from(["\u00a0", "\u2003", "\u0661"]))
    elif damage == "trailing-blank-lines":
        return [*lines, "", " ", ""]
    elif damage == "header-only":
        return lines[:heads]
    lines[row] = ",".join(cells)
    return lines


# -- comparing the two parsers ----------------------------------------------------------------


@dataclass
class Outcome:
    frame: pd.DataFrame | None
    error: tuple[type[BaseException], str] | None
    empty_rows: list[dt.date]
    logs: list[tuple[int, str]]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


@contextmanager
def logged() -> Iterator[Records]:
    """The records the files source logs meanwhile, as (level, message), at every level."""
    logger = logging.getLogger("sensitivity.sources.files")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(parse: Callable[..., pd.DataFrame | None], text: str) -> Outcome:
    empty: list[dt.date] = []
    with logged() as logs:
        try:
            frame = parse(text, SYMBOL, origin=ORIGIN, empty_rows=empty)
        except Exception as exc:
            return Outcome(None, (type(exc), str(exc)), empty, logs.records)
    return Outcome(frame, None, empty, logs.records)


def assert_same_frame(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_freq=True)
    assert list(got.columns) == list(want.columns)
    assert got.index.freq is None
    assert want.index.freq is None
    assert np.array_equal(got.index.to_numpy(), want.index.to_numpy())
    for col in want.columns:
        a, b = got[col].to_numpy(), want[col].to_numpy()
        assert a.dtype == b.dtype == np.float64
        assert np.array_equal(a.view(np.int64), b.view(np.int64)), col  # bit for bit, NaN too


def assert_same(got: Outcome, want: Outcome) -> None:
    assert got.error == want.error
    if want.frame is not None:
        assert got.frame is not None
        assert_same_frame(got.frame, want.frame)
    assert got.empty_rows == want.empty_rows
    assert got.logs == want.logs


@SETTINGS
@given(csv_cases())
def test_fast_path_gives_what_the_reference_gives(case: Case) -> None:
    want = run(csv_price_frame_reference, case.text)
    assert_same(run(csv_price_frame, case.text), want)
    fast = run(csv_price_frame_fast, case.text)
    if fast.frame is None and fast.error is None:  # declined: nothing logged, nothing noted
        assert not case.plain, "the fast path declined a plain file"
        assert fast.empty_rows == []
        assert fast.logs == []
    else:
        assert_same(fast, want)


def test_fast_path_answers_the_realistic_files() -> None:
    text = "Date,Open,High,Low,Close,Adj Close,Volume\n" + "".join(
        f"{d.date()},{p:.6f},{p * 1.01!r},{p * 0.99!r},{p!r},{p * 0.98!r},{int(p * 1000)}\n"
        for d, p in zip(
            pd.bdate_range("2005-01-03", periods=500),
            (100 * np.exp(np.cumsum(np.sin(np.arange(500)) / 50))).tolist(),
            strict=True,
        )
    )
    fast = csv_price_frame_fast(text, SYMBOL, origin=ORIGIN)
    assert fast is not None
    assert_same_frame(fast, csv_price_frame_reference(text, SYMBOL, origin=ORIGIN))
    for newline in ("\r\n", "\n"):
        download = (
            "Price,Adj Close,Close,High,Low,Open,Volume\nTicker,X,X,X,X,X,X\nDate,,,,,,\n"
            "2020-08-31,125.82,129.04,131.0,126.0,127.58,225702700\n"
            "2020-09-01,null,null,null,null,null,null\n"
            "2020-09-02, NULL ,131.40,137.98,127.0,137.59,200119000\n"
        ).replace("\n", newline)
        empty: list[dt.date] = []
        frame = csv_price_frame_fast(download, SYMBOL, origin=ORIGIN, empty_rows=empty)
        assert frame is not None
        assert empty == [dt.date(2020, 9, 1)]
        assert_same_frame(frame, csv_price_frame_reference(download, SYMBOL, origin=ORIGIN))


# -- the errors stay the reference's ---------------------------------------------------------

BASE = "Date,Open,High,Low,Close,Adj Close,Volume\n" + "".join(
    f"2020-01-{d:02d},{d}.5,{d}.75,{d}.25,{d}.5,{d}.4,{1000 + d}\n" for d in range(2, 22)
)


def _lines() -> list[str]:
    return BASE.splitlines()


def _with(row: int, col: int, value: str) -> str:
    lines = _lines()
    cells = lines[row].split(",")
    cells[col] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message", "declined"),
    [
        pytest.param(
            "\n".join([*_lines()[:10], "<html><body>502 Bad Gateway</body></html>", *_lines()[10:]]) + "\n",
            r"X: X\.csv line 11 has 1 fields but the header has 7; fix the line",
            True,
            id="garbage-line",
        ),
        pytest.param(
            _with(3, 4, "12,5O"), r"X\.csv line 4 has 8 fields but the header has 7", True, id="garbage-cell"
        ),
        pytest.param(
            BASE.replace("2020-01-05,5.5,5.75,5.25,5.5,5.4,1005\n", "2020-01-05,5.5\n"),
            r"line 5 has 2 fields but the header has 7",
            True,
            id="missing-fields",
        ),
        pytest.param(
            _with(3, 4, "N/A?"),
            r"X\.csv line 4: close value 'N/A\?' is not a number",
            True,
            id="not-a-number",
        ),
        pytest.param(_with(6, 1, " 1_0 "), None, True, id="underscore-number"),
        pytest.param(
            _with(6, 2, "nan(1)"), r"line 7: high value 'nan\(1\)' is not a number", True, id="nan-payload"
        ),
        pytest.param(
            _with(3, 0, "01/03/2019"),
            r"line 4: the date '01/03/2019' is not a date written",
            True,
            id="bad-date",
        ),
        pytest.param(_with(3, 0, ""), r"line 4: the date is empty", True, id="empty-date"),
        pytest.param(
            _with(3, 0, "2020-02-30"), r"line 4: '2020-02-30' is not a valid date", True, id="impossible-date"
        ),
        pytest.param(
            _with(1, 0, "2020-01-02 00:00:00-05:00"),
            r"mixes dates with a UTC offset \(line 2: '2020-01-02 00:00:00-05:00'\) and without one \(line 3",
            True,
            id="mixed-tz",
        ),
        pytest.param(BASE + "\n\n", None, True, id="trailing-blank-lines"),
        pytest.param(
            BASE.replace("\n2020-01-07", "\n,,,,,,\n2020-01-07"), None, True, id="blank-looking-row"
        ),
        pytest.param(BASE.replace("\n", "\r", 3), None, True, id="lone-cr"),
        pytest.param(
            'Date,Close\n2019-01-02,"1\n', r"X\.csv line \d+ is not valid CSV", True, id="open-quote"
        ),
        pytest.param('Date,Close\n2019-01-02,"1\n2"\n', None, True, id="newline-in-quotes"),
        pytest.param("\ufeff" + BASE, None, False, id="bom"),
        pytest.param(_with(5, 4, "inf"), r"X\.csv line 6 .*close is inf, not a finite", True, id="infinite"),
        pytest.param(
            _with(5, 4, "0"),
            r"line 6 \(2020-01-06\): close is 0\.0; prices must be positive",
            False,
            id="zero",
        ),
        pytest.param(
            BASE + _lines()[7] + "\n",
            r"has the date 2020-01-08 twice \(line 8 and line 22\); keep one row per date",
            False,
            id="duplicate-date",
        ),
        pytest.param("Date,Close\n", r"has a header but no rows", True, id="header-only"),
        pytest.param(
            "Date,Close,Close\n2019-01-02,1,2\n", r"two columns meaning close", True, id="two-closes"
        ),
        pytest.param("Day,Close\n2019-01-02,1\n", r"has no Date column", True, id="no-date"),
        pytest.param(
            "Price,Close\nTicker,MSFT\nDate,\n2019-01-02,1\n",
            r"X\.csv holds prices for MSFT \(its Ticker header line\), not X",
            True,
            id="other-ticker",
        ),
    ],
)
def test_damaged_texts_keep_the_reference_message(text: str, message: str | None, declined: bool) -> None:
    want = run(csv_price_frame_reference, text)
    if message is not None:
        assert want.error is not None
        assert re.search(message, want.error[1]), want.error
    assert_same(run(csv_price_frame, text), want)
    fast = run(csv_price_frame_fast, text)
    if declined:
        assert fast.frame is None
        assert fast.error is None
        assert fast.logs == []
    else:
        assert_same(fast, want)


# -- pyarrow parses numbers and dates as Python does -------------------------------------------

HARD_NUMBERS = [
    "0.1",
    "0.3",
    "1.0000000000000002",
    "9007199254740993",  # 2**53 + 1: halfway, ties to even
    "9007199254740995",
    "9007199254740993.0000000000000000001",  # just above halfway
    "2.2250738585072011e-308",  # the largest subnormal's neighbourhood
    "2.2250738585072012e-308",
    "4.9e-324",
    "2.4703282292062327e-324",  # just below half the smallest subnormal
    "2.4703282292062328e-324",
    "1.7976931348623157e308",
    "123456789.12345678",
    "169.710007",
    "0.30000000000000004",
    "8.98846567431158e307",
    "5e-324",
    "1e23",
    "8.589973e9",
    "1.00000000000000011102230246251565404236316680908203125",  # exactly halfway 1 .. 1+ulp
    "1.00000000000000011102230246251565404236316680908203124",
    "1.00000000000000011102230246251565404236316680908203126",
    "7.0420557077594588669468784357561207962098443483187940792729600000e59",
    "00012.5000",
    "+3.25",
    "-0",
    "1.e5",
    ".5E-3",
    "472.6499938964844",
    "0." + "0" * 30 + "1234567890123456789",
    "9" * 40,
]


def _bits(values: np.ndarray) -> list[str]:
    return [struct.pack("<d", float(v)).hex() for v in values]


def _csv_typed(texts: list[str], null_values: list[str] | None = None) -> np.ndarray:
    """``texts`` read by pyarrow's CSV reader as a float64 column (as the fast path reads)."""
    body = "".join(f"2020-01-01,{t}\n" for t in texts).encode()
    table = pa_csv.read_csv(
        io.BytesIO(body),
        read_options=pa_csv.ReadOptions(column_names=["d", "v"]),
        convert_options=pa_csv.ConvertOptions(
            column_types={"d": pa.string(), "v": pa.float64()},
            null_values=[] if null_values is None else null_values,
        ),
    )
    return np.asarray(table.column("v").to_numpy(), dtype=np.float64)


def test_arrow_parses_hard_numbers_like_python() -> None:
    want = _bits(np.array([float(t) for t in HARD_NUMBERS]))
    assert _bits(pc.cast(pa.array(HARD_NUMBERS), pa.float64()).to_numpy()) == want
    assert _bits(_csv_typed(HARD_NUMBERS)) == want
    # The reference parser agrees with float() too.
    text = "Date,Close,Volume\n" + "".join(
        f"{dt.date(2000, 1, 1) + dt.timedelta(days=i)},1,{t}\n" for i, t in enumerate(HARD_NUMBERS)
    )
    frame = csv_price_frame_reference(text, SYMBOL, origin=ORIGIN)
    assert _bits(frame["volume"].to_numpy()) == want
    fast = csv_price_frame_fast(text, SYMBOL, origin=ORIGIN)
    assert fast is not None
    assert _bits(fast["volume"].to_numpy()) == want


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False).map(repr),
            st.from_regex(r"\A[+-]?[0-9]{1,25}(\.[0-9]{0,25})?([eE][+-]?[0-9]{1,3})?\Z"),
            st.from_regex(r"\A[+-]?\.[0-9]{1,30}([eE][+-]?[0-9]{1,3})?\Z"),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_arrow_parses_random_numbers_like_python(texts: list[str]) -> None:
    want = _bits(np.array([float(t) for t in texts]))
    assert _bits(pc.cast(pa.array(texts), pa.float64()).to_numpy()) == want
    assert _bits(_csv_typed(texts)) == want


@settings(max_examples=300, deadline=None)
@given(st.text("0123456789+-.eE nNaAiIfF_()x\t", min_size=1, max_size=8))
def test_arrow_accepts_no_finite_number_python_refuses(text: str) -> None:
    """Whatever pyarrow reads as a finite number, Python's ``float()`` reads the same."""
    readers: list[Callable[[], float]] = [
        lambda: pc.cast(pa.array([text]), pa.float64())[0].as_py(),  # the text route
        lambda: float(_csv_typed([text])[0]),  # the typed route (it trims blanks and tabs)
    ]
    for read in readers:
        try:
            got = read()
        except (pa.ArrowInvalid, ValueError):
            continue
        if not np.isfinite(got):
            continue  # the fast path declines non-finite values
        assert _bits(np.array([got])) == _bits(np.array([float(text)])), text


def test_arrow_dates_are_numpy_dates() -> None:
    """``date32`` casts accept exactly the valid ``YYYY-MM-DD`` days numpy reads, the same."""
    texts = [
        f"{y:04d}-{m:02d}-{d:02d}"
        for y in (1, 999, 1600, 1900, 1999, 2000, 2023, 2024, 2100, 9999)
        for m in range(0, 14)
        for d in range(0, 33)
    ]
    texts += [
        "2019-01-01 ",
        " 2019-01-01",
        "2019-1-01",
        "20190101",
        "+2019-01-01",
        "2019-01-01T00:00",
        "2019/01/01",
    ]
    accepted = 0
    for text in texts:
        try:
            cast = pc.cast(pa.array([text]), pa.date32())
        except (pa.ArrowInvalid, ValueError):
            continue
        got = cast.to_numpy(zero_copy_only=False)[0]
        accepted += 1
        assert len(text) == 10, text
        assert text[4] == text[7] == "-", text
        assert text.replace("-", "").isdigit(), text
        assert got == np.datetime64(text, "D"), text
        assert got == np.datetime64(dt.date.fromisoformat(text), "D"), text
    valid = [t for t in texts[: 10 * 14 * 33] if _is_date(t)]
    assert accepted == len(valid)
    got = pc.cast(pa.array(valid), pa.date32()).to_numpy(zero_copy_only=False)
    assert np.array_equal(got, np.array(valid, dtype="datetime64[D]"))


def _is_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True
