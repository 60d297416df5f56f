"""A local stub of Yahoo Finance's chart API, so the real yfinance runs offline in tests.

:class:`YahooStub` is a ``ThreadingHTTPServer`` on ``127.0.0.1`` (a free port) that answers
what yfinance 1.7 asks when ``YahooSource(base_url=stub.base_url)`` (or the environment variable
``SENSITIVITY_YAHOO_BASE_URL``) redirects every Yahoo host to it:

* ``/v8/finance/chart/<SYMBOL>``: Yahoo's real body format, either a *recorded* body
  (``tests/fixtures/yahoo_chart_*.json``) or one *generated* from a registered price frame, in
  both cases cut to the requested ``period1``/``period2`` (``[period1, period2)``, as Yahoo
  does) or ``range`` (``1d`` = the last bar); an unknown symbol gets Yahoo's real 404 body;
  a range without bars gets Yahoo's "meta, empty indicators" answer;
* ``/v1/test/getcrumb`` (a crumb), ``/`` (fc.yahoo.com's cookie page: 404, as Yahoo),
  ``/consent`` (guce: 404, so yfinance falls back to its basic cookie strategy),
  ``/v10/finance/quoteSummary/<SYMBOL>`` and ``/v7/finance/quote`` (minimal answers; 404 with
  Yahoo's body for unknown symbols); anything else: 404 with Yahoo's generic error body.

Every request is recorded (:attr:`YahooStub.requests`: method, path, query, the Yahoo host it
was meant for from ``X-Forwarded-Host``, the ``Host`` it reached and when it arrived).  Faults
are scripted per symbol and per call with :meth:`YahooStub.inject`: each chart request for the
symbol consumes the next matching :class:`Fault` (a status code, a delay, a replaced, edited or
truncated body, a reset connection).  Edits for :attr:`Fault.edit`: :func:`answer_as` (a body
for another symbol), :func:`duplicate_bar`, :func:`null_bar`, :func:`scale_bar` (a 100x unit
mix-up).  :func:`with_dividend` restates a frame the way Yahoo does when a dividend arrives
(every earlier adjusted close scaled down), for "the history changed between two runs".

Generated bodies follow the recorded ones: ``meta`` with ``exchangeTimezoneName``
(America/New_York), ``gmtoffset``, ``timezone``, ...; ``timestamp`` at the 09:30 New York open of
each trading date; ``indicators.quote[0].{open,high,low,close,volume}``;
``indicators.adjclose[0].adjclose`` (left out when the frame has no adjusted close, as for a
source without one); ``events.dividends`` / ``events.splits`` keyed by timestamp.  Floats are
written with ``repr`` so they parse back bit for bit.
"""

from __future__ import annotations

import copy
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import pandas as pd

FIXTURES = Path(__file__).resolve().parent / "fixtures"

#: The recorded chart bodies (real Yahoo responses, MIT; see tests/fixtures/SOURCES.md).
RECORDED: dict[str, Path] = {
    "AAPL": FIXTURES / "yahoo_chart_AAPL_1d_2020-08-31_2020-11-06_div_split.json",
    "MSFT": FIXTURES / "yahoo_chart_MSFT_1d_2021-02-01_2022-01-28_dividends.json",
    "NVDA": FIXTURES / "yahoo_chart_NVDA_1d_2021-02-01_2022-01-28_split.json",
}

NEW_YORK = "America/New_York"
VALID_RANGES = ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"]
CRUMB = "stub-crumb"

CHART_NOT_FOUND: dict[str, Any] = {
    "chart": {
        "result": None,
        "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"},
    }
}

ChartKind = Literal["probe", "history"]


def load_recorded(symbol: str) -> dict[str, Any]:
    """The recorded chart body of ``symbol`` (AAPL, MSFT or NVDA)."""
    body: dict[str, Any] = json.loads(RECORDED[symbol].read_text(encoding="utf-8"))
    return body


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


# -- bodies ------------------------------------------------------------------------------------


