"""Live prices from Yahoo Finance through yfinance (the only module that imports yfinance).

*Extract* is one ``yf.Ticker(symbol, session=...).history(...)`` call with every switch explicit
(``auto_adjust=False`` keeps both ``Close`` and ``Adj Close``; ``actions=True`` brings dividends
and splits; ``repair`` only when ``source.repair`` asks for it; ``keepna=True`` so that empty
bars reach the boundary checks instead of vanishing; no rounding, no pre/post market).  The
session keeps the chart body Yahoo sent, so the answer is checked against the request: a body
for another symbol is an error, and dates Yahoo sent twice (which yfinance silently
de-duplicates) are recorded.  *Transform* (:func:`yahoo_prices`) is pure: exchange-timezone
timestamps become naive trading dates, columns get the project's names and float64, and the
rows pass the boundary checks of :mod:`sensitivity.sources.quality`, limited to ``[start, end]``.

Every request first takes a token from the process-wide bucket of
:mod:`sensitivity.sources.ratelimit` (``source.requests_per_second``) and has a timeout of at
most ``source.timeout_s``.

What yfinance 1.7 requests for one ``history()`` call (all hosts hard-coded in yfinance):

* ``GET https://fc.yahoo.com/`` (cookie; before every request until a cookie is cached);
* ``GET https://query1.finance.yahoo.com/v1/test/getcrumb`` (crumb, once per process);
* ``GET https://query2.finance.yahoo.com/v8/finance/chart/<SYMBOL>?range=1d&interval=1d``
  (the exchange timezone; skipped when yfinance's timezone cache knows the symbol);
* ``GET https://query2.finance.yahoo.com/v8/finance/chart/<SYMBOL>?period1=..&period2=..
  &interval=1d&includePrePost=False&events=div,splits,capitalGains`` (the prices);
* after an HTTP error it retries once with its other cookie strategy, which visits
  ``https://guce.yahoo.com/consent`` (and ``consent.yahoo.com``); for a symbol without a
  timezone it asks ``https://query2.finance.yahoo.com/v10/finance/quoteSummary/<SYMBOL>``
  (and ``query1.../v7/finance/quote``) before giving up.

``base_url`` (or the environment variable ``SENSITIVITY_YAHOO_BASE_URL``) sends **every** one
of those requests to another server, e.g. a local stub of Yahoo's chart API: the session
rewrites any ``*.yahoo.com`` URL to ``<base_url><path>?<query>`` (keeping the Yahoo host in an
``X-Forwarded-Host`` header) and refuses any other host, so nothing escapes to the internet.

yfinance keeps process-wide state, which this module sets explicitly: its exceptions are made
to surface (below), its in-memory response cache is cleared before each fetch (so a retry
really asks again), and :func:`set_yfinance_cache_dir` moves its on-disk caches.  yfinance also
shares one HTTP session between all tickers (the last one passed in wins), so use one
:class:`YahooSource` per process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import pandas as pd
import requests
import yfinance as yf
import yfinance.cache as yf_cache
from yfinance.data import YfData
from yfinance.exceptions import (
    YFDataException,
    YFException,
    YFPricesMissingError,
    YFRateLimitError,
    YFTickerMissingError,
)

from sensitivity.errors import (
    ConfigError,
    DataValidationError,
    EmptyDataError,
    NetworkError,
    RateLimitError,
    SourceError,
    SymbolNotFoundError,
)
from sensitivity.sources.base import check_date_range
from sensitivity.sources.quality import CheckedPrices, QualityIssue, clean_price_frame
from sensitivity.sources.ratelimit import request_bucket, set_request_rate
from sensitivity.symbols import normalize_symbol

try:  # yfinance prefers curl_cffi (browser TLS fingerprint); it is optional since yfinance 1.4.
    from curl_cffi import requests as curl_requests
except ImportError:  # pragma: no cover - curl_cffi is installed with yfinance by default
    curl_requests = None  # type: ignore[assignment]

__all__ = [
    "BASE_URL_ENV",
    "HTTPExchange",
    "YahooAnswer",
    "YahooCurlSession",
    "YahooRequestsSession",
    "YahooSource",
    "chart_duplicate_dates",
    "chart_symbol",
    "is_yahoo_host",
    "make_yahoo_session",
    "redirect_url",
    "set_yfinance_cache_dir",
    "yahoo_error",
    "yahoo_price_frame",
    "yahoo_prices",
    "yfinance_cache_dir",
]

log = logging.getLogger(__name__)

#: Environment variable read when ``YahooSource(base_url=None)``: redirect Yahoo there.
BASE_URL_ENV = "SENSITIVITY_YAHOO_BASE_URL"

# yfinance 1.x hides its exceptions by default: it logs them and returns an empty frame, which
# would read as "no data".  The pipeline must see every failure, so this module turns that off,
# process-wide, with yfinance's own 1.x switch (``history(raise_errors=True)`` is deprecated).
# It is set once here, never toggled around calls (that would race between threads);
# :meth:`YahooSource.fetch` only puts it back if something else changed it.
yf.config.debug.hide_exceptions = False
# yfinance retries only "transient" errors, and never HTTP 429.  Retrying, with backoff, is the
# pipeline's job (Prefect task retries), so yfinance's own retries stay off (its default).
yf.config.network.retries = 0

#: User-Agent of the plain-requests session (the one yfinance uses without curl_cffi).
_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)

#: Path prefixes of Yahoo's data endpoints (as opposed to cookie, crumb and consent pages).
_DATA_PATHS = ("/v8/finance/chart/", "/v10/finance/quoteSummary/", "/v7/finance/quote")

_COLUMNS = {
    "Open": "open",
    "High": "high",
    "Low": "low",
    "Close": "close",
    "Adj Close": "adj_close",
    "Volume": "volume",
    "Dividends": "dividends",
    "Stock Splits": "splits",
}
_REQUIRED = ("Open", "High", "Low", "Close", "Volume")


# -- the HTTP session ----------------------------------------------------------------------


@dataclass(frozen=True)
class HTTPExchange:
    """One request yfinance made and what came back (``status`` None: no response).

    ``body`` is kept for successful price requests (chart requests with ``period1``) only.
    """

    method: str
    url: str
    status: int | None
    body: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def is_data(self) -> bool:
        """Whether it hit a data endpoint (chart, quoteSummary, quote)."""
        path = urlsplit(self.url).path
        return any(p in path for p in _DATA_PATHS)

    @property
    def is_history(self) -> bool:
        """Whether it asked for prices (a chart request with ``period1``), not a timezone probe."""
        return _is_history_url(self.url)


_local = threading.local()


def _is_history_url(url: str) -> bool:
    """Whether ``url`` asks the chart API for prices (``period1``), not a timezone probe."""
    parts = urlsplit(url)
    return "/v8/finance/chart/" in parts.path and "period1" in dict(parse_qsl(parts.query))


def _record(method: str, url: str, status: int | None, body: bytes | None = None) -> None:
    trace: list[HTTPExchange] | None = getattr(_local, "trace", None)
    if trace is not None:
        trace.append(HTTPExchange(method.upper(), url, status, body))


def _with_params(url: str, params: Any) -> str:
    """``url`` with ``params`` (a mapping or pairs, as given to a session) in its query."""
    if not params:
        return url
    try:
        query = urlencode(params, doseq=True)
    except TypeError:  # not a mapping or pairs: leave the URL as it is
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"


def _body_to_keep(url: str, status: int, response: Any) -> bytes | None:
    """The body of a successful price request (for the checks of the answer), else None."""
    if status != 200 or not _is_history_url(url):
        return None
    content = getattr(response, "content", None)
    return bytes(content) if isinstance(content, bytes | bytearray) else None


@contextmanager
def _recording() -> Iterator[list[HTTPExchange]]:
    """Collect the HTTP exchanges this thread makes inside the block."""
    previous = getattr(_local, "trace", None)
    trace: list[HTTPExchange] = []
    _local.trace = trace
    try:
        yield trace
    finally:
        _local.trace = previous


def is_yahoo_host(host: str | None) -> bool:
    """Whether ``host`` is ``yahoo.com`` or one of its subdomains."""
    return host is not None and (host == "yahoo.com" or host.endswith(".yahoo.com"))


def redirect_url(url: str, base_url: str) -> str:
    """``url`` with its scheme and host replaced by ``base_url`` when it is a Yahoo URL.

    The path of ``base_url`` (if any) prefixes the original path; the query is kept:
    ``https://query2.finance.yahoo.com/v8/finance/chart/AAPL?x=1`` with base
    ``http://127.0.0.1:8000`` becomes ``http://127.0.0.1:8000/v8/finance/chart/AAPL?x=1``.
    """
    parts = urlsplit(url)
    if not is_yahoo_host(parts.hostname):
        return url
    base = urlsplit(base_url)
    path = base.path.rstrip("/") + (parts.path or "/")
    return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))


def _cap_timeout(timeout: Any, cap: float) -> Any:
    """The smaller of a request's timeout and ``cap`` (a missing timeout becomes ``cap``)."""
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        return min(float(timeout), cap)
    if isinstance(timeout, tuple):
        return tuple(min(float(t), cap) if isinstance(t, int | float) else cap for t in timeout)
    return cap


