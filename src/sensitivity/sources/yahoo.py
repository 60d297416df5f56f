"""Live prices from Yahoo Finance through yfinance (the only module that imports yfinance).

*Extract* is one ``yf.Ticker(symbol, session=...).history(...)`` call with every switch explicit
(``auto_adjust=False`` keeps both ``Close`` and ``Adj Close``; ``actions=True`` brings dividends
and splits; no repair, no rounding, no pre/post market).  *Transform*
(:func:`yahoo_price_frame`) is pure: exchange-timezone timestamps become naive trading dates,
columns get the project's names and float64, rows outside ``[start, end]`` are dropped.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
from sensitivity.sources.base import check_date_range, select_date_range, trading_date_index
from sensitivity.symbols import normalize_symbol

try:  # yfinance prefers curl_cffi (browser TLS fingerprint); it is optional since yfinance 1.4.
    from curl_cffi import requests as curl_requests
except ImportError:  # pragma: no cover - curl_cffi is installed with yfinance by default
    curl_requests = None  # type: ignore[assignment]

__all__ = [
    "BASE_URL_ENV",
    "HTTPExchange",
    "YahooCurlSession",
    "YahooRequestsSession",
    "YahooSource",
    "is_yahoo_host",
    "make_yahoo_session",
    "redirect_url",
    "set_yfinance_cache_dir",
    "yahoo_error",
    "yahoo_price_frame",
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
    """One request yfinance made and what came back (``status`` None: no response)."""

    method: str
    url: str
    status: int | None

    @property
    def is_data(self) -> bool:
        """Whether it hit a data endpoint (chart, quoteSummary, quote)."""
        path = urlsplit(self.url).path
        return any(p in path for p in _DATA_PATHS)


_local = threading.local()


def _record(method: str, url: str, status: int | None) -> None:
    trace: list[HTTPExchange] | None = getattr(_local, "trace", None)
    if trace is not None:
        trace.append(HTTPExchange(method.upper(), url, status))


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
    """A plain ``requests`` session for yfinance: redirect, timeout cap, response record.

    With ``base_url`` every ``*.yahoo.com`` request (redirects included) goes to ``base_url``
    and any other host is refused.  Every request gets a timeout of at most ``timeout_s``.
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
        try:
            response = super().send(request, **kwargs)
        except Exception:
            _record(method, original, None)
            raise
        _record(method, original, response.status_code)
        return response


if curl_requests is not None:

    class YahooCurlSession(curl_requests.Session):  # type: ignore[type-arg]
        """yfinance's default curl_cffi session (Chrome fingerprint) with a timeout cap and a
        record of responses.  Used when no ``base_url`` is set."""

        def __init__(self, *, timeout_s: float = 30.0) -> None:
            super().__init__(impersonate="chrome")
            self.timeout_s = timeout_s

        def request(self, method: Any, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            """Send one request with a capped timeout; record the outcome."""
            kwargs["timeout"] = _cap_timeout(kwargs.get("timeout"), self.timeout_s)
            try:
                response = super().request(method, url, *args, **kwargs)
            except Exception:
                _record(str(method), url, None)
                raise
            _record(str(method), url, int(response.status_code))
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


class YahooSource:
    """Daily prices from Yahoo Finance via ``yfinance.Ticker.history``.

    ``timeout_s`` caps every HTTP request; ``base_url`` (default: the environment variable
    ``SENSITIVITY_YAHOO_BASE_URL``, when no ``session`` is given) redirects every Yahoo host
    to another server; ``cache_dir`` moves yfinance's on-disk caches (process-wide, see
    :func:`set_yfinance_cache_dir`); ``session`` replaces the HTTP session built here (a
    ``requests`` or ``curl_cffi`` session, as yfinance accepts).

    It pickles (for worker processes) without the session it built; the copy builds a new one.
    """

    name = "yahoo"

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        base_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        session: Any = None,
    ) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ConfigError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
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
        """Rebuild the session, and apply ``cache_dir`` in this process too."""
        self.__dict__.update(state)
        if self.session is None:
            self.session = make_yahoo_session(base_url=self.base_url, timeout_s=self.timeout_s)
        if self.cache_dir is not None:
            set_yfinance_cache_dir(self.cache_dir)

    def __repr__(self) -> str:
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        return f"YahooSource(timeout_s={self.timeout_s}{where})"

    def extract(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """yfinance's ``history()`` frame for ``symbol``, ``start`` to ``end`` inclusive.

        The only network access.  yfinance's and the network's failures are raised as the
        project's errors (:func:`yahoo_error`).
        """
        _prepare_yfinance()
        with _recording() as trace:
            try:
                ticker = yf.Ticker(symbol, session=self.session)
                raw: pd.DataFrame = ticker.history(
                    start=start,
                    end=end + dt.timedelta(days=1),  # yfinance's end is exclusive
                    interval="1d",
                    auto_adjust=False,
                    back_adjust=False,
                    actions=True,
                    repair=False,
                    prepost=False,
                    keepna=False,
                    rounding=False,
                    timeout=self.timeout_s,
                )
            except Exception as exc:
                raise yahoo_error(exc, symbol, start, end, trace, timeout_s=self.timeout_s) from exc
        return raw

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive)."""
        check_date_range(start, end)
        sym = normalize_symbol(symbol)
        raw = self.extract(sym, start, end)
        return yahoo_price_frame(raw, sym, start, end)


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


def yahoo_price_frame(
    raw: pd.DataFrame,
    symbol: str,
    start: dt.date,
    end: dt.date,
    *,
    exchange_tz: str | None = None,
) -> pd.DataFrame:
    """yfinance's ``history(auto_adjust=False, actions=True)`` frame as a checked price frame.

    The index (timestamps in the exchange's timezone) becomes naive trading dates with
    ``tz_convert(exchange_tz).normalize().tz_localize(None)``; ``exchange_tz`` defaults to the
    index's own zone (yfinance localises to ``meta.exchangeTimezoneName``).  Columns are
    renamed (``Adj Close`` -> ``adj_close``, ``Stock Splits`` -> ``splits``, ...) and cast to
    float64; other columns (``Capital Gains``) are dropped.  Rows outside ``[start, end]`` are
    dropped; a date that appears twice is a :class:`DataValidationError`.  Pure.
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
    tz = exchange_tz if exchange_tz is not None else index.tz
    if index.tz is not None:
        index = index.tz_convert(tz).normalize().tz_localize(None)
    dates = trading_date_index(index)
    data = {
        new: raw[old].to_numpy(dtype=np.float64, na_value=np.nan)
        if old in raw.columns
        else np.full(len(raw), np.nan)
        for old, new in _COLUMNS.items()
    }
    frame = pd.DataFrame(data, index=dates)
    if not frame.index.is_monotonic_increasing:
        frame = frame.sort_index(kind="stable")
    if frame.index.has_duplicates:
        day = frame.index[frame.index.duplicated()][0].date()
        raise DataValidationError(
            f"{symbol}: Yahoo returned the date {day} twice; retry later (if it persists, fetch "
            "another range or use the files source)"
        )
    return select_date_range(frame, symbol, start, end, origin="Yahoo")
