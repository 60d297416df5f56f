"""A thread-safe token bucket: at most ``rate`` requests per second on average, in bursts of
at most ``capacity``.

The Yahoo session takes one token from the process-wide bucket (:func:`request_bucket`)
before every HTTP request, whatever thread sends it, so a run with many concurrent fetches
still asks Yahoo at a bounded rate.  Each process (a Dask worker, a ``sensitivity serve``
flow-run subprocess) has its own bucket.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Final

__all__ = ["DEFAULT_REQUESTS_PER_SECOND", "TokenBucket", "request_bucket", "set_request_rate"]

#: The rate of the process-wide bucket until something sets another (``source.requests_per_second``).
DEFAULT_REQUESTS_PER_SECOND: Final = 2.0


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"requests_per_second must be a finite number > 0, got {rate!r}")
    return float(rate)


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``capacity`` (default: one second's worth,
    at least 1); :meth:`acquire` takes one, waiting for it if none is left.

    Waiting threads reserve their token first and sleep outside the lock, so they are served
    in the order they asked, and the rate holds across threads.  ``clock`` and ``sleep`` are
    injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._rate = _check_rate(rate)
        self._capacity = self._capacity_for(self._rate, capacity)
        self._tokens = self._capacity
        self._stamp = clock()

    @staticmethod
    def _capacity_for(rate: float, capacity: float | None) -> float:
        if capacity is None:
            return max(1.0, rate)
        if not (math.isfinite(capacity) and capacity >= 1):
            raise ValueError(f"capacity must be a finite number >= 1, got {capacity!r}")
        return float(capacity)

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def capacity(self) -> float:
        """The most tokens the bucket holds (the largest burst)."""
        return self._capacity

    def set_rate(self, rate: float, capacity: float | None = None) -> None:
        """Change the rate (and capacity); tokens already earned are kept, up to the capacity."""
        rate = _check_rate(rate)
        with self._lock:
            self._refill()
            self._rate = rate
            self._capacity = self._capacity_for(rate, capacity)
            self._tokens = min(self._tokens, self._capacity)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self) -> float:
        """Take one token, sleeping until it is available; return the seconds waited."""
        with self._lock:
            self._refill()
            self._tokens -= 1.0
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self._rate
        if wait > 0:
            self._sleep(wait)
        return wait


_bucket = TokenBucket(DEFAULT_REQUESTS_PER_SECOND)


def request_bucket() -> TokenBucket:
    """The process-wide bucket every Yahoo request takes a token from."""
    return _bucket


def set_request_rate(requests_per_second: float) -> None:
    """Set the rate of the process-wide bucket (its capacity: one second's worth, at least 1)."""
    _bucket.set_rate(requests_per_second)