class YahooRequestsSession(requests.Session):
    """A plain ``requests`` session for yfinance: redirect, rate limit, timeout cap, record.

    With ``base_url`` every ``*.yahoo.com`` request (redirects included) goes to ``base_url``
    and any other host is refused.  Every request takes a token from the process-wide bucket
    (:func:`~sensitivity.sources.ratelimit.request_bucket`) and gets a timeout of at most
    ``timeout_s``.
    """

    def __init__(self, *, base_url: str | None = None, timeout_s: float = 30.0) -> None:
        super().__init__()
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.headers.update(
            {
                "User-Agent": _USER_AGENT,
                "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                "Accept-Language": "en-US,en;q=0.5",
            }
        )
        if base_url is not None:
            # No proxies or .netrc from the environment: the redirected traffic stays local.
            self.trust_env = False

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """Send ``request`` (redirected to ``base_url`` when set); record the outcome."""
        original = str(request.url)
        method = str(request.method or "GET")
        if self.base_url is not None:
            host = urlsplit(original).hostname
            base_host = urlsplit(self.base_url).hostname
            if is_yahoo_host(host):
                request.url = redirect_url(original, self.base_url)
                request.headers["X-Forwarded-Host"] = str(host)
            elif host != base_host:
                _record(method, original, None)
                raise requests.ConnectionError(
                    f"refusing to contact {host}: with a Yahoo base URL ({self.base_url}) set, "
                    "only Yahoo hosts are reachable, through it"
                )
        kwargs["timeout"] = _cap_timeout(kwargs.get("timeout"), self.timeout_s)
        request_bucket().acquire()
        try:
            response = super().send(request, **kwargs)
        except Exception:
            _record(method, original, None)
            raise
        status = int(response.status_code)
        _record(method, original, status, _body_to_keep(original, status, response))
        return response


