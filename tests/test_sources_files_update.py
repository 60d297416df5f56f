"""A daily update of a CSV source file: only its last lines are parsed, with the whole read's result.

The ``files`` source reports a :class:`CheckedPrefix` (size and SHA-256 of the complete lines it
read and checked); handed back with the next fetch, a file that still starts with those bytes is
parsed only from the first line of the asked range (or the first new line) on.  Every test here
compares that read with the whole file's read of the same file: the same frame bit for bit, the
same quality report, the same log records and the same errors with the same line numbers.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sensitivity.errors import DataValidationError, EmptyDataError
from sensitivity.sources import files as files_module
from sensitivity.sources.base import fetch_checked
from sensitivity.sources.files import CHECKS_VERSION, CheckedPrefix, FilesSource
from sensitivity.sources.quality import CheckedPrices

HEADER = "Date,Open,High,Low,Close,Adj Close,Volume"
DOWNLOAD_HEADER = "Price,Adj Close,Close,High,Low,Open,Volume\nTicker,KO,KO,KO,KO,KO,KO\nDate,,,,,,"
FIRST = dt.date(2019, 1, 2)


def days(n: int) -> list[dt.date]:
    """``n`` weekdays from :data:`FIRST`."""
    out: list[dt.date] = []
    day = FIRST
    while len(out) < n:
        if day.weekday() < 5:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


def row(day: dt.date, i: int, *, download: bool = False) -> str:
    """A plausible price line with many digits (open, high, low, close, adj close, volume)."""
    close = 40.0 + 0.37 * i + 0.013 * (i % 7)
    o, h, lo, c, a, v = close * 0.998, close * 1.004, close * 0.994, close, close * 0.97, 1000 + 17 * i
    if download:
        return f"{day},{a!r},{c!r},{h!r},{lo!r},{o!r},{v}"
    return f"{day},{o!r},{h!r},{lo!r},{c!r},{a!r},{v}"


def csv_text(n: int, *, download: bool = False, newline: str = "\n", trailing: bool = True) -> str:
    lines = [DOWNLOAD_HEADER if download else HEADER] + [
        row(d, i, download=download) for i, d in enumerate(days(n))
    ]
    text = "\n".join(lines).replace("\n", newline)
    return text + newline if trailing else text


@pytest.fixture
def source(tmp_path: Path) -> FilesSource:
    folder = tmp_path / "prices"
    folder.mkdir()
    return FilesSource(folder)


def put(source: FilesSource, text: str | bytes, symbol: str = "KO") -> Path:
    path = source.folder / f"{symbol}.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


class Parsed:
    """The texts the CSV parsers were handed (to see how much of the file was parsed)."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    @property
    def lines(self) -> int:
        return sum(t.count("\n") for t in self.texts)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Parsed:
    seen = Parsed()
    fast, reference = files_module.csv_price_frame_fast, files_module.csv_price_frame_reference

    def spy_fast(text: str, *args: object, **kwargs: object) -> pd.DataFrame | None:
        seen.texts.append(text)
        return fast(text, *args, **kwargs)  # type: ignore[arg-type]

    def spy_reference(text: str, *args: object, **kwargs: object) -> pd.DataFrame:
        seen.texts.append(text)
        return reference(text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(files_module, "csv_price_frame_fast", spy_fast)
    monkeypatch.setattr(files_module, "csv_price_frame_reference", spy_reference)
    return seen


def outcome(
    source: FilesSource, start: dt.date, end: dt.date, prefix: str | None, caplog: pytest.LogCaptureFixture
) -> tuple[CheckedPrices | None, tuple[type[BaseException], str] | None, list[tuple[str, int, str]]]:
    """What one fetch gives: its result or its error, and its log records."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sensitivity"):
        try:
            got = source.fetch_checked("KO", start, end, checked_prefix=prefix)
        except Exception as exc:
            return None, (type(exc), str(exc)), caplog.record_tuples
    return got, None, caplog.record_tuples


def assert_same_fetch(
    source: FilesSource, start: dt.date, end: dt.date, prefix: str | None, caplog: pytest.LogCaptureFixture
) -> CheckedPrices | None:
    """The fetch with ``prefix`` gives exactly what the whole read gives; returns it."""
    whole, whole_error, whole_logs = outcome(source, start, end, None, caplog)
    got, error, logs = outcome(source, start, end, prefix, caplog)
    assert error == whole_error
    assert logs == whole_logs
    if whole is None:
        assert got is None
        return None
    assert got is not None
    pd.testing.assert_frame_equal(got.frame, whole.frame, check_exact=True, check_freq=True)
    assert got.quality == whole.quality
    assert got.checked_prefix == whole.checked_prefix
    return got


def backfill(source: FilesSource, text: str) -> str:
    """Write ``text`` and read it whole, as a backfill does; the prefix it reports."""
    put(source, text)
    got = source.fetch_checked("KO", FIRST, dt.date(2030, 1, 1))
    assert got.checked_prefix is not None
    return got.checked_prefix


@pytest.mark.parametrize(
    ("download", "newline", "bom"),
    [
        (False, "\n", False),
        (False, "\r\n", False),
        (True, "\r\n", False),
        (False, "\n", True),
        (True, "\n", True),
    ],
    ids=["classic", "crlf", "download-crlf", "bom", "download-bom"],
)
def test_an_update_parses_only_the_last_lines_and_gives_the_whole_read(
    source: FilesSource,
    parsed: Parsed,
    caplog: pytest.LogCaptureFixture,
    download: bool,
    newline: str,
    bom: bool,
) -> None:
    lead = "\ufeff" if bom else ""
    old = lead + csv_text(300, download=download, newline=newline)
    prefix = backfill(source, old)
    assert CheckedPrefix.loads(prefix) == CheckedPrefix(len(old.encode()), CheckedPrefix.loads(prefix).sha256)  # type: ignore[union-attr]
    new = lead + csv_text(302, download=download, newline=newline)
    assert new.startswith(old)
    put(source, new)
    d = days(302)
    start = d[-8]  # the last six stored days and the two new ones
    parsed.texts.clear()
    got = assert_same_fetch(source, start, d[-1], prefix, caplog)
    assert got is not None
    assert len(got.frame) == 8
    # The whole read parsed 302 data lines; the update its header and 8 lines.
    assert [t.count("\n") for t in parsed.texts] == [302 + (3 if download else 1), (3 if download else 1) + 8]
    # The next day goes on from the new prefix: the file as it is now.
    assert got.checked_prefix == CheckedPrefix.of_whole(new.encode(), "KO").dumps()  # type: ignore[union-attr]


def test_a_file_without_a_final_newline_is_checked_up_to_its_last_complete_line(
    source: FilesSource, parsed: Parsed, caplog: pytest.LogCaptureFixture
) -> None:
    old = csv_text(50, trailing=False)
    prefix = backfill(source, old)
    assert CheckedPrefix.loads(prefix).size == old.rfind("\n") + 1  # type: ignore[union-attr]
    # The unfinished last line is finished and a day is added: both are parsed again.
    new = csv_text(51)
    put(source, new)
    d = days(51)
    parsed.texts.clear()
    assert assert_same_fetch(source, d[-3], d[-1], prefix, caplog) is not None
    assert parsed.texts[-1].count("\n") == 4  # the header and three lines: one checked, one finished, one new


def test_the_range_asked_may_reach_into_the_checked_lines_or_start_after_them(
    source: FilesSource, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = backfill(source, csv_text(100))
    put(source, csv_text(103))
    d = days(103)
    for start, end in [
        (d[60], d[102]),  # 43 lines, 40 of them checked before
        (d[101], d[102]),  # only new lines
        (d[102] + dt.timedelta(days=1), d[102] + dt.timedelta(days=9)),  # after the last day: an error
        (d[99], d[99]),  # a checked line only
        (d[0], d[102]),  # every line: read whole
    ]:
        assert_same_fetch(source, start, end, prefix, caplog)


def test_a_range_far_into_the_checked_lines_reads_the_whole_file(
    source: FilesSource, parsed: Parsed, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = backfill(source, csv_text(1200))
    put(source, csv_text(1201))
    d = days(1201)
    parsed.texts.clear()
    assert_same_fetch(source, d[1201 - files_module._MAX_LINES_BACK - 5], d[-1], prefix, caplog)
    assert [t.count("\n") for t in parsed.texts] == [1202, 1202]


@pytest.mark.parametrize("where", ["first", "middle", "last-checked"])
def test_a_change_to_the_checked_lines_reads_the_whole_file_and_names_the_line(
    source: FilesSource, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A file damaged anywhere fails its symbol on every run, with the line named, whatever
    was checked before (docs/reliability.md)."""
    text = csv_text(200)
    prefix = backfill(source, text)
    lines = csv_text(201).split("\n")
    k = {"first": 1, "middle": 100, "last-checked": 200}[where]
    lines[k] = lines[k].replace(",", ",-", 2).replace(",-", ",", 1)  # a negative high
    put(source, "\n".join(lines))
    d = days(201)
    assert_same_fetch(source, d[-6], d[-1], prefix, caplog)
    with pytest.raises(DataValidationError, match=rf"KO\.csv line {k + 1} .*high is -"):
        source.fetch_checked("KO", d[-6], d[-1], checked_prefix=prefix)


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("a,b,c", DataValidationError),  # a line that is no price line
        ("{day},1.0,2.0,0.5,1.5", DataValidationError),  # fields missing
        ("{day},1.0,2.0,0.5,abc,1.4,100", DataValidationError),  # not a number
        ("{day},1.0,2.0,0.5,0.0,1.4,100", DataValidationError),  # a zero close
        ("{day},1.0,2.0,0.5,inf,1.4,100", DataValidationError),  # infinite
        ("{day},1.0,2.0,0.5,1.5,1.4,100,7", DataValidationError),  # a field too many
    ],
)
def test_a_damaged_new_line_gives_the_whole_reads_error_with_its_line_number(
    source: FilesSource, caplog: pytest.LogCaptureFixture, damage: str, error: type[Exception]
) -> None:
    prefix = backfill(source, csv_text(150))
    d = days(152)
    put(source, csv_text(151) + damage.format(day=d[151]) + "\n")
    assert_same_fetch(source, d[-5], d[-1], prefix, caplog)
    with pytest.raises(error, match=r"KO\.csv line 153"):
        source.fetch_checked("KO", d[-5], d[-1], checked_prefix=prefix)


