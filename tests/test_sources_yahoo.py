"""The Yahoo source: the pure transform on recorded chart bodies, the error mapping, the session
redirect, and real yfinance end to end against the local stub (nothing leaves 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from yahoo_stub import (
    CHART_NOT_FOUND,
    RECORDED,
    Fault,
    YahooStub,
    chart_body_from_frame,
    iter_chart_bars,
    load_recorded,
    open_timestamps,
    replay_history,
    trim_chart_body,
)
from yfinance.exceptions import YFPricesMissingError, YFRateLimitError, YFTzMissingError

from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    NetworkError,
    RateLimitError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.prices import PRICE_COLUMNS, check_price_frame
from sensitivity.sources import PriceSource, make_source
from sensitivity.sources.files import FilesSource
from sensitivity.sources.quality import REASON_DUPLICATE
from sensitivity.sources.sample import DEFAULT_SAMPLE_DIR, SampleSource
from sensitivity.sources.yahoo import (
    BASE_URL_ENV,
    HTTPExchange,
    YahooRequestsSession,
    YahooSource,
    is_yahoo_host,
    redirect_url,
    yahoo_error,
    yahoo_price_frame,
    yahoo_prices,
    yfinance_cache_dir,
)

pytestmark = pytest.mark.filterwarnings(
    # yfinance 1.7 itself uses pandas' deprecated inplace= keywords.
    "ignore:The inplace keyword:DeprecationWarning",
    "ignore:The inplace keyword:FutureWarning",
    "ignore::pandas.errors.Pandas4Warning",
)

HISTORY_SWITCHES: dict[str, Any] = {
    "interval": "1d",
    "auto_adjust": False,
    "back_adjust": False,
    "actions": True,
    "repair": False,
    "prepost": False,
    "keepna": True,
    "rounding": False,
}
D = dt.date


def recorded_dates(body: dict[str, Any]) -> pd.DatetimeIndex:
    """The New York trading dates of a chart body's bars, computed independently."""
    stamps = body["chart"]["result"][0]["timestamp"]
    utc = pd.to_datetime(stamps, unit="s", utc=True)
    return pd.DatetimeIndex(utc.tz_convert("America/New_York").date).as_unit("ns")


def transform_recorded(symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
    """The transform applied to what yfinance's own parser makes of the recorded body."""
    raw = replay_history(
        load_recorded(symbol), start=start, end=end + dt.timedelta(days=1), **HISTORY_SWITCHES
    )
    return yahoo_price_frame(raw, symbol, start, end)


def synthetic_frame(start: str, periods: int, seed: int = 7) -> pd.DataFrame:
    """A price frame on business days with known values (random walk, 17-digit floats)."""
    rng = np.random.default_rng(seed)
    dates = pd.DatetimeIndex(pd.bdate_range(start, periods=periods).as_unit("ns"), freq=None, name="date")
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, periods)))
    frame = pd.DataFrame(
        {
            "open": close * (1 + rng.normal(0, 0.002, periods)),
            "high": close * 1.01,
            "low": close * 0.99,
            "close": close,
            "adj_close": close * 0.97,
            "volume": rng.integers(1_000_000, 9_000_000, periods).astype(np.float64),
            "dividends": np.zeros(periods),
            "splits": np.zeros(periods),
        },
        index=dates,
    )
    return check_price_frame(frame, "SYNTH")


# -- transform on the recorded bodies -------------------------------------------------------------


