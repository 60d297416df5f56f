"""The boundary checks every source's rows pass (sources/quality.py), and that the sources apply
them the same way: what is dropped, why, and what is never touched."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sensitivity.errors import DataValidationError, EmptyDataError
from sensitivity.prices import PRICE_COLUMNS
from sensitivity.sources.base import fetch_checked
from sensitivity.sources.files import FilesSource
from sensitivity.sources.quality import (
    JUMP_RATIO,
    REASON_DUPLICATE,
    REASON_NO_PRICE,
    QualityIssue,
    QualityReport,
    clean_price_frame,
    naive_trading_dates,
)

D = dt.date


def frame(base: list[float], *, start: str = "2024-01-01", **cols: list[float]) -> pd.DataFrame:
    """A raw price frame on business days, priced around ``base``; ``cols`` replace columns."""
    n = len(base)
    idx = pd.DatetimeIndex(pd.bdate_range(start, periods=n).as_unit("ns"), freq=None, name="date")
    c = np.array(base, dtype=np.float64)
    data = {
        "open": c,
        "high": c * 1.01,
        "low": c * 0.99,
        "close": c,
        "adj_close": c * 0.9,
        "volume": np.full(n, 1e6),
        "dividends": np.zeros(n),
        "splits": np.zeros(n),
    }
    data.update({k: np.array(v, dtype=np.float64) for k, v in cols.items()})
    return pd.DataFrame(data, index=idx)


def reasons(report: QualityReport) -> dict[str, str]:
    return {i.date: i.reason for i in report.dropped}


def test_clean_frame_passes_unchanged_with_an_empty_report() -> None:
    raw = frame([10.0, 10.5, 10.2, 10.8])
    got = clean_price_frame(raw, "X")
    pd.testing.assert_frame_equal(got.frame, raw)
    assert got.quality == QualityReport("X")
    assert got.quality.clean
    assert got.quality.summary() == "no issues"


def test_dates_become_naive_wall_clock_dates_and_are_sorted() -> None:
    raw = frame([1.0, 2.0, 3.0])
    tokyo = pd.DatetimeIndex(
        ["2024-01-03 09:00", "2024-01-01 09:00", "2024-01-02 09:00"], name="Date"
    ).tz_localize("Asia/Tokyo")
    raw.index = tokyo  # 2024-01-01 09:00 in Tokyo is 2023-12-31 in UTC: the date is Tokyo's
    got = clean_price_frame(raw, "X").frame
    assert [str(d.date()) for d in got.index] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert got["close"].tolist() == [2.0, 3.0, 1.0]
    assert got.index.tz is None
    assert got.index.name == "date"
    assert naive_trading_dates(pd.Index(["2024-01-05 16:00"])).tolist() == [pd.Timestamp("2024-01-05")]


def test_duplicate_dates_keep_the_earliest_row_and_are_recorded() -> None:
    raw = frame([1.0, 2.0, 3.0])
    raw.index = pd.DatetimeIndex(["2024-01-02 16:00", "2024-01-02 09:30", "2024-01-03 09:30"])
    got = clean_price_frame(raw, "X")
    assert got.frame["close"].tolist() == [2.0, 3.0]  # 09:30 came first that day
    assert got.quality.dropped == (QualityIssue("2024-01-02", REASON_DUPLICATE),)


def test_a_broken_first_row_of_a_date_leaves_the_good_second_one() -> None:
    raw = frame([np.nan, 2.0, 3.0], adj_close=[np.nan, 1.8, 2.7])
    raw.index = pd.DatetimeIndex(["2024-01-02 09:30", "2024-01-02 16:00", "2024-01-03"])
    got = clean_price_frame(raw, "X")
    assert got.frame["close"].tolist() == [2.0, 3.0]
    assert reasons(got.quality) == {"2024-01-02": REASON_NO_PRICE}


@pytest.mark.parametrize(
    ("cols", "day", "reason"),
    [
        pytest.param(
            {c: [1.0, np.nan, 1.0] for c in ("open", "high", "low", "close", "adj_close")},
            "2024-01-02",
            REASON_NO_PRICE,
            id="empty-bar",
        ),
        pytest.param({"close": [1.0, np.nan, 1.0]}, "2024-01-02", "no close price", id="no-close"),
        pytest.param(
            {"adj_close": [1.0, 1.0, np.nan]},
            "2024-01-03",
            "no adjusted close (the other rows have one)",
            id="no-adj-close",
        ),
        pytest.param(
            {"close": [1.0, 0.0, 1.0]}, "2024-01-02", "close is 0: prices must be positive", id="zero"
        ),
        pytest.param({"open": [1.0, 1.0, -2.5]}, "2024-01-03", "open is -2.5: prices must be", id="negative"),
        pytest.param({"low": [0.99, np.inf, 0.99]}, "2024-01-02", "low is inf: prices must", id="infinite"),
        pytest.param(
            {"high": [1.01, 0.95, 1.01], "low": [0.99, 0.98, 0.99]},
            "2024-01-02",
            "high 0.95 is below low 0.98",
            id="high-below-low",
        ),
    ],
)
def test_broken_rows_are_dropped_with_their_reason(
    cols: dict[str, list[float]], day: str, reason: str
) -> None:
    raw = frame([1.0, 1.0, 1.0], **cols)
    got = clean_price_frame(raw, "X")
    assert day not in {str(d.date()) for d in got.frame.index}
    assert len(got.frame) == 2
    ((date, why),) = reasons(got.quality).items()
    assert date == day
    assert why.startswith(reason)


def test_adjusted_close_missing_everywhere_is_fine() -> None:
    raw = frame([1.0, 1.1, 1.2], adj_close=[np.nan] * 3)  # a source without adjusted closes
    got = clean_price_frame(raw, "X")
    assert len(got.frame) == 3
    assert got.quality.clean


@pytest.mark.parametrize(
    ("close", "dropped"),
    [
        pytest.param([10.0, 10.1, 1010.0, 10.2, 10.3], ["2024-01-03"], id="one-day-100x"),
        pytest.param([10.0, 10.1, 0.101, 10.2, 10.3], ["2024-01-03"], id="one-day-1/100"),
        pytest.param(
            [10.0, 1000.0, 1010.0, 1020.0, 10.2], ["2024-01-02", "2024-01-03", "2024-01-04"], id="three-days"
        ),
    ],
)
def test_reverting_100x_jumps_are_dropped(close: list[float], dropped: list[str]) -> None:
    got = clean_price_frame(frame(close), "X")
    assert sorted(reasons(got.quality)) == dropped
    assert all("a unit mix-up" in r for r in reasons(got.quality).values())
    assert got.frame["close"].max() < 11
    assert got.frame["close"].min() > 9


def test_a_100x_jump_that_stays_is_kept_and_flagged() -> None:
    close = [10.0, 10.1, 1010.0, 1011.0, 1012.0, 1013.0, 1014.0, 1015.0, 1016.0]
    got = clean_price_frame(frame(close), "X")
    assert len(got.frame) == len(close)
    assert got.quality.dropped == ()
    ((issue),) = got.quality.warnings
    assert issue.date == "2024-01-03"
    assert "does not come back" in issue.reason
    assert "source.repair" in issue.reason


def test_indices_and_rates_skip_the_jump_rule() -> None:
    close = [0.01, 0.9, 0.02, 0.03]  # a rate near zero: 90x and back, for real
    got = clean_price_frame(frame(close), "^IRX")
    assert got.quality.clean
    assert len(got.frame) == 4


def test_a_large_but_ordinary_move_is_not_a_jump() -> None:
    close = [10.0, 10.0 * JUMP_RATIO * 0.99, 10.0]  # a 49.5x move and back is left alone
    assert clean_price_frame(frame(close), "X").quality.clean


def test_range_selection_limits_rows_and_records() -> None:
    raw = frame([1.0, np.nan, 1.2, 1.3, 1.4])
    got = clean_price_frame(
        raw,
        "X",
        start=D(2024, 1, 3),
        end=D(2024, 1, 4),
        dropped=[
            QualityIssue("2024-01-02", "from the source"),
            QualityIssue("2024-01-04", "from the source"),
        ],
    )
    assert [str(d.date()) for d in got.frame.index] == ["2024-01-03", "2024-01-04"]
    assert got.quality.dropped == (QualityIssue("2024-01-04", "from the source"),)


@pytest.mark.parametrize("seed", range(6))
def test_rows_outside_the_range_never_change_the_result(seed: int) -> None:
    """Cleaning a range of shuffled rows (times of day in New York, repeated dates, broken
    rows, a jump) gives what cleaning only the rows in that range gives."""
    rng = np.random.default_rng(seed)
    base = 50.0 * np.cumprod(1.0 + rng.normal(0.0, 0.01, 120))
    base[rng.integers(10, 110)] *= 100.0  # a jump that reverts
    raw = frame(list(base), open=list(np.where(rng.random(120) < 0.05, np.nan, base)))
    raw.loc[raw.index[rng.integers(0, 120, 4)], "close"] = -1.0
    raw = pd.concat([raw, raw.iloc[rng.integers(0, 120, 6)]])  # the same dates again
    stamps = raw.index + pd.to_timedelta(rng.integers(9, 16, len(raw)), unit="h")
    raw.index = stamps.tz_localize("America/New_York")
    raw = raw.iloc[rng.permutation(len(raw))]
    start, end = D(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60))), D(2024, 5, 1)
    days = naive_trading_dates(raw.index)
    inside = raw.loc[np.asarray((days >= pd.Timestamp(start)) & (days <= pd.Timestamp(end)))]
    got = clean_price_frame(raw, "X", start=start, end=end)
    alone = clean_price_frame(inside, "X")
    pd.testing.assert_frame_equal(got.frame, alone.frame, check_exact=True)
    assert got.quality == alone.quality
    assert not got.quality.clean


def test_nothing_usable_is_an_empty_data_error_naming_what_was_dropped() -> None:
    raw = frame([np.nan, np.nan], adj_close=[np.nan, np.nan])
    with pytest.raises(
        EmptyDataError,
        match=r"^X: Yahoo has no prices between 2024-01-01 and 2024-01-05 \(it sent 2 row\(s\), none usable: "
        r"2 row\(s\) dropped \(2024-01-01: no price: open, high, low, close and adjusted close are all",
    ):
        clean_price_frame(raw, "X", origin="Yahoo", start=D(2024, 1, 1), end=D(2024, 1, 5))
    with pytest.raises(EmptyDataError, match=r"it has prices from 2024-01-01 to 2024-01-02; widen the dates"):
        clean_price_frame(frame([1.0, 2.0]), "X", origin="Yahoo", start=D(2025, 1, 1), end=D(2025, 1, 5))


def test_a_missing_column_is_an_error() -> None:
    with pytest.raises(DataValidationError, match=r"X: price frame lacks column\(s\) splits"):
        clean_price_frame(frame([1.0]).drop(columns="splits"), "X")


def test_values_are_never_rounded_or_filled() -> None:
    close = [100.00000000000001, 99.99999999999999, np.nan, 100.12345678901234]
    raw = frame(close, adj_close=[np.nan] * 4)
    raw.loc[raw.index[2], ["open", "high", "low"]] = 1.0  # a row with prices but no close
    got = clean_price_frame(raw, "X").frame
    assert got["close"].tolist() == [close[0], close[1], close[3]]
    assert list(got.columns) == list(PRICE_COLUMNS)
    assert (got.dtypes == np.float64).all()


def test_files_source_records_rows_without_prices_and_applies_the_checks(tmp_path: Path) -> None:
    (tmp_path / "X.csv").write_text(
        "Date,Open,High,Low,Close,Adj Close,Volume\n"
        "2024-01-02,10,11,9,10,9,100\n"
        "2024-01-03,null,null,null,null,null,null\n"
        "2024-01-04,1000,1100,900,1000,900,100\n"
        "2024-01-05,10,9,11,10.5,9.5,100\n"
        "2024-01-08,10.2,11,9,10.2,9.2,100\n"
    )
    got = fetch_checked(FilesSource(tmp_path), "X", D(2024, 1, 1), D(2024, 1, 31))
    assert [str(d.date()) for d in got.frame.index] == ["2024-01-02", "2024-01-08"]
    why = reasons(got.quality)
    assert why["2024-01-03"] == REASON_NO_PRICE
    assert why["2024-01-05"] == "high 9 is below low 11"
    assert "a unit mix-up" in why["2024-01-04"]
    narrower = fetch_checked(FilesSource(tmp_path), "X", D(2024, 1, 5), D(2024, 1, 31))
    assert sorted(reasons(narrower.quality)) == ["2024-01-05"]  # records are limited to the range