if curl_requests is not None:

    class YahooCurlSession(curl_requests.Session):  # type: ignore[type-arg]
        """yfinance's default curl_cffi session (Chrome fingerprint) with the rate limit, a
        timeout cap and a record of responses.  Used when no ``base_url`` is set."""

        def __init__(self, *, timeout_s: float = 30.0) -> None:
            super().__init__(impersonate="chrome")
            self.timeout_s = timeout_s

        def request(self, method: Any, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            """Send one request (rate limited) with a capped timeout; record the outcome."""
            kwargs["timeout"] = _cap_timeout(kwargs.get("timeout"), self.timeout_s)
            full = _with_params(url, kwargs.get("params"))
            request_bucket().acquire()
            try:
                response = super().request(method, url, *args, **kwargs)
            except Exception:
                _record(str(method), full, None)
                raise
            status = int(response.status_code)
            _record(str(method), full, status, _body_to_keep(full, status, response))
            return response

else:  # pragma: no cover
    YahooCurlSession = None  # type: ignore[assignment,misc]


def make_yahoo_session(*, base_url: str | None = None, timeout_s: float = 30.0) -> Any:
    """The session yfinance should use: plain requests with ``base_url``, else curl_cffi."""
    if base_url is None and YahooCurlSession is not None:
        return YahooCurlSession(timeout_s=timeout_s)
    return YahooRequestsSession(base_url=base_url, timeout_s=timeout_s)


# -- yfinance's process-wide state ---------------------------------------------------------


def yfinance_cache_dir() -> Path:
    """Where yfinance keeps its on-disk caches now (default: ``~/.cache/py-yfinance``)."""
    return Path(yf_cache._TzDBManager.get_location())


def set_yfinance_cache_dir(path: str | os.PathLike[str]) -> None:
    """Point yfinance's on-disk caches (timezones, cookies, ISINs) at ``path``, process-wide.

    yfinance creates the folder when it first needs it.  It opens its cache databases lazily
    and keeps them open, so a new location would only apply to caches not opened yet; they
    are reset here so it applies from now on.  Call it before fetching, not while fetches run
    in other threads.
    """
    yf.set_tz_cache_location(str(Path(path)))
    for manager, attr in (
        ("_TzCacheManager", "_tz_cache"),
        ("_CookieCacheManager", "_Cookie_cache"),
        ("_ISINCacheManager", "_isin_cache"),
    ):
        cls = getattr(yf_cache, manager, None)
        if cls is not None and hasattr(cls, attr):
            setattr(cls, attr, None)


def _prepare_yfinance() -> None:
    """Make yfinance raise, and forget responses it cached in memory (one call per fetch)."""
    if yf.config.debug.hide_exceptions is not False:
        log.warning("yfinance's hide_exceptions was switched back on; switching it off again")
        yf.config.debug.hide_exceptions = False
    # yfinance caches responses for past date ranges in an in-process LRU keyed by URL.  It
    # would also replay an error response, so a retry in the same process would never ask
    # Yahoo again: clear it.
    cache_clear = getattr(YfData.cache_get, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


# -- the source ----------------------------------------------------------------------------


@dataclass(frozen=True)
class YahooAnswer:
    """What one ``history()`` call brought back: yfinance's frame and the chart body Yahoo
    sent for it (None when the session did not keep it, e.g. a session passed in)."""

    frame: pd.DataFrame
    chart: Mapping[str, Any] | None = None


class YahooSource:
    """Daily prices from Yahoo Finance via ``yfinance.Ticker.history``.

    ``timeout_s`` caps every HTTP request; ``requests_per_second`` sets the process-wide
    request rate (:func:`~sensitivity.sources.ratelimit.set_request_rate`; None leaves it as
    it is, 2 per second unless something set another); ``repair`` asks yfinance to repair
    prices (``history(repair=True)``: 100x mix-ups, missing adjustments, zeros); ``base_url``
    (default: the environment variable ``SENSITIVITY_YAHOO_BASE_URL``, when no ``session`` is
    given) redirects every Yahoo host to another server; ``cache_dir`` moves yfinance's
    on-disk caches (process-wide, see :func:`set_yfinance_cache_dir`); ``session`` replaces
    the HTTP session built here (a ``requests`` or ``curl_cffi`` session, as yfinance accepts).

    It pickles (for worker processes) without the session it built; the copy builds a new one
    and applies the request rate in its own process.
    """

    name = "yahoo"

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        requests_per_second: float | None = None,
        repair: bool = False,
        base_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        session: Any = None,
    ) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        if requests_per_second is not None:
            try:
                set_request_rate(requests_per_second)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if not isinstance(repair, bool):
            raise ConfigError(f"repair must be true or false, got {repair!r}")
        if session is not None and base_url is not None:
            raise ConfigError(
                "pass either base_url or session to YahooSource, not both (build the session "
                "with make_yahoo_session(base_url=...) instead)"
            )
        what = "base_url"
        if base_url is None and session is None:
            base_url = os.environ.get(BASE_URL_ENV) or None
            what = BASE_URL_ENV
        if base_url is not None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
                raise ConfigError(
                    f"{what} must be an http(s) URL such as http://127.0.0.1:8000, got {base_url!r}"
                )
        self.timeout_s = float(timeout_s)
        self.requests_per_second = float(requests_per_second) if requests_per_second is not None else None
        self.repair = repair
        self.base_url = base_url
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            set_yfinance_cache_dir(self.cache_dir)
        self._own_session = session is None
        self.session = (
            session
            if session is not None
            else make_yahoo_session(base_url=base_url, timeout_s=self.timeout_s)
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the HTTP session built here (a worker process builds its own)."""
        state = dict(self.__dict__)
        if self._own_session:
            state["session"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the session; apply ``cache_dir`` and the request rate in this process too."""
        self.__dict__.update(state)
        if self.session is None:
            self.session = make_yahoo_session(base_url=self.base_url, timeout_s=self.timeout_s)
        if self.cache_dir is not None:
            set_yfinance_cache_dir(self.cache_dir)
        if self.requests_per_second is not None:
            set_request_rate(self.requests_per_second)

    def __repr__(self) -> str:
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        repair = ", repair=True" if self.repair else ""
        return f"YahooSource(timeout_s={self.timeout_s}{repair}{where})"

    def extract(self, symbol: str, start: dt.date, end: dt.date) -> YahooAnswer:
        """yfinance's ``history()`` frame for ``symbol``, ``start`` to ``end`` inclusive, and the
        chart body it came from.

        The only network access.  yfinance's and the network's failures are raised as the
        project's errors (:func:`yahoo_error`).
        """
        _prepare_yfinance()
        with _recording() as trace:
            for attempt in range(_CACHE_LOCK_ATTEMPTS):
                try:
                    raw = self._history(symbol, start, end)
                    break
                except Exception as exc:
                    if _cache_locked(exc) and attempt + 1 < _CACHE_LOCK_ATTEMPTS:
                        time.sleep(_CACHE_LOCK_PAUSE_S * 2**attempt)
                        continue
                    raise yahoo_error(exc, symbol, start, end, trace, timeout_s=self.timeout_s) from exc
        return YahooAnswer(raw, _last_chart(trace, symbol))

    def _history(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """One ``yf.Ticker(...).history()`` call (what :meth:`extract` tries)."""
        frame: pd.DataFrame = yf.Ticker(symbol, session=self.session).history(
            start=start,
            end=end + dt.timedelta(days=1),  # yfinance's end is exclusive
            interval="1d",
            auto_adjust=False,
            back_adjust=False,
            actions=True,
            repair=self.repair,
            prepost=False,
            keepna=True,  # empty bars reach the boundary checks, which record them
            rounding=False,
            timeout=self.timeout_s,
        )
        return frame

    def fetch_checked(self, symbol: str, start: dt.date, end: dt.date) -> CheckedPrices:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive) and the report of
        the boundary checks.

        Raises :class:`~sensitivity.errors.SourceError` when Yahoo answered with prices of
        another symbol (it does so for renamed tickers).
        """
        check_date_range(start, end)
        sym = normalize_symbol(symbol)
        answer = self.extract(sym, start, end)
        answered = chart_symbol(answer.chart) if answer.chart is not None else None
        if answered is not None and answered.upper() != sym:
            raise SourceError(
                f"{sym}: Yahoo answered with prices for {answered}, not {sym} (the symbol may have "
                f"been renamed: check it, and use {answered} if that is the same security)",
                symbol=sym,
            )
        return yahoo_prices(answer.frame, sym, start, end, chart=answer.chart)

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive)."""
        return self.fetch_checked(symbol, start, end).frame


def _last_chart(trace: Sequence[HTTPExchange], symbol: str) -> Mapping[str, Any] | None:
    """The parsed body of the last successful price request of the fetch, if it was kept."""
    for exchange in reversed(trace):
        if exchange.body is not None and exchange.is_history:
            try:
                body = json.loads(exchange.body)
            except ValueError:  # yfinance parsed it, so this does not happen; stay defensive
                log.debug("%s: the kept chart body is not JSON", symbol)
                return None
            return body if isinstance(body, Mapping) else None
    return None


def _chart_result(chart: Mapping[str, Any]) -> Mapping[str, Any] | None:
    try:
        result = chart["chart"]["result"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return result if isinstance(result, Mapping) else None


def chart_symbol(chart: Mapping[str, Any]) -> str | None:
    """``meta.symbol`` of a chart body: the symbol Yahoo says the prices belong to."""
    result = _chart_result(chart)
    meta = result.get("meta") if result is not None else None
    symbol = meta.get("symbol") if isinstance(meta, Mapping) else None
    return symbol if isinstance(symbol, str) and symbol else None


def chart_duplicate_dates(chart: Mapping[str, Any]) -> list[QualityIssue]:
    """Trading dates a chart body has more than one bar for (yfinance keeps one of them).

    Dates are those of the exchange's timezone (``meta.exchangeTimezoneName``).  Pure.
    """
    result = _chart_result(chart)
    if result is None:
        return []
    stamps = result.get("timestamp")
    meta = result.get("meta")
    tz = meta.get("exchangeTimezoneName") if isinstance(meta, Mapping) else None
    if not isinstance(stamps, list) or len(stamps) < 2:
        return []
    try:
        utc = pd.to_datetime(pd.Series(stamps, dtype="int64"), unit="s", utc=True)
        local = utc.dt.tz_convert(tz) if isinstance(tz, str) and tz else utc
    except (TypeError, ValueError, OverflowError, KeyError):
        return []
    counts = local.dt.strftime("%Y-%m-%d").value_counts()
    return [
        QualityIssue(str(day), f"duplicate date: Yahoo sent {int(n)} bars for this date; yfinance kept one")
        for day, n in sorted(counts[counts > 1].items())
    ]


# -- errors ---------------------------------------------------------------------------------

_TIMEOUT_NAMES = frozenset({"Timeout", "TimeoutError", "ConnectTimeout", "ReadTimeout"})
_CONNECTION_NAMES = frozenset(
    {
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectionAbortedError",
        "RemoteDisconnected",
        "ChunkedEncodingError",
        "ContentDecodingError",
        "ProtocolError",
        "DNSError",
        "ProxyError",
        "SSLError",
        "IncompleteRead",
        "CurlError",
    }
)


#: How often a fetch is tried while yfinance's on-disk cache is locked, and the first pause.
#: yfinance keeps ticker time zones and cookies in SQLite (WAL) files shared by every thread;
#: a fetch whose read transaction must become a write while another thread writes gets
#: "database is locked" at once, without SQLite's busy wait. Nothing is wrong with the
#: symbol or the network: the same call succeeds a moment later.
_CACHE_LOCK_ATTEMPTS: Final = 5
_CACHE_LOCK_PAUSE_S: Final = 0.05


def _cache_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (sqlite3's or peewee's OperationalError)."""
    return "OperationalError" in _class_names(exc) and "database is locked" in str(exc)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by a requests/curl_cffi ``HTTPError``, if any."""
    if "HTTPError" not in _class_names(exc):
        return None
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return int(status) if isinstance(status, int) else None


def yahoo_error(
    exc: BaseException,
    symbol: str,
    start: dt.date,
    end: dt.date,
    exchanges: Sequence[HTTPExchange] = (),
    *,
    timeout_s: float | None = None,
) -> SourceError:
    """The project's error for a failed yfinance fetch of ``symbol``.

    ``exchanges`` are the HTTP requests made during the fetch: yfinance does not raise on
    every bad status (it parses a 500's error body, for one), so the statuses Yahoo's data
    endpoints answered decide between "server error", "rate limited" and "unknown symbol".
    """
    statuses = [x.status for x in exchanges if x.is_data and x.status is not None]
    chart = [x.status for x in exchanges if "/v8/finance/chart/" in x.url and x.status is not None]
    names = _class_names(exc)
    detail = f"{type(exc).__name__}: {exc}"
    not_found = SymbolNotFoundError(
        f"{symbol}: Yahoo has no prices for this symbol (check the ticker: it may be misspelt or delisted)",
        symbol=symbol,
    )

    if isinstance(exc, YFRateLimitError) or 429 in statuses:
        return RateLimitError(
            f"{symbol}: Yahoo is rate limiting requests (HTTP 429 Too Many Requests); wait a "
            "few minutes and retry, or fetch fewer symbols at once",
            symbol=symbol,
        )
    server = [s for s in statuses if s >= 500]
    if server:
        return NetworkError(
            f"{symbol}: Yahoo answered with a server error (HTTP {server[-1]}); retry later",
            symbol=symbol,
        )
    if isinstance(exc, json.JSONDecodeError):
        return SourceError(
            f"{symbol}: Yahoo sent a malformed (truncated or non-JSON) response ({exc}); retry later",
            symbol=symbol,
            retryable=True,
        )
    if names & _TIMEOUT_NAMES:
        limit = f" within {timeout_s:g} s" if timeout_s is not None else ""
        return NetworkError(
            f"{symbol}: Yahoo did not answer{limit} ({type(exc).__name__}); retry later or raise "
            "source.timeout_s",
            symbol=symbol,
        )
    status = _http_status(exc)
    if status is None and names & _CONNECTION_NAMES:
        return NetworkError(
            f"{symbol}: cannot reach Yahoo ({detail}); check the network connection and retry",
            symbol=symbol,
        )
    if status == 404:
        return not_found
    if status is not None:
        return SourceError(
            f"{symbol}: Yahoo refused the request (HTTP {status}); retry later", symbol=symbol, retryable=True
        )
    if isinstance(exc, YFPricesMissingError):
        if chart and chart[-1] == 404:
            return not_found
        reason = f"Yahoo says: {exc.yahoo_reason}" if exc.yahoo_reason else "no trading day in it?"
        return EmptyDataError(
            f"{symbol}: Yahoo has no prices between {start} and {end} ({reason}); widen the dates "
            "or check when the symbol traded",
            symbol=symbol,
        )
    if isinstance(exc, YFTickerMissingError):  # YFTzMissingError: Yahoo does not know it
        return not_found
    if isinstance(exc, YFDataException) and "CURRENTLY DOWN" in str(exc):
        return NetworkError(f"{symbol}: Yahoo Finance is down ({exc}); retry later", symbol=symbol)
    if isinstance(exc, KeyError | IndexError | TypeError | ValueError | YFDataException):
        return SourceError(
            f"{symbol}: Yahoo sent a response yfinance could not read ({detail}); retry later",
            symbol=symbol,
            retryable=True,
        )
    if isinstance(exc, YFException):
        return SourceError(f"{symbol}: yfinance failed ({detail})", symbol=symbol)
    return SourceError(
        f"{symbol}: fetching from Yahoo failed unexpectedly ({detail}); rerun with --debug and report it",
        symbol=symbol,
    )


# -- transform (pure) -------------------------------------------------------------------------


def yahoo_prices(
    raw: pd.DataFrame,
    symbol: str,
    start: dt.date,
    end: dt.date,
    *,
    exchange_tz: str | None = None,
    chart: Mapping[str, Any] | None = None,
) -> CheckedPrices:
    """yfinance's ``history(auto_adjust=False, actions=True)`` frame as a checked price frame
    with its quality report.

    The index (timestamps in the exchange's timezone) becomes naive trading dates with
    ``tz_convert(exchange_tz)`` and the wall-clock date; ``exchange_tz`` defaults to the
    index's own zone (yfinance localises to ``meta.exchangeTimezoneName``).  Columns are
    renamed (``Adj Close`` -> ``adj_close``, ``Stock Splits`` -> ``splits``, ...) and cast to
    float64; other columns (``Capital Gains``) are dropped.  The rows then pass the boundary
    checks (:func:`~sensitivity.sources.quality.clean_price_frame`): duplicated dates, missing
    and non-positive prices, high < low, 100x jumps, limited to ``[start, end]``.  Dates the
    chart body ``chart`` held twice and rows yfinance repaired (its ``Repaired?`` column) are
    reported too.  Pure.
    """
    if raw.empty:
        raise EmptyDataError(
            f"{symbol}: Yahoo returned no prices between {start} and {end} (widen the dates or "
            "check when the symbol traded)",
            symbol=symbol,
        )
    missing = [c for c in _REQUIRED if c not in raw.columns]
    if missing:
        raise DataValidationError(
            f"{symbol}: Yahoo's answer lacks column(s) {', '.join(missing)} (columns: "
            f"{', '.join(map(str, raw.columns))}); yfinance may have changed: report it"
        )
    index = raw.index
    if not isinstance(index, pd.DatetimeIndex):
        raise DataValidationError(
            f"{symbol}: Yahoo's answer has a {type(index).__name__}, not dates; report it"
        )
    if index.tz is not None and exchange_tz is not None:
        index = index.tz_convert(exchange_tz)
    data = {
        new: raw[old].to_numpy(dtype=np.float64, na_value=np.nan)
        if old in raw.columns
        else np.full(len(raw), np.nan)
        for old, new in _COLUMNS.items()
    }
    frame = pd.DataFrame(data, index=index)
    repaired: list[QualityIssue] = []
    if "Repaired?" in raw.columns:
        flags = raw["Repaired?"].fillna(False).astype(bool).to_numpy()
        days = index[flags]
        if days.tz is not None:
            days = days.tz_localize(None)
        repaired = [
            QualityIssue(d.date().isoformat(), "repaired by yfinance (source.repair = true)") for d in days
        ]
    duplicates = chart_duplicate_dates(chart) if chart is not None else []
    return clean_price_frame(
        frame, symbol, origin="Yahoo", start=start, end=end, dropped=duplicates, repaired=repaired
    )


def yahoo_price_frame(
    raw: pd.DataFrame,
    symbol: str,
    start: dt.date,
    end: dt.date,
    *,
    exchange_tz: str | None = None,
) -> pd.DataFrame:
    """The checked price frame of :func:`yahoo_prices` (without the quality report).  Pure."""
    return yahoo_prices(raw, symbol, start, end, exchange_tz=exchange_tz).frame