def test_yahoo_price_frame_aapl_recorded_split_dividend_and_exact_values() -> None:
    body = load_recorded("AAPL")
    frame = transform_recorded("AAPL", D(2020, 8, 31), D(2020, 11, 6))

    assert len(frame) == 49
    assert list(frame.columns) == list(PRICE_COLUMNS)
    assert (frame.dtypes == np.float64).all()
    assert frame.index.name == "date"
    assert frame.index.tz is None
    assert frame.index.equals(recorded_dates(body))
    assert frame.index[0] == pd.Timestamp("2020-08-31")
    assert frame.index[-1] == pd.Timestamp("2020-11-06")
    bars = [bar for _, bar in iter_chart_bars(body)]
    assert frame["close"].tolist() == [b["close"] for b in bars]  # exactly, not approximately
    assert frame["adj_close"].tolist() == [b["adjclose"] for b in bars]
    assert frame["open"].tolist() == [b["open"] for b in bars]
    assert frame["volume"].tolist() == [float(b["volume"]) for b in bars]
    assert frame.loc["2020-08-31", "splits"] == 4.0
    assert frame.loc["2020-11-06", "dividends"] == 0.205
    assert (frame["splits"] != 0).sum() == 1
    assert (frame["dividends"] != 0).sum() == 1


@pytest.mark.parametrize(
    ("symbol", "event_column", "events"),
    [
        pytest.param(
            "MSFT",
            "dividends",
            {"2021-02-17": 0.56, "2021-05-19": 0.56, "2021-08-18": 0.56, "2021-11-17": 0.62},
            id="msft-dividends",
        ),
        pytest.param("NVDA", "splits", {"2021-07-20": 4.0}, id="nvda-split"),
    ],
)
def test_yahoo_price_frame_recorded_year(symbol: str, event_column: str, events: dict[str, float]) -> None:
    body = load_recorded(symbol)
    frame = transform_recorded(symbol, D(2021, 2, 1), D(2022, 1, 28))
    assert len(frame) == 252
    assert frame.index.equals(recorded_dates(body))
    assert frame["close"].tolist() == [bar["close"] for _, bar in iter_chart_bars(body)]
    actual = {str(d.date()): v for d, v in frame[event_column].items() if v != 0}
    assert actual == events


def test_yahoo_price_frame_keeps_only_the_inclusive_range() -> None:
    raw = replay_history(load_recorded("AAPL"), start=D(2020, 8, 1), end=D(2020, 12, 1), **HISTORY_SWITCHES)
    frame = yahoo_price_frame(raw, "AAPL", D(2020, 9, 1), D(2020, 9, 4))
    assert [str(d.date()) for d in frame.index] == ["2020-09-01", "2020-09-02", "2020-09-03", "2020-09-04"]


def raw_frame(index: pd.DatetimeIndex, close: list[float]) -> pd.DataFrame:
    """A frame shaped like yfinance's history() output."""
    n = len(index)
    return pd.DataFrame(
        {
            "Open": close,
            "High": close,
            "Low": close,
            "Close": close,
            "Adj Close": close,
            "Volume": np.arange(n, dtype=np.int64) + 100,
            "Dividends": np.zeros(n),
            "Stock Splits": np.zeros(n),
            "Capital Gains": np.zeros(n),
        },
        index=index.rename("Date"),
    )


def test_yahoo_price_frame_converts_utc_stamps_to_exchange_dates() -> None:
    # 2020-11-06 23:30 New York is 2020-11-07 04:30 UTC: the trading date is the New York one.
    utc = pd.DatetimeIndex(["2020-11-05 14:30", "2020-11-07 04:30"]).tz_localize("UTC")
    frame = yahoo_price_frame(
        raw_frame(utc, [10.0, 11.0]), "X", D(2020, 11, 1), D(2020, 11, 30), exchange_tz="America/New_York"
    )
    assert [str(d.date()) for d in frame.index] == ["2020-11-05", "2020-11-06"]
    assert "Capital Gains" not in frame.columns
    assert frame["volume"].tolist() == [100.0, 101.0]


def test_yahoo_prices_duplicate_date_keeps_the_first_and_records_it() -> None:
    idx = pd.DatetimeIndex(["2021-03-01 09:30", "2021-03-01 00:00", "2021-03-02"]).tz_localize(
        "America/New_York"
    )
    got = yahoo_prices(raw_frame(idx, [2.0, 1.0, 3.0]), "X", D(2021, 3, 1), D(2021, 3, 2))
    assert got.frame["close"].tolist() == [1.0, 3.0]  # the earliest bar of the date
    assert [i.to_dict() for i in got.quality.dropped] == [{"date": "2021-03-01", "reason": REASON_DUPLICATE}]


