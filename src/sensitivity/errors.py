"""The project's one family of errors.

Every error raised on purpose by ``sensitivity`` derives from :class:`SensitivityError`, so
callers (the CLI, the flow) can tell a data or input problem, which deserves a one-line
message, from a bug, which deserves a traceback.  Messages name the culprit and say what to
do next.
"""

from __future__ import annotations

from typing import Any


class SensitivityError(Exception):
    """Base class of every error the pipeline raises on purpose."""

    #: Exit status the CLI uses for this kind of error.
    exit_code: int = 1


class ConfigError(SensitivityError, ValueError):
    """A configuration key, CLI option or flow parameter has an impossible value."""

    exit_code = 2


class SourceError(SensitivityError):
    """Prices for a symbol could not be obtained from its source."""

    exit_code = 3

    def __init__(self, message: str, *, symbol: str | None = None, retryable: bool = False):
        super().__init__(message)
        self.symbol = symbol
        #: Whether trying again later may help (network down, rate limited, server error).
        self.retryable = retryable


class EmptyDataError(SourceError):
    """The source answered, but with no usable prices for the symbol and range."""


class SymbolNotFoundError(SourceError):
    """The source does not know the symbol (unknown, misspelt or delisted)."""


class RateLimitError(SourceError):
    """The source refused the request because of too many requests (HTTP 429)."""

    def __init__(self, message: str, *, symbol: str | None = None):
        super().__init__(message, symbol=symbol, retryable=True)


class NetworkError(SourceError):
    """The source could not be reached, timed out or answered with a server error."""

    def __init__(self, message: str, *, symbol: str | None = None):
        super().__init__(message, symbol=symbol, retryable=True)


class StoreError(SensitivityError):
    """The Parquet store could not be read or written; nothing stored was changed."""

    exit_code = 4


class StoreLockedError(StoreError):
    """Another run holds the store's write lock."""

    exit_code = 5


class DataValidationError(SensitivityError, ValueError):
    """Prices or returns break an invariant (duplicate dates, non-positive prices, ...)."""

    exit_code = 3


class ModelFitError(SensitivityError):
    """The model could not be fitted at all (for example: no ticker has any return)."""

    exit_code = 1


class PartialRunError(SensitivityError):
    """Some symbols failed; the others were processed and written.

    ``failures`` maps each failed symbol to a one-line reason.
    """

    exit_code = 3

    def __init__(self, failures: dict[str, str], *, written: int = 0, result: dict[str, Any] | None = None):
        self.failures = dict(failures)
        self.written = written
        #: What the run wrote for the other symbols (paths, summary rows), when it got that far.
        self.result = result
        lines = [f"{sym}: {reason}" for sym, reason in sorted(self.failures.items())]
        super().__init__("\n".join(lines))
