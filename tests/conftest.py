"""Shared fixtures.

Yahoo stub fixtures: ``yahoo_stub`` (a started :class:`yahoo_stub.YahooStub`, always stopped),
``network_guard`` (refuses and records any connection to a host other than the loopback),
``yahoo_env`` (``SENSITIVITY_YAHOO_BASE_URL`` pointing at the stub and yfinance's caches in
``tmp_path``, both undone after the test) and ``yahoo_source`` (a ``YahooSource`` built in that
environment).  ``swept_folders`` records the store's looks for stale temporary files.  Nothing
here is active unless a test asks for it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from yahoo_stub import YahooStub

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

#: The request rate tests against the local stub run at (the default, 2/s, is for Yahoo).
STUB_REQUESTS_PER_SECOND = 1000.0


@pytest.fixture
def yahoo_stub() -> Iterator[YahooStub]:
    """A running stub of Yahoo's chart API on 127.0.0.1 (no symbols registered yet)."""
    stub = YahooStub().start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def network_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse name lookups and connections to anything but the loopback; list the attempts.

    Covers every Python-socket client (requests, urllib3).  A test asserts the list is empty
    to show that nothing escaped to the internet.
    """
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in _LOOPBACK:
            attempts.append(name)
            raise socket.gaierror(f"network_guard: no name lookups in tests ({name})")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in _LOOPBACK:
            attempts.append(str(address[0]))
            raise ConnectionRefusedError(f"network_guard: no connections in tests ({address[0]})")
        real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


@pytest.fixture
def yahoo_env(
    yahoo_stub: YahooStub, network_guard: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[YahooStub]:
    """yfinance pointed at the stub (through the environment) with its caches in ``tmp_path``,
    and the process-wide request rate raised to :data:`STUB_REQUESTS_PER_SECOND` (a source
    built from a config sets its own rate; the previous rate is restored afterwards)."""
    from sensitivity.sources.ratelimit import request_bucket, set_request_rate
    from sensitivity.sources.yahoo import BASE_URL_ENV, set_yfinance_cache_dir, yfinance_cache_dir

    monkeypatch.setenv(BASE_URL_ENV, yahoo_stub.base_url)
    previous = yfinance_cache_dir()
    previous_rate = request_bucket().rate
    set_yfinance_cache_dir(tmp_path / "yfinance-cache")
    set_request_rate(STUB_REQUESTS_PER_SECOND)
    try:
        yield yahoo_stub
    finally:
        set_request_rate(previous_rate)
        set_yfinance_cache_dir(previous)


@pytest.fixture
def yahoo_source(yahoo_env: YahooStub) -> Any:
    """A ``YahooSource`` that talks to the stub (base URL from the environment)."""
    from sensitivity.sources.yahoo import YahooSource

    return YahooSource(timeout_s=5.0)


@pytest.fixture
def swept_folders(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders the store looks in for stale temporary files, one entry per look, in order
    (``sensitivity.store._remove_stale_temps`` still runs)."""
    import sensitivity.store as store_module

    swept: list[Path] = []
    sweep = store_module._remove_stale_temps

    def counted(folder: Path) -> None:
        swept.append(folder)
        sweep(folder)

    monkeypatch.setattr(store_module, "_remove_stale_temps", counted)
    return swept


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