@pytest.mark.parametrize(
    ("close", "start", "message"),
    [
        pytest.param([], D(2021, 3, 1), r"X: Yahoo returned no prices between", id="no-rows"),
        pytest.param([np.nan, np.nan], D(2021, 3, 1), r"X: Yahoo has no prices between", id="all-nan"),
        pytest.param(
            [1.0, 2.0], D(2021, 4, 1), r"X: Yahoo has no prices between 2021-04-01", id="out-of-range"
        ),
    ],
)
def test_yahoo_price_frame_empty_is_an_error(close: list[float], start: dt.date, message: str) -> None:
    idx = pd.DatetimeIndex(["2021-03-01", "2021-03-02"][: len(close)]).tz_localize("America/New_York")
    with pytest.raises(EmptyDataError, match=message):
        yahoo_price_frame(raw_frame(idx, close), "X", start, start + dt.timedelta(days=5))


def test_yahoo_price_frame_missing_column_is_an_error() -> None:
    idx = pd.DatetimeIndex(["2021-03-01"]).tz_localize("America/New_York")
    with pytest.raises(DataValidationError, match=r"X: Yahoo's answer lacks column\(s\) Volume"):
        yahoo_price_frame(raw_frame(idx, [1.0]).drop(columns="Volume"), "X", D(2021, 3, 1), D(2021, 3, 1))


# -- the stub's own bodies -------------------------------------------------------------------------


def test_generated_body_has_yahoos_format_and_round_trips_through_yfinance() -> None:
    frame = synthetic_frame("2021-03-01", 30)
    frame.loc[frame.index[5], "dividends"] = 0.25
    frame.loc[frame.index[9], "splits"] = 1.5
    body = chart_body_from_frame("SYNTH", frame)
    result = body["chart"]["result"][0]
    assert result["meta"]["exchangeTimezoneName"] == "America/New_York"
    assert result["meta"]["gmtoffset"] == -14400
    assert result["meta"]["timezone"] == "EDT"
    first = pd.Timestamp(result["timestamp"][0], unit="s", tz="UTC").tz_convert("America/New_York")
    assert (first.hour, first.minute) == (9, 30)
    assert set(result["indicators"]["quote"][0]) == {"open", "high", "low", "close", "volume"}
    ts = str(open_timestamps(frame.index[5:6])[0])
    assert result["events"]["dividends"][ts]["amount"] == 0.25
    assert next(iter(result["events"]["splits"].values()))["splitRatio"] == "3:2"

    raw = replay_history(body, start=D(2021, 3, 1), end=D(2021, 5, 1), **HISTORY_SWITCHES)
    pd.testing.assert_frame_equal(yahoo_price_frame(raw, "SYNTH", D(2021, 3, 1), D(2021, 4, 30)), frame)


def test_trim_chart_body_cuts_bars_and_events_and_answers_empty_like_yahoo() -> None:
    body = load_recorded("AAPL")
    stamps = body["chart"]["result"][0]["timestamp"]
    cut = trim_chart_body(body, period1=stamps[1], period2=stamps[3])
    assert cut["chart"]["result"][0]["timestamp"] == stamps[1:3]
    assert "events" not in cut["chart"]["result"][0]  # the split is on the first bar
    empty = trim_chart_body(body, period1=0, period2=1)["chart"]["result"][0]
    assert "timestamp" not in empty
    assert empty["indicators"]["quote"] == [{}]


# -- the session and the error mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://query2.finance.yahoo.com/v8/finance/chart/AAPL?period1=1&interval=1d",
            "http://127.0.0.1:9/v8/finance/chart/AAPL?period1=1&interval=1d",
        ),
        ("https://fc.yahoo.com", "http://127.0.0.1:9/"),
        ("https://guce.yahoo.com/consent", "http://127.0.0.1:9/consent"),
        ("https://example.com/x", "https://example.com/x"),
        ("https://notyahoo.com/x", "https://notyahoo.com/x"),
    ],
)
def test_redirect_url(url: str, expected: str) -> None:
    assert redirect_url(url, "http://127.0.0.1:9") == expected


