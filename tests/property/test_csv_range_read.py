"""Reading only a date range of a CSV against reading the whole file (hypothesis).

:func:`csv_range_frame` parses only the lines of a sorted, plainly dated CSV that fall in the
range.  For generated files (both layouts' Date-first form, numbers with many digits, missing
markers, rows without a price, CRLF, a trailing newline or not) and any range:

* when it answers, its frame is the whole file's frame cut to the range, bit for bit, and its
  rows without a price are the whole file's in the range;
* it answers whenever the range holds some of the lines and a close but not all the lines
  (so the comparison above is not vacuous);
* for every text the fast-path tests generate (unsorted, damaged, tz offsets, any column
  order), it either declines or agrees with the whole file on the range, or it raises the error
  the whole file's read raises when the damage lies in the range.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re

import numpy as np
import pandas as pd
from hypothesis import given
from hypothesis import strategies as st
from test_csv_fast_path import SETTINGS, SYMBOL, Case, assert_same_frame, csv_cases, missing_texts

from sensitivity.sources.files import csv_price_frame, csv_range_frame

ORIGIN = "X.csv"
NAMES = ["Open", "High", "Low", "Close", "Adj Close", "Volume"]


def _whole(text: str) -> tuple[pd.DataFrame | None, list[dt.date], tuple[type[BaseException], str] | None]:
    empty: list[dt.date] = []
    try:
        return csv_price_frame(text, SYMBOL, origin=ORIGIN, empty_rows=empty), empty, None
    except Exception as exc:
        return None, empty, (type(exc), str(exc))


def _cut(frame: pd.DataFrame, start: dt.date, end: dt.date) -> pd.DataFrame:
    days = frame.index.to_numpy(dtype="datetime64[D]")
    inside = (days >= np.datetime64(start)) & (days <= np.datetime64(end))
    return frame.iloc[np.flatnonzero(inside)]


def _value(draw: st.DrawFn, missing_rate: float) -> str:
    """A positive number in one of the forms writers use, or a missing marker."""
    if draw(st.floats(0, 1)) < missing_rate:
        return draw(missing_texts())
    x = draw(st.floats(1e-6, 1e9, allow_nan=False, allow_infinity=False))
    return draw(st.sampled_from([repr(x), f"{x:.6f}", f"{x:.10e}", f" {x!r}"]))


@st.composite
def sorted_files(draw: st.DrawFn) -> tuple[str, list[dt.date], list[bool]]:
    """A plain CSV with Date first and strictly increasing dates: its text, every line's date
    and whether each line has a close."""
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
    n = draw(st.integers(1, 40))
    first = draw(st.dates(dt.date(1990, 1, 1), dt.date(2030, 1, 1)))
    steps = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    days = [first + dt.timedelta(days=sum(steps[: i + 1])) for i in range(n)]
    missing_rate = draw(st.sampled_from([0.0, 0.1, 0.4]))
    priced = []
    rows = []
    for day in days:
        empty = draw(st.integers(0, 9)) == 0
        cells = ["null" if empty and name != "Volume" else _value(draw, missing_rate) for name in names]
        close = cells[names.index("Close")]
        priced.append(close.strip().lower() not in ("", "null", "nan", "na", "n/a", "none", "-"))
        rows.append(",".join([day.isoformat(), *cells]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join([*head, *rows]) + (newline if draw(st.booleans()) else "")
    return text, days, priced


@SETTINGS
@given(sorted_files(), st.data())
def test_range_read_is_the_whole_read_cut_to_the_range(
    file: tuple[str, list[dt.date], list[bool]], data: st.DataObject
) -> None:
    text, days, priced = file
    lo = data.draw(st.integers(0, len(days) - 1))
    hi = data.draw(st.integers(lo, len(days) - 1))
    start = days[lo] - dt.timedelta(days=data.draw(st.integers(0, 1)))
    end = days[hi] + dt.timedelta(days=data.draw(st.integers(0, 1)))
    empty: list[dt.date] = []
    got = csv_range_frame(text, SYMBOL, start, end, origin=ORIGIN, empty_rows=empty)
    inside = [i for i, day in enumerate(days) if start <= day <= end]
    if len(inside) < len(days) and any(priced[i] for i in inside):
        assert got is not None  # some of the lines, one with a close: the range read answers
    if got is None:
        assert empty == []
        return
    whole, whole_empty, error = _whole(text)
    assert error is None
    assert whole is not None
    assert_same_frame(got, _cut(whole, start, end))
    assert empty == [d for d in whole_empty if start <= d <= end]


@SETTINGS
@given(csv_cases(), st.data())
def test_range_read_declines_or_agrees_on_any_text(case: Case, data: st.DataObject) -> None:
    written = []
    for text in re.findall(r"\d{4}-\d{2}-\d{2}", case.text):
        with contextlib.suppress(ValueError):
            written.append(dt.date.fromisoformat(text))
    start = data.draw(st.sampled_from(written)) if written else dt.date(2000, 1, 1)
    days = data.draw(st.integers(0, 60))
    end = start + dt.timedelta(days=days)
    empty: list[dt.date] = []
    whole, whole_empty, error = _whole(case.text)
    try:
        got = csv_range_frame(case.text, SYMBOL, start, end, origin=ORIGIN, empty_rows=empty)
    except Exception as exc:
        raised: tuple[type[BaseException], str] | None = (type(exc), str(exc))
    else:
        raised = None
    if raised is not None:
        # Damage inside the range: the error the whole file's read gives for that line.
        assert raised == error
        return
    if got is None:
        assert empty == []
        return
    if error is not None:
        return  # damage outside the range, which the range read does not look at
    assert whole is not None
    assert_same_frame(got, _cut(whole, start, end))
    assert empty == [d for d in whole_empty if start <= d <= end]