@pytest.mark.parametrize(
    "tail",
    [
        "{old},1.0,2.0,0.5,1.5,1.4,100\n",  # a date already in the checked lines
        "{older},1.0,2.0,0.5,1.5,1.4,100\n",  # an earlier date: the file is no longer sorted
        "\n{new},1.0,2.0,0.5,1.5,1.4,100\n",  # a blank line
        '{new},1.0,2.0,0.5,"1.5",1.4,100\n',  # a quoted cell
        "{new},1.0,2.0,0.5,1.5,1.4,100\r1\n",  # a lone CR
        "{new},null,null,null,null,null,100\n",  # a row without a price
    ],
    ids=["duplicate", "unsorted", "blank", "quoted", "lone-cr", "no-price"],
)
def test_new_lines_that_are_not_plain_later_days_read_the_whole_file(
    source: FilesSource, caplog: pytest.LogCaptureFixture, tail: str
) -> None:
    prefix = backfill(source, csv_text(80))
    d = days(81)
    put(source, csv_text(80) + tail.format(old=d[79], older=d[40], new=d[80]))
    got = assert_same_fetch(source, d[-6], d[-1], prefix, caplog)
    if got is not None and tail.startswith("{new},null"):
        assert got.checked_prefix is None  # its log names the row: the next day reads whole too