def test_redirect_url_keeps_a_base_path() -> None:
    url = "https://query1.finance.yahoo.com/v1/test/getcrumb"
    assert redirect_url(url, "http://h:1/yahoo/") == "http://h:1/yahoo/v1/test/getcrumb"
    assert is_yahoo_host("consent.yahoo.com")
    assert not is_yahoo_host("yahoo.com.evil.net")


def test_session_refuses_non_yahoo_hosts_when_redirecting() -> None:
    session = YahooRequestsSession(base_url="http://127.0.0.1:9")
    with pytest.raises(requests.ConnectionError, match=r"refusing to contact example\.com"):
        session.get("https://example.com/", timeout=1)


def test_curl_session_caps_timeouts_and_records_responses(yahoo_stub: YahooStub) -> None:
    """The default (curl_cffi, no redirect) session: yfinance accepts it; it records statuses."""
    from yfinance.data import YfData

    from sensitivity.sources import yahoo

    assert yahoo.YahooCurlSession is not None
    session = yahoo.YahooCurlSession(timeout_s=2.0)
    YfData(session=session)  # raises for a session type yfinance does not support
    with yahoo._recording() as trace:
        response = session.get(f"{yahoo_stub.base_url}/v8/finance/chart/NOPE", timeout=30)
    assert response.status_code == 404
    assert trace == [HTTPExchange("GET", f"{yahoo_stub.base_url}/v8/finance/chart/NOPE", 404)]
    assert trace[0].is_data
    assert yahoo._cap_timeout(30, 2.0) == 2.0
    assert yahoo._cap_timeout(None, 2.0) == 2.0
    assert yahoo._cap_timeout((1, 60), 2.0) == (1.0, 2.0)


def _trace(*statuses: int, path: str = "/v8/finance/chart/X") -> list[HTTPExchange]:
    return [HTTPExchange("GET", f"https://query2.finance.yahoo.com{path}", s) for s in statuses]


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("exc", "trace", "kind", "retryable", "message"),
    [
        (YFRateLimitError(), [], RateLimitError, True, r"X: Yahoo is rate limiting requests"),
        (
            YFTzMissingError("X"),
            _trace(404, 404),
            SymbolNotFoundError,
            False,
            r"X: Yahoo has no prices for this",
        ),
        (_http_error(404), _trace(404), SymbolNotFoundError, False, r"check the ticker"),
        (YFPricesMissingError("X", "", yahoo_reason="gone"), _trace(404), SymbolNotFoundError, False, r"X: "),
        (
            YFPricesMissingError("X", ""),
            _trace(200, 200),
            EmptyDataError,
            False,
            r"X: Yahoo has no prices between",
        ),
        (
            YFPricesMissingError("X", "", "boom"),
            _trace(500, 500),
            NetworkError,
            True,
            r"server error \(HTTP 500\)",
        ),
        (json.JSONDecodeError("Expecting value", "{", 1), _trace(200), SourceError, True, r"malformed"),
        (requests.ReadTimeout("read timed out"), [], NetworkError, True, r"did not answer within 5 s"),
        (requests.ConnectionError("refused"), [], NetworkError, True, r"cannot reach Yahoo"),
        (_http_error(401), _trace(401), SourceError, True, r"refused the request \(HTTP 401\)"),
        (KeyError("chart"), _trace(200), SourceError, True, r"could not read"),
        (RuntimeError("bug"), [], SourceError, False, r"failed unexpectedly"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_yahoo_error_maps_to_the_project_family(
    exc: BaseException, trace: list[HTTPExchange], kind: type[SourceError], retryable: bool, message: str
) -> None:
    err = yahoo_error(exc, "X", D(2021, 1, 1), D(2021, 1, 31), trace, timeout_s=5.0)
    assert type(err) is kind
    assert err.retryable is retryable
    assert err.symbol == "X"
    assert re.search(message, str(err))


# -- construction --------------------------------------------------------------------------------


def test_yahoo_source_reads_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BASE_URL_ENV, "http://127.0.0.1:1")
    source = YahooSource()
    assert source.base_url == "http://127.0.0.1:1"
    assert isinstance(source.session, YahooRequestsSession)
    assert isinstance(source, PriceSource)
    assert source.name == "yahoo"
    monkeypatch.delenv(BASE_URL_ENV)
    assert YahooSource().base_url is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://x"}, r"base_url must be an http\(s\) URL"),
        ({"timeout_s": 0}, r"timeout_s must be a number of seconds > 0, got 0"),
        ({"base_url": "http://x", "session": requests.Session()}, r"either base_url or session"),
    ],
)
def test_yahoo_source_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        YahooSource(**kwargs)