def open_timestamps(dates: pd.DatetimeIndex, tz: str = NEW_YORK) -> list[int]:
    """Unix seconds of the 09:30 open (exchange time) of each date, as Yahoo stamps daily bars."""
    local = pd.DatetimeIndex(dates).normalize() + pd.Timedelta(hours=9, minutes=30)
    return [int(t.timestamp()) for t in local.tz_localize(tz)]


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def chart_body_from_frame(
    symbol: str,
    frame: pd.DataFrame,
    *,
    tz: str = NEW_YORK,
    currency: str = "USD",
    instrument_type: str | None = None,
    exchange_name: str | None = None,
    long_name: str | None = None,
) -> dict[str, Any]:
    """A full Yahoo chart body for a price frame (index: dates; the project's columns)."""
    dates = pd.DatetimeIndex(frame.index)
    stamps = open_timestamps(dates, tz)
    col = {c: frame[c].to_numpy(dtype=np.float64) for c in ("open", "high", "low", "close", "volume")}
    quote = {
        "open": [_num(v) for v in col["open"]],
        "high": [_num(v) for v in col["high"]],
        "low": [_num(v) for v in col["low"]],
        "close": [_num(v) for v in col["close"]],
        "volume": [int(v) if np.isfinite(v) else None for v in col["volume"]],
    }
    indicators: dict[str, Any] = {"quote": [quote]}
    if "adj_close" in frame and np.isfinite(frame["adj_close"].to_numpy(dtype=np.float64)).any():
        indicators["adjclose"] = [{"adjclose": [_num(v) for v in frame["adj_close"].to_numpy(np.float64)]}]
    events: dict[str, Any] = {}
    if "dividends" in frame:
        divs = {
            str(ts): {"amount": float(v), "date": ts}
            for ts, v in zip(stamps, frame["dividends"].to_numpy(np.float64), strict=True)
            if np.isfinite(v) and v > 0
        }
        if divs:
            events["dividends"] = divs
    if "splits" in frame:
        splits = {}
        for ts, v in zip(stamps, frame["splits"].to_numpy(np.float64), strict=True):
            if np.isfinite(v) and v > 0 and v != 1:
                ratio = Fraction(float(v)).limit_denominator(10_000)
                splits[str(ts)] = {
                    "date": ts,
                    "numerator": ratio.numerator,
                    "denominator": ratio.denominator,
                    "splitRatio": f"{ratio.numerator}:{ratio.denominator}",
                }
        if splits:
            events["splits"] = splits

    index = symbol.startswith("^")
    last = pd.Timestamp(stamps[-1], unit="s", tz="UTC").tz_convert(tz) if stamps else None
    offset = int(last.utcoffset().total_seconds()) if last is not None else -18000  # type: ignore[union-attr]
    abbrev = last.tzname() if last is not None else "EST"
    closes = [c for c in quote["close"] if c is not None]
    highs = [h for h in quote["high"] if h is not None] or closes
    lows = [lo for lo in quote["low"] if lo is not None] or closes
    day = last.normalize() if last is not None else pd.Timestamp("2000-01-03", tz=tz)

    def period(start_h: float, end_h: float) -> dict[str, Any]:
        return {
            "timezone": abbrev,
            "start": int((day + pd.Timedelta(hours=start_h)).timestamp()),
            "end": int((day + pd.Timedelta(hours=end_h)).timestamp()),
            "gmtoffset": offset,
        }

    meta = {
        "currency": currency,
        "symbol": symbol,
        "exchangeName": exchange_name or ("SNP" if index else "NMS"),
        "fullExchangeName": "SNP" if index else "NasdaqGS",
        "instrumentType": instrument_type or ("INDEX" if index else "EQUITY"),
        "firstTradeDate": stamps[0] if stamps else None,
        "regularMarketTime": stamps[-1] + 23_400 if stamps else None,
        "hasPrePostMarketData": not index,
        "gmtoffset": offset,
        "timezone": abbrev,
        "exchangeTimezoneName": tz,
        "regularMarketPrice": closes[-1] if closes else None,
        "fiftyTwoWeekHigh": max(highs[-252:]) if highs else None,
        "fiftyTwoWeekLow": min(lows[-252:]) if lows else None,
        "regularMarketDayHigh": highs[-1] if highs else None,
        "regularMarketDayLow": lows[-1] if lows else None,
        "regularMarketVolume": quote["volume"][-1] if stamps else None,
        "longName": long_name or f"{symbol} (generated by the test stub)",
        "shortName": long_name or symbol,
        "chartPreviousClose": closes[0] if closes else None,
        "priceHint": 2,
        "currentTradingPeriod": {"pre": period(4, 9.5), "regular": period(9.5, 16), "post": period(16, 20)},
        "dataGranularity": "1d",
        "range": "",
        "validRanges": list(VALID_RANGES),
    }
    result: dict[str, Any] = {"meta": meta, "timestamp": stamps, "indicators": indicators}
    if events:
        result["events"] = events
    return {"chart": {"result": [result], "error": None}}


