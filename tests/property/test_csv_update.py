"""A daily update of a CSV read from its checked prefix against reading the whole file (hypothesis).

Yesterday's file is read whole, as a backfill does, and may give a checked prefix; today's file
(yesterday's lines, then new ones, or anything else: damaged, unsorted, rewritten) is then read
for a range with that prefix and without it.  For every pair:

* the two reads give the same frame bit for bit, the same quality report, the same next prefix,
  the same log records, or the same error (type and message);
* on plain files that only grew by plain priced days (the daily case), the read with the prefix
  answers from the file's last lines (so the comparison above is not vacuous).
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from test_csv_fast_path import SETTINGS, SYMBOL, assert_same_frame, csv_cases, logged, missing_texts

from sensitivity.sources import files as files_module
from sensitivity.sources.files import FilesSource
from sensitivity.sources.quality import CheckedPrices

NAMES = ["Open", "High", "Low", "Close", "Adj Close", "Volume"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> FilesSource:
    return FilesSource(tmp_path_factory.mktemp("update-source"))


Result = tuple[CheckedPrices | None, tuple[type[BaseException], str] | None, list[tuple[int, str]]]


def fetch(source: FilesSource, start: dt.date, end: dt.date, prefix: str | None) -> Result:
    with logged() as logs:
        try:
            got = source.fetch_checked(SYMBOL, start, end, checked_prefix=prefix)
        except Exception as exc:
            return None, (type(exc), str(exc)), logs.records
    return got, None, logs.records


def yesterdays_prefix(source: FilesSource, text: bytes) -> str | None:
    (source.folder / f"{SYMBOL}.csv").write_bytes(text)
    try:
        return source.fetch_checked(SYMBOL, dt.date(1900, 1, 1), dt.date(2100, 1, 1)).checked_prefix
    except Exception:
        return None


def assert_same_read(source: FilesSource, today: bytes, prefix: str, start: dt.date, end: dt.date) -> Result:
    (source.folder / f"{SYMBOL}.csv").write_bytes(today)
    whole, whole_error, whole_logs = fetch(source, start, end, None)
    got, error, logs = fetch(source, start, end, prefix)
    assert error == whole_error
    assert logs == whole_logs
    if whole is not None:
        assert got is not None
        assert_same_frame(got.frame, whole.frame)
        assert got.quality == whole.quality
        assert got.checked_prefix == whole.checked_prefix
    return got, error, logs


def _value(draw: st.DrawFn, missing_rate: float) -> str:
    if draw(st.floats(0, 1)) < missing_rate:
        return draw(missing_texts())
    x = draw(st.floats(1e-6, 1e9, allow_nan=False, allow_infinity=False))
    return draw(st.sampled_from([repr(x), f"{x:.6f}", f"{x:.10e}"]))


@st.composite
def daily_files(draw: st.DrawFn) -> tuple[bytes, bytes, list[dt.date], int, bool]:
    """(yesterday, today, every day, the first new day's index, whether today's file is
    yesterday's grown by plain lines, not damaged): a Date-first CSV with strictly increasing
    days, missing markers and rows without a price."""
    names = draw(st.permutations(NAMES))
    layout = draw(st.sampled_from(["classic", "download"]))
    head = (
        ["Date," + ",".join(names)]
        if layout == "classic"
        else [
            "Price," + ",".join(names),
            "Ticker," + ",".join(SYMBOL for _ in names),
            "Date" + "," * len(names),
        ]
    )
    n = draw(st.integers(2, 40))
    first = draw(st.dates(dt.date(1990, 1, 1), dt.date(2030, 1, 1)))
    steps = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    days = [first + dt.timedelta(days=sum(steps[: i + 1])) for i in range(n)]
    new = draw(st.integers(1, n - 1))  # lines [new:] arrive today
    missing_rate = draw(st.sampled_from([0.0, 0.0, 0.1]))
    rows = []
    for day in days:
        empty = draw(st.integers(0, 60)) == 0
        cells = ["null" if empty and name != "Volume" else _value(draw, missing_rate) for name in names]
        rows.append(",".join([day.isoformat(), *cells]))
    plain_new = True
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    bom = "\ufeff" if draw(st.integers(0, 5)) == 0 else ""
    yesterday = bom + newline.join([*head, *rows[:new]]) + newline
    today = bom + newline.join([*head, *rows]) + (newline if draw(st.integers(0, 4)) else "")
    if draw(st.integers(0, 3)) == 0:  # damage: one byte of today's file changed anywhere
        at = draw(st.integers(0, len(today) - 1))
        today = (
            today[:at] + draw(st.sampled_from(["x", ",", "-", "0", "\n", '"', " ", "\r"])) + today[at + 1 :]
        )
        plain_new = False
    return yesterday.encode(), today.encode(), days, new, plain_new


@SETTINGS
@given(daily_files(), st.data())
def test_a_daily_update_reads_what_the_whole_file_reads(
    source: FilesSource, file: tuple[bytes, bytes, list[dt.date], int, bool], data: st.DataObject
) -> None:
    yesterday, today, days, new, plain_new = file
    prefix = yesterdays_prefix(source, yesterday)
    event(f"yesterday gave a prefix: {prefix is not None}")
    if prefix is None:
        return  # yesterday's file gave none (a row without a price): every read is whole
    lo = data.draw(st.integers(max(0, new - 8), len(days) - 1))
    start = days[lo] - dt.timedelta(days=data.draw(st.integers(0, 1)))
    end = days[-1] + dt.timedelta(days=data.draw(st.integers(0, 2)))
    answered: list[bool] = []
    update = files_module.csv_update_frame

    def spy(*args: object, **kwargs: object) -> object:
        got = update(*args, **kwargs)  # type: ignore[arg-type]
        answered.append(got is not None)
        return got

    files_module.csv_update_frame = spy  # type: ignore[assignment]
    try:
        _, error, _ = assert_same_read(source, today, prefix, start, end)
    finally:
        files_module.csv_update_frame = update
    event(f"update answered: {answered == [True]}, error: {error is not None}, plain: {plain_new}")
    if plain_new and lo >= 2 and error is None:
        assert answered == [True]  # the range does not reach the first line: the update answers


@SETTINGS
@given(csv_cases(), st.data())
def test_any_text_read_from_a_prefix_of_its_lines_reads_what_the_whole_file_reads(
    source: FilesSource, case: object, data: st.DataObject
) -> None:
    text: str = case.text  # type: ignore[attr-defined]
    raw = text.encode()
    ends = [i + 1 for i, b in enumerate(raw) if b == 0x0A]
    if not ends:
        return
    cut = data.draw(st.sampled_from(ends))
    prefix = yesterdays_prefix(source, raw[:cut])
    event(f"yesterday gave a prefix: {prefix is not None}")
    if prefix is None:
        return
    start = data.draw(st.dates(dt.date(1990, 1, 1), dt.date(2030, 6, 1)))
    end = start + dt.timedelta(days=data.draw(st.integers(0, 400)))
    assert_same_read(source, raw, prefix, start, end)


def test_the_generators_reach_the_update(source: FilesSource) -> None:
    """Guard against a vacuous property: a plain daily file is answered from its last lines."""
    rows = [f"2020-01-{d:02d},1.5,2.5,1.0,2.0,1.9,100" for d in range(1, 20)]
    yesterday = ("Date,Open,High,Low,Close,Adj Close,Volume\n" + "\n".join(rows[:18]) + "\n").encode()
    today = yesterday + (rows[18] + "\n").encode()
    prefix = yesterdays_prefix(source, yesterday)
    assert prefix is not None
    got, error, _ = assert_same_read(source, today, prefix, dt.date(2020, 1, 15), dt.date(2020, 1, 19))
    assert error is None
    assert got is not None
    assert isinstance(got.frame, pd.DataFrame)
    assert len(got.frame) == 5
    data = (source.folder / f"{SYMBOL}.csv").read_bytes()
    mark = files_module.CheckedPrefix.loads(prefix)
    assert mark is not None
    assert files_module.csv_update_frame(
        data, mark, SYMBOL, dt.date(2020, 1, 15), dt.date(2020, 1, 19), origin="X.csv"
    )