def test_make_source_builds_each_kind(tmp_path: Path) -> None:
    from sensitivity.config import SourceConfig

    assert isinstance(make_source(SourceConfig(kind="yahoo", timeout_s=7.0)), YahooSource)
    assert make_source(SourceConfig(kind="files", path=tmp_path)).name == f"files:{tmp_path}"
    assert make_source(SourceConfig(kind="sample")).name == "sample"


# -- end to end: real yfinance against the stub ------------------------------------------------------


def assert_nothing_escaped(stub: YahooStub, guard: list[str]) -> None:
    assert guard == []
    assert stub.requests, "yfinance made no request at all"
    assert {r.host.rsplit(":", 1)[0] for r in stub.requests} == {"127.0.0.1"}
    assert all(r.yahoo_host and r.yahoo_host.endswith("yahoo.com") for r in stub.requests)


@pytest.mark.parametrize(
    ("symbol", "start", "end", "rows"),
    [
        pytest.param("MSFT", D(2021, 2, 1), D(2022, 1, 28), 252, id="msft-full"),
        pytest.param("NVDA", D(2021, 7, 19), D(2021, 7, 21), 3, id="nvda-around-split"),
    ],
)
def test_yahoo_source_fetches_recorded_bodies_through_yfinance(
    yahoo_source: YahooSource,
    yahoo_env: YahooStub,
    network_guard: list[str],
    symbol: str,
    start: dt.date,
    end: dt.date,
    rows: int,
) -> None:
    yahoo_env.add_recorded()
    frame = yahoo_source.fetch(symbol, start, end)
    assert len(frame) == rows
    pd.testing.assert_frame_equal(frame, transform_recorded(symbol, start, end))

    (history,) = yahoo_env.chart_requests(symbol, "history")
    assert history.yahoo_host == "query2.finance.yahoo.com"
    ny = "America/New_York"
    assert int(history.query["period1"]) == int(pd.Timestamp(start).tz_localize(ny).timestamp())
    assert int(history.query["period2"]) == int(
        pd.Timestamp(end + dt.timedelta(days=1)).tz_localize(ny).timestamp()
    )
    assert history.query["interval"] == "1d"
    assert history.query["includePrePost"] == "False"
    assert history.query["events"] == "div,splits,capitalGains"
    assert_nothing_escaped(yahoo_env, network_guard)
    assert (yfinance_cache_dir() / "tkr-tz.db").exists()  # yfinance's cache is in tmp_path


@pytest.mark.parametrize(
    ("symbol", "tz"),
    [
        ("SYNTH", "America/New_York"),
        ("^GSPC", "America/New_York"),
        ("BRK-B", "America/New_York"),
        ("0700.HK", "Asia/Hong_Kong"),  # the 09:30 open is the previous day in UTC
    ],
)
def test_yahoo_source_fetches_generated_bodies_exactly(
    yahoo_source: YahooSource, yahoo_env: YahooStub, network_guard: list[str], symbol: str, tz: str
) -> None:
    frame = synthetic_frame("2019-10-01", 120)  # spans the end of daylight saving time
    frame.loc["2019-11-07", "dividends"] = 0.77
    body = yahoo_env.add_frame(symbol, frame, tz=tz)
    assert body["chart"]["result"][0]["meta"]["exchangeTimezoneName"] == tz
    got = yahoo_source.fetch(symbol, D(2019, 10, 1), frame.index[-1].date())
    pd.testing.assert_frame_equal(got, frame)
    got = yahoo_source.fetch(symbol, D(2019, 11, 2), D(2019, 11, 8))
    pd.testing.assert_frame_equal(got, frame.loc["2019-11-02":"2019-11-08"])
    assert_nothing_escaped(yahoo_env, network_guard)