@pytest.mark.parametrize(
    "text",
    [
        "Date,Close\n2020-01-03,1.0\n2020-01-02,2.0\n",  # unsorted
        "Date,Close\n2020-01-02,1.0\n2020-01-03,null\n2020-01-06,2.0\n",  # a row without a price
        "Close,Date\n1.0,2020-01-02\n2.0,2020-01-03\n",  # the date not first
        "Date,Close\n2020-01-02,1.0\n\n2020-01-03,2.0\n",  # a blank line
        'Date,Close\n2020-01-02,"1.0"\n2020-01-03,2.0\n',  # quotes
        "Date,Close\n2020-01-02 00:00:00-05:00,1.0\n2020-01-03 00:00:00-05:00,2.0\n",  # times
        "Date,Close\n2020-01-02,1.0\r2020-01-03,2.0\n",  # a lone CR
        "Date,Close\n2020-01-02,1.0",  # no complete data line
    ],
)
def test_files_not_of_the_plain_form_get_no_prefix(source: FilesSource, text: str) -> None:
    put(source, text)
    got = source.fetch_checked("KO", dt.date(2020, 1, 1), dt.date(2020, 1, 31))
    assert got.checked_prefix is None


def test_a_parquet_file_gets_no_prefix_and_a_prefix_handed_to_it_is_ignored(source: FilesSource) -> None:
    frame = pd.DataFrame({"Date": ["2020-01-02", "2020-01-03"], "Close": [1.0, 2.0]})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), source.folder / "KO.parquet")
    foreign = CheckedPrefix(10, "0" * 64).dumps()
    got = source.fetch_checked("KO", dt.date(2020, 1, 1), dt.date(2020, 1, 31), checked_prefix=foreign)
    assert got.checked_prefix is None
    assert len(got.frame) == 2