def trim_chart_body(
    body: Mapping[str, Any],
    *,
    period1: int | None = None,
    period2: int | None = None,
    range_: str | None = None,
) -> dict[str, Any]:
    """A chart body cut to the bars with ``period1 <= timestamp < period2`` (or the last bars
    of ``range_``: ``1d`` one bar, ``5d`` five, anything else all), events cut likewise.

    With no bar left it is Yahoo's answer for an empty range: the meta and empty indicators.
    """
    out = copy.deepcopy(dict(body))
    result = out["chart"]["result"][0]
    stamps: list[int] = list(result.get("timestamp") or [])
    keep = list(range(len(stamps)))
    if period1 is not None or period2 is not None:
        lo = period1 if period1 is not None else -(2**62)
        hi = period2 if period2 is not None else 2**62
        keep = [i for i in keep if lo <= stamps[i] < hi]
    elif range_ is not None:
        last_n = {"1d": 1, "5d": 5}.get(range_)
        if last_n is not None:
            keep = keep[-last_n:]
        result["meta"]["range"] = range_
    kept = {stamps[i] for i in keep}
    if not keep:
        result.pop("timestamp", None)
        result.pop("events", None)
        result["indicators"] = {"quote": [{}], "adjclose": [{}]}
        return out
    result["timestamp"] = [stamps[i] for i in keep]
    quote = result["indicators"]["quote"][0]
    for name in list(quote):
        quote[name] = [quote[name][i] for i in keep]
    if "adjclose" in result["indicators"]:
        adj = result["indicators"]["adjclose"][0]
        adj["adjclose"] = [adj["adjclose"][i] for i in keep]
    events = result.get("events") or {}
    for kind in list(events):
        events[kind] = {k: v for k, v in events[kind].items() if int(v["date"]) in kept}
        if not events[kind]:
            del events[kind]
    if "events" in result and not events:
        del result["events"]
    return out


# -- requests and faults -----------------------------------------------------------------------


@dataclass(frozen=True)
class StubRequest:
    """One request the stub received."""

    method: str
    path: str
    query: dict[str, str]
    yahoo_host: str | None  #: the Yahoo host yfinance meant (``X-Forwarded-Host``)
    host: str  #: the ``Host`` header: where it really went
    at: float = 0.0  #: ``time.monotonic()`` when it arrived

    @property
    def chart_symbol(self) -> str | None:
        """The symbol of a chart request, else None."""
        prefix = "/v8/finance/chart/"
        return unquote(self.path[len(prefix) :]).upper() if self.path.startswith(prefix) else None

    @property
    def chart_kind(self) -> ChartKind | None:
        """``history`` (period1/period2: the prices) or ``probe`` (range: yfinance's timezone
        lookup) for a chart request."""
        if self.chart_symbol is None:
            return None
        return "history" if "period1" in self.query else "probe"


#: Rewrites a chart body (a deep copy) for one answer.
BodyEdit = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Fault:
    """What to do instead of a normal answer to one chart request.

    ``status``: answer with this HTTP status (body: ``body``, else Yahoo-like text for 429 and
    a chart error body otherwise); ``delay_s``: wait this long first (past the client's timeout
    it becomes a timeout); ``truncate_at``: send only the first bytes of the body (a well-formed
    HTTP answer with broken JSON); ``body``: send these bytes instead (e.g. an HTML error page
    with status 200); ``edit``: rewrite the normal chart body (see :func:`answer_as`,
    :func:`duplicate_bar`, :func:`null_bar`, :func:`scale_bar`); ``reset``: close the
    connection with a TCP reset instead of answering; ``on``: which chart requests it applies
    to (``chart``: any, ``history``: the price request, ``probe``: yfinance's timezone lookup).
    """

    status: int | None = None
    delay_s: float = 0.0
    truncate_at: int | None = None
    body: bytes | None = None
    edit: BodyEdit | None = None
    reset: bool = False
    on: Literal["chart", "history", "probe"] = "chart"

    def applies_to(self, kind: ChartKind) -> bool:
        return self.on == "chart" or self.on == kind