def test_yahoo_source_unknown_symbol_is_symbol_not_found(
    yahoo_source: YahooSource, yahoo_env: YahooStub, network_guard: list[str]
) -> None:
    with pytest.raises(
        SymbolNotFoundError, match=r"^AAPX: Yahoo has no prices for this symbol \(check the ticker"
    ):
        yahoo_source.fetch("AAPX", D(2021, 1, 4), D(2021, 1, 29))
    probe = yahoo_env.chart_requests("AAPX", "probe")
    assert probe
    assert probe[0].query["range"] == "1d"
    assert_nothing_escaped(yahoo_env, network_guard)


def test_yahoo_source_empty_range_is_empty_data(
    yahoo_source: YahooSource, yahoo_env: YahooStub, network_guard: list[str]
) -> None:
    yahoo_env.add_recorded("MSFT")
    with pytest.raises(EmptyDataError, match=r"^MSFT: Yahoo has no prices between 2021-02-06 and 2021-02-07"):
        yahoo_source.fetch("MSFT", D(2021, 2, 6), D(2021, 2, 7))  # a weekend
    assert_nothing_escaped(yahoo_env, network_guard)


@pytest.mark.parametrize(
    ("faults", "error", "message"),
    [
        pytest.param([Fault(status=500)], None, None, id="one-500-yfinance-retries-once"),
        pytest.param([Fault(status=500)] * 2, NetworkError, r"server error \(HTTP 500\)", id="500s"),
        pytest.param([Fault(status=429)] * 2, RateLimitError, r"rate limiting", id="429s"),
        pytest.param([Fault(truncate_at=120)], SourceError, r"malformed", id="truncated-json"),
        pytest.param([Fault(delay_s=2.5)], NetworkError, r"did not answer within 1 s", id="timeout"),
    ],
)
def test_yahoo_source_scripted_faults(
    yahoo_env: YahooStub,
    network_guard: list[str],
    faults: list[Fault],
    error: type[SourceError] | None,
    message: str | None,
) -> None:
    yahoo_env.add_recorded("NVDA")
    source = YahooSource(timeout_s=1.0)
    source.fetch("NVDA", D(2021, 3, 1), D(2021, 3, 5))  # warms yfinance's timezone cache
    yahoo_env.clear_requests()
    yahoo_env.inject("NVDA", *(dataclasses.replace(f, on="history") for f in faults))
    if error is None:
        assert len(source.fetch("NVDA", D(2021, 3, 1), D(2021, 3, 31))) == 23
    else:
        with pytest.raises(error, match=rf"^NVDA: .*{message}") as info:
            source.fetch("NVDA", D(2021, 3, 1), D(2021, 3, 31))
        assert info.value.retryable
    assert yahoo_env.pending_faults("NVDA") == []
    assert len(yahoo_env.chart_requests("NVDA", "history")) == (1 if faults[0].status is None else 2)
    # yfinance's in-memory response cache must not replay a failure: the next fetch asks again.
    assert len(source.fetch("NVDA", D(2021, 3, 1), D(2021, 3, 31))) == 23
    assert_nothing_escaped(yahoo_env, network_guard)