@pytest.mark.parametrize(
    "prefix",
    [
        "not json",
        "[1, 2]",
        '{"version": 1, "size": 10}',
        '{"version": 1, "size": -5, "sha256": "' + "0" * 64 + '"}',
        '{"version": 1, "size": true, "sha256": "' + "0" * 64 + '"}',
        '{"version": 1, "size": 10, "sha256": "xyz"}',
        '{"version": 99, "size": 10, "sha256": "' + "0" * 64 + '"}',
    ],
)
def test_a_malformed_or_foreign_prefix_is_ignored(source: FilesSource, prefix: str) -> None:
    assert CheckedPrefix.loads(prefix) is None
    put(source, csv_text(20))
    d = days(20)
    assert source.fetch_checked("KO", d[-5], d[-1], checked_prefix=prefix).frame.equals(
        source.fetch_checked("KO", d[-5], d[-1]).frame
    )


def test_a_prefix_of_other_bytes_or_a_longer_file_reads_the_whole_file(
    source: FilesSource, parsed: Parsed, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = backfill(source, csv_text(60))
    mark = CheckedPrefix.loads(prefix)
    assert mark is not None
    d = days(60)
    put(source, csv_text(59))  # the file shrank below the checked size
    parsed.texts.clear()
    assert_same_fetch(source, d[-5], d[-2], prefix, caplog)
    assert all(t.count("\n") == 60 for t in parsed.texts)
    other = CheckedPrefix(mark.size, "f" * 64).dumps()  # the same size, another digest
    put(source, csv_text(61))
    parsed.texts.clear()
    assert_same_fetch(source, d[-5], d[-1], other, caplog)
    assert all(t.count("\n") == 62 for t in parsed.texts)
    old = CheckedPrefix(mark.size, mark.sha256, CHECKS_VERSION - 1)
    assert csv_update_frame_declines(old, source)


def csv_update_frame_declines(prefix: CheckedPrefix, source: FilesSource) -> bool:
    data = (source.folder / "KO.csv").read_bytes()
    return files_module.csv_update_frame(data, prefix, "KO", FIRST, FIRST, origin="KO.csv") is None


def test_the_fetch_helper_hands_the_prefix_only_to_a_source_that_takes_it(source: FilesSource) -> None:
    put(source, csv_text(30))
    d = days(30)
    seen: list[dict[str, object]] = []

    class Plain:
        name = "plain"

        def fetch_checked(self, symbol: str, start: dt.date, end: dt.date, **kwargs: object) -> CheckedPrices:
            seen.append(kwargs)
            return source.fetch_checked(symbol, start, end)

    fetch_checked(Plain(), "KO", d[-3], d[-1], checked_prefix="x")  # type: ignore[arg-type]
    assert seen == [{}]
    got = fetch_checked(
        source, "KO", d[-3], d[-1], checked_prefix=source.fetch_checked("KO", d[0], d[-1]).checked_prefix
    )
    assert got.checked_prefix is not None


def test_empty_range_after_the_checked_lines_gives_the_whole_reads_message(
    source: FilesSource, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = backfill(source, csv_text(40))
    d = days(41)
    put(source, csv_text(40) + f"{d[40]},null,null,null,null,null,5\n")
    assert_same_fetch(source, d[40], d[40], prefix, caplog)
    with pytest.raises(EmptyDataError, match="has no prices between"):
        source.fetch_checked("KO", d[40], d[40], checked_prefix=prefix)