def answer_as(symbol: str) -> BodyEdit:
    """An edit that relabels the body as another symbol's (``meta.symbol``), as Yahoo does for a
    renamed ticker."""

    def edit(body: dict[str, Any]) -> dict[str, Any]:
        body["chart"]["result"][0]["meta"]["symbol"] = symbol
        return body

    return edit


def _bars(body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    result = body["chart"]["result"][0]
    return result, list(result.get("timestamp") or [])


def duplicate_bar(i: int, *, close_factor: float = 1.0, seconds_later: int = 3600) -> BodyEdit:
    """An edit that sends bar ``i`` twice: the copy ``seconds_later`` (same trading date), with
    its prices times ``close_factor``."""

    def edit(body: dict[str, Any]) -> dict[str, Any]:
        result, stamps = _bars(body)
        j = i % len(stamps)
        result["timestamp"] = [*stamps[: j + 1], stamps[j] + seconds_later, *stamps[j + 1 :]]
        quote = result["indicators"]["quote"][0]
        for name, values in quote.items():
            v = values[j]
            scaled = v * close_factor if v is not None and name != "volume" else v
            quote[name] = [*values[: j + 1], scaled, *values[j + 1 :]]
        for adj in result["indicators"].get("adjclose") or []:
            v = adj["adjclose"][j]
            adj["adjclose"] = [
                *adj["adjclose"][: j + 1],
                v * close_factor if v is not None else v,
                *adj["adjclose"][j + 1 :],
            ]
        return body

    return edit


def null_bar(i: int) -> BodyEdit:
    """An edit that empties bar ``i`` (every price and the volume null), as Yahoo sometimes does."""

    def edit(body: dict[str, Any]) -> dict[str, Any]:
        result, stamps = _bars(body)
        j = i % len(stamps)
        for values in result["indicators"]["quote"][0].values():
            values[j] = None
        for adj in result["indicators"].get("adjclose") or []:
            adj["adjclose"][j] = None
        return body

    return edit


def scale_bar(i: int, factor: float = 100.0) -> BodyEdit:
    """An edit that multiplies every price of bar ``i`` by ``factor`` (a 100x unit mix-up)."""

    def edit(body: dict[str, Any]) -> dict[str, Any]:
        result, stamps = _bars(body)
        j = i % len(stamps)
        for name, values in result["indicators"]["quote"][0].items():
            if name != "volume" and values[j] is not None:
                values[j] = values[j] * factor
        for adj in result["indicators"].get("adjclose") or []:
            if adj["adjclose"][j] is not None:
                adj["adjclose"][j] = adj["adjclose"][j] * factor
        return body

    return edit


def with_dividend(frame: pd.DataFrame, ex_date: str | pd.Timestamp, amount: float) -> pd.DataFrame:
    """``frame`` after Yahoo learns of a cash dividend ``amount`` going ex on ``ex_date``.

    The row of ``ex_date`` gets the dividend, and every adjusted close before it is multiplied
    by ``1 - amount / close`` of the day before, as Yahoo's adjusted history is (close,
    open, high, low and the adjusted closes from ``ex_date`` on are unchanged).
    """
    out = frame.copy()
    day = pd.Timestamp(ex_date)
    before = out.index < day
    prev_close = float(out.loc[before, "close"].iloc[-1])
    out.loc[day, "dividends"] = amount
    out.loc[before, "adj_close"] = out.loc[before, "adj_close"] * (1.0 - amount / prev_close)
    return out


@dataclass
class _Entry:
    body: dict[str, Any]
    tz: str
    quote_type: str


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    symbols: dict[str, _Entry] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[StubRequest] = field(default_factory=list)


class YahooStub:
    """The stub server; use as a context manager or ``start()`` / ``stop()``."""

    def __init__(self) -> None:
        self._state = _State()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> YahooStub:
        state, stopping = self._state, self._stopping

        class Handler(_Handler):
            pass

        Handler.state = state
        Handler.stopping = stopping
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="yahoo-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> YahooStub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the stub first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- data

    def add_body(self, symbol: str, body: dict[str, Any]) -> None:
        """Serve ``body`` (a full chart body, e.g. a recording) for ``symbol``."""
        meta = body["chart"]["result"][0]["meta"]
        entry = _Entry(body, meta.get("exchangeTimezoneName", NEW_YORK), meta.get("instrumentType", "EQUITY"))
        with self._state.lock:
            self._state.symbols[symbol.upper()] = entry

    def add_recorded(self, *symbols: str) -> None:
        """Serve the recorded bodies of ``symbols`` (default: AAPL, MSFT and NVDA)."""
        for symbol in symbols or tuple(RECORDED):
            self.add_body(symbol, load_recorded(symbol))

    def add_frame(self, symbol: str, frame: pd.DataFrame, **meta: Any) -> dict[str, Any]:
        """Serve bodies generated from a price frame; ``meta`` goes to
        :func:`chart_body_from_frame` (``tz``, ``currency``, ...).  Returns the full body."""
        body = chart_body_from_frame(symbol.upper(), frame, **meta)
        self.add_body(symbol, body)
        return body

    def inject(self, symbol: str, *faults: Fault) -> None:
        """Queue faults for ``symbol``'s chart requests, consumed one per matching request."""
        with self._state.lock:
            self._state.faults.setdefault(symbol.upper(), []).extend(faults)

    def pending_faults(self, symbol: str) -> list[Fault]:
        """The faults not consumed yet."""
        with self._state.lock:
            return list(self._state.faults.get(symbol.upper(), []))

    # -- what it saw

    @property
    def requests(self) -> list[StubRequest]:
        """Every request received so far, in order."""
        with self._state.lock:
            return list(self._state.requests)

    def chart_requests(self, symbol: str | None = None, kind: ChartKind | None = None) -> list[StubRequest]:
        """The chart requests (for ``symbol``, of ``kind``) received so far."""
        return [
            r
            for r in self.requests
            if r.chart_symbol is not None
            and (symbol is None or r.chart_symbol == symbol.upper())
            and (kind is None or r.chart_kind == kind)
        ]

    def clear_requests(self) -> None:
        with self._state.lock:
            self._state.requests.clear()


# -- the handler ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    state: _State
    stopping: threading.Event
    server_version = "YahooStub/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet (the requests are recorded instead)."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = urlsplit(self.path)
        request = StubRequest(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            yahoo_host=self.headers.get("X-Forwarded-Host"),
            host=self.headers.get("Host", ""),
            at=time.monotonic(),
        )
        with self.state.lock:
            self.state.requests.append(request)
        status, content_type, body = self._answer(request)
        fault = self._take_fault(request)
        if fault is not None:
            if fault.delay_s and self.stopping.wait(fault.delay_s):
                return
            if fault.reset:
                # SO_LINGER with a zero timeout: close() sends a TCP reset, not a FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if fault.edit is not None and status == 200:
                body = _dumps(fault.edit(json.loads(body)))
            if fault.status is not None:
                status = fault.status
                if fault.body is None:
                    content_type, body = _fault_body(status)
            if fault.body is not None:
                body = fault.body
            if fault.truncate_at is not None:
                body = body[: fault.truncate_at]
        self._send(status, content_type, body)

    def _take_fault(self, request: StubRequest) -> Fault | None:
        symbol, kind = request.chart_symbol, request.chart_kind
        if symbol is None or kind is None:
            return None
        with self.state.lock:
            queue = self.state.faults.get(symbol, [])
            for i, fault in enumerate(queue):
                if fault.applies_to(kind):
                    return queue.pop(i)
        return None

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def _answer(self, request: StubRequest) -> tuple[int, str, bytes]:
        path, query = request.path, request.query
        json_type = "application/json;charset=utf-8"
        if request.chart_symbol is not None:
            entry = self._entry(request.chart_symbol)
            if entry is None:
                return 404, json_type, _dumps(CHART_NOT_FOUND)
            p1, p2 = query.get("period1"), query.get("period2")
            if p1 is not None or p2 is not None:
                body = trim_chart_body(
                    entry.body,
                    period1=int(p1) if p1 else None,
                    period2=int(p2) if p2 else None,
                )
            else:
                body = trim_chart_body(entry.body, range_=query.get("range", "1mo"))
            return 200, json_type, _dumps(body)
        if path == "/v1/test/getcrumb":
            return 200, "text/plain;charset=utf-8", CRUMB.encode()
        if path.startswith("/v10/finance/quoteSummary/"):
            symbol = unquote(path.rsplit("/", 1)[-1]).upper()
            entry = self._entry(symbol)
            if entry is None:
                error = {"code": "Not Found", "description": f"Quote not found for symbol: {symbol}"}
                return 404, json_type, _dumps({"quoteSummary": {"result": None, "error": error}})
            info = {
                "quoteType": {"symbol": symbol, "quoteType": entry.quote_type, "timeZoneFullName": entry.tz}
            }
            return 200, json_type, _dumps({"quoteSummary": {"result": [info], "error": None}})
        if path.startswith("/v7/finance/quote"):
            found = []
            for symbol in query.get("symbols", "").split(","):
                entry = self._entry(symbol.strip().upper())
                if entry is not None:
                    found.append(
                        {
                            "symbol": symbol.strip().upper(),
                            "quoteType": entry.quote_type,
                            "exchangeTimezoneName": entry.tz,
                        }
                    )
            return 200, json_type, _dumps({"quoteResponse": {"result": found, "error": None}})
        if path in ("", "/", "/consent"):
            # fc.yahoo.com answers 404 (with a cookie); guce's consent page is EU-only.
            return 404, "text/html;charset=utf-8", b"<html><body>Not Found</body></html>"
        error = {"code": "Not Found", "description": "HTTP 404 Not Found"}
        return 404, json_type, _dumps({"finance": {"result": None, "error": error}})

    def _entry(self, symbol: str) -> _Entry | None:
        with self.state.lock:
            return self.state.symbols.get(symbol)


def _fault_body(status: int) -> tuple[str, bytes]:
    if status == 429:
        return "text/plain;charset=utf-8", b"Too Many Requests\r\n"
    error = {
        "code": "Internal Server Error" if status >= 500 else "Bad Request",
        "description": f"HTTP {status}",
    }
    return "application/json;charset=utf-8", _dumps({"chart": {"result": None, "error": error}})


# -- yfinance's own parsing, offline -----------------------------------------------------------------


class _ReplayResponse:
    def __init__(self, body: bytes, status: int = 200) -> None:
        self.content = body
        self.text = body.decode("utf-8")
        self.status_code = status
        self.url = "https://query2.finance.yahoo.com/"

    def json(self) -> Any:
        return json.loads(self.text)


class _Replay:
    """Stands in for yfinance's ``YfData``: answers chart requests from one body, no sockets."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.calls: list[dict[str, Any]] = []

    def get(self, url: str, params: Mapping[str, Any] | None = None, timeout: float = 30) -> _ReplayResponse:
        params = dict(params or {})
        self.calls.append(params)
        if "period1" in params:
            body = trim_chart_body(self.body, period1=int(params["period1"]), period2=int(params["period2"]))
        else:
            body = trim_chart_body(self.body, range_=str(params.get("range", "1mo")))
        return _ReplayResponse(_dumps(body))

    cache_get = get


def replay_history(body: Mapping[str, Any], **history_kwargs: Any) -> pd.DataFrame:
    """What ``yf.Ticker(...).history(**history_kwargs)`` returns for a chart body, computed by
    yfinance's own ``PriceHistory`` code with the HTTP layer replaced (no network at all).

    Lets the pure transform be tested on recorded bodies exactly as yfinance parses them.
    """
    from yfinance.scrapers.history import PriceHistory

    meta = body["chart"]["result"][0]["meta"]
    history = PriceHistory(_Replay(body), meta["symbol"], meta["exchangeTimezoneName"])
    frame: pd.DataFrame = history.history(**history_kwargs)
    return frame


def iter_chart_bars(body: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, float | None]]]:
    """(timestamp, {open, high, low, close, volume, adjclose}) of each bar of a chart body."""
    result = body["chart"]["result"][0]
    quote = result["indicators"]["quote"][0]
    adj = (result["indicators"].get("adjclose") or [{}])[0].get("adjclose")
    for i, ts in enumerate(result.get("timestamp") or []):
        bar = {k: quote[k][i] for k in ("open", "high", "low", "close", "volume")}
        bar["adjclose"] = adj[i] if adj is not None else None
        yield ts, bar