def test_yahoo_source_and_files_source_agree_on_a_yf_download_csv(
    yahoo_source: YahooSource, yahoo_env: YahooStub, network_guard: list[str], tmp_path: Path
) -> None:
    """``yf.download(...).to_csv()`` (three header lines, CRLF) read back by the files source
    gives the same prices as the Yahoo source, bit for bit."""
    import yfinance as yf

    yahoo_env.add_recorded("AAPL")
    start, end = D(2020, 8, 31), D(2020, 11, 6)
    downloaded = yf.download(
        "AAPL",
        start=start,
        end=end + dt.timedelta(days=1),
        interval="1d",
        auto_adjust=False,
        actions=False,
        progress=False,
        threads=False,
        session=yahoo_source.session,
    )
    folder = tmp_path / "csv"
    folder.mkdir()
    downloaded.to_csv(folder / "AAPL.csv", lineterminator="\r\n")
    lines = (folder / "AAPL.csv").read_bytes().split(b"\r\n")
    assert lines[:3] == [
        b"Price,Adj Close,Close,High,Low,Open,Volume",
        b"Ticker" + b",AAPL" * 6,
        b"Date,,,,,,",
    ]

    from_files = FilesSource(folder).fetch("AAPL", start, end)
    from_yahoo = yahoo_source.fetch("AAPL", start, end)
    cols = ["open", "high", "low", "close", "adj_close", "volume"]
    pd.testing.assert_frame_equal(from_files[cols], from_yahoo[cols])
    assert from_files["dividends"].isna().all()  # the download was made without actions
    assert_nothing_escaped(yahoo_env, network_guard)


def test_yahoo_sources_in_threads_keep_their_symbols_and_errors_apart(
    yahoo_env: YahooStub, network_guard: list[str]
) -> None:
    """Several threads, each with its own source (as the flow's thread pool runs them): yfinance
    shares one session between them, yet each fetch gets its own prices or its own error."""
    from concurrent.futures import ThreadPoolExecutor

    yahoo_env.add_recorded()
    frames = {f"G{i}": synthetic_frame("2021-01-04", 60, seed=i) for i in range(4)}
    for symbol, frame in frames.items():
        yahoo_env.add_frame(symbol, frame)
    yahoo_env.inject("G3", Fault(status=503, on="history"), Fault(status=503, on="history"))
    symbols = [*frames, "MSFT", "NVDA", "AAPX", "ZZZZ"]

    def fetch(symbol: str) -> pd.DataFrame | Exception:
        try:
            return YahooSource(timeout_s=5.0).fetch(symbol, D(2021, 1, 4), D(2021, 3, 26))
        except SourceError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(symbols, pool.map(fetch, symbols), strict=True))
    for symbol in ["G0", "G1", "G2", "MSFT"]:
        assert isinstance(results[symbol], pd.DataFrame), f"{symbol}: {results[symbol]!r}"
    for symbol in ["G0", "G1", "G2"]:
        pd.testing.assert_frame_equal(results[symbol], frames[symbol])
    pd.testing.assert_frame_equal(results["MSFT"], transform_recorded("MSFT", D(2021, 2, 1), D(2021, 3, 26)))
    assert isinstance(results["G3"], NetworkError)
    assert isinstance(results["AAPX"], SymbolNotFoundError)
    assert isinstance(results["ZZZZ"], SymbolNotFoundError)
    assert str(results["AAPX"]).startswith("AAPX: ")
    assert str(results["ZZZZ"]).startswith("ZZZZ: ")
    assert_nothing_escaped(yahoo_env, network_guard)


def test_yahoo_source_pickles_for_worker_processes(yahoo_source: YahooSource, yahoo_env: YahooStub) -> None:
    yahoo_env.add_recorded("MSFT")
    copy = pickle.loads(pickle.dumps(yahoo_source))  # noqa: S301 - our own object, in memory
    assert copy.session is not yahoo_source.session
    assert copy.base_url == yahoo_source.base_url
    assert len(copy.fetch("MSFT", D(2021, 2, 1), D(2021, 2, 5))) == 5


@pytest.mark.skipif(
    not (DEFAULT_SAMPLE_DIR / "^GSPC.parquet").is_file(), reason="the bundled sample is not built yet"
)
@pytest.mark.parametrize("symbol", ["^GSPC", "AAPL"])
def test_yahoo_files_and_sample_agree_on_the_bundled_sample(
    yahoo_source: YahooSource, yahoo_env: YahooStub, network_guard: list[str], tmp_path: Path, symbol: str
) -> None:
    """Real prices served as Yahoo bodies, read back through yfinance, equal the sample and a
    classic CSV of the same prices read by the files source, bit for bit."""
    start, end = D(2009, 1, 1), D(2019, 12, 31)
    sample = SampleSource().fetch(symbol, start, end)
    yahoo_env.add_frame(symbol, sample)
    from_yahoo = yahoo_source.fetch(symbol, start, end)

    classic = sample.rename(columns={"open": "Open", "high": "High", "low": "Low", "close": "Close"})
    classic = classic.rename(columns={"adj_close": "Adj Close", "volume": "Volume"})
    classic.index = classic.index.strftime("%Y-%m-%d").rename("Date")
    classic[["Open", "High", "Low", "Close", "Adj Close", "Volume"]].to_csv(tmp_path / f"{symbol}.csv")
    from_files = FilesSource(tmp_path).fetch(symbol, start, end)

    cols = ["open", "high", "low", "close", "adj_close", "volume"]
    pd.testing.assert_frame_equal(from_yahoo[cols], sample[cols])
    pd.testing.assert_frame_equal(from_files, sample)
    assert (from_yahoo[["dividends", "splits"]] == 0).all().all()  # Yahoo reports "no actions" as 0
    assert_nothing_escaped(yahoo_env, network_guard)


RECORDED_SHA256 = {
    "AAPL": "82bb2442d04c37202fd04b5c47ba1bf277d61bbd84c542156a1c9e55c6a26de8",
    "MSFT": "4f66cfc309aa41afdeb951c2ccde29afb6a02a6ba9fd0c1a8afe167517647454",
    "NVDA": "3f8ca2a2a8432b14282c4539ea991daf381ba4f4262f5a61d368e9afc4ed7b42",
}


@pytest.mark.parametrize("symbol", sorted(RECORDED_SHA256))
def test_recorded_fixtures_are_unchanged_copies(symbol: str) -> None:
    """The recorded bodies are byte-for-byte copies (provenance: tests/fixtures/SOURCES.md)."""
    assert hashlib.sha256(RECORDED[symbol].read_bytes()).hexdigest() == RECORDED_SHA256[symbol]
    body = load_recorded(symbol)
    assert body["chart"]["error"] is None
    assert body["chart"]["result"][0]["meta"]["symbol"] == symbol
    assert CHART_NOT_FOUND["chart"]["result"] is None


@pytest.mark.parametrize("locked_calls", [1, 4, 5])
def test_a_locked_yfinance_cache_is_waited_out_then_reported(
    yahoo_env: YahooStub, monkeypatch: pytest.MonkeyPatch, locked_calls: int
) -> None:
    """yfinance's SQLite cache, shared by the fetch threads, can answer "database is locked":
    the fetch tries again after a pause, up to five times, then fails as before."""
    import sqlite3

    import yfinance as yf

    from sensitivity.sources import yahoo as yahoo_mod

    frame = synthetic_frame("2021-01-04", 30, seed=7)
    yahoo_env.add_frame("LOCK", frame)
    history = yf.Ticker.history
    calls = []

    def locked_history(self: Any, *args: Any, **kwargs: Any) -> pd.DataFrame:
        calls.append(1)
        if len(calls) <= locked_calls:
            raise sqlite3.OperationalError("database is locked")
        return history(self, *args, **kwargs)

    monkeypatch.setattr(yf.Ticker, "history", locked_history)
    monkeypatch.setattr(yahoo_mod, "_CACHE_LOCK_PAUSE_S", 0.001)
    source = YahooSource(timeout_s=5.0)
    if locked_calls < 5:
        pd.testing.assert_frame_equal(source.fetch("LOCK", D(2021, 1, 4), D(2021, 2, 12)), frame)
        assert len(calls) == locked_calls + 1
    else:
        unexpected = r"^LOCK: fetching from Yahoo failed unexpectedly \(OperationalError"
        with pytest.raises(SourceError, match=unexpected):
            source.fetch("LOCK", D(2021, 1, 4), D(2021, 2, 12))
        assert len(calls) == 5
