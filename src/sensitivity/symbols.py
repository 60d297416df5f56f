"""Ticker symbols: what a plausible Yahoo symbol looks like, checked before it reaches a path or URL.

Yahoo symbols use upper-case letters, digits and a few punctuation marks: ``^GSPC`` (indices),
``BRK-B`` (share classes), ``EURUSD=X`` (currencies), ``ES=F`` (futures), ``0700.HK``
(exchange suffixes), ``BTC-USD``.  Anything else (a slash, ``..``, whitespace, control
characters, a 200-character string) is refused with a message that names the symbol.
"""

from __future__ import annotations

import re

from sensitivity.errors import ConfigError

#: Longest symbol accepted.  Yahoo's longest real symbols are around 20 characters.
MAX_SYMBOL_LENGTH = 24

# One optional leading caret (indices), then a letter or digit, then letters, digits and the
# separators Yahoo uses.  Separators never repeat and never end the symbol, so ``..`` and
# ``A.`` are refused.
_SYMBOL_RE = re.compile(r"^\^?[A-Z0-9]+(?:[.\-=&_][A-Z0-9]+)*(?:=[A-Z])?$")


def normalize_symbol(symbol: object, *, what: str = "symbol") -> str:
    """Return ``symbol`` upper-cased and stripped, or raise :class:`ConfigError`.

    ``what`` names the key the symbol came from (``universe.tickers``), for the message.
    """
    if not isinstance(symbol, str):
        raise ConfigError(f"{what} must be a string ticker symbol, got {symbol!r}")
    text = symbol.strip().upper()
    if not text:
        raise ConfigError(f"{what} must not be empty, got {symbol!r}")
    if len(text) > MAX_SYMBOL_LENGTH:
        raise ConfigError(
            f"{what} {symbol[:30]!r}... is {len(text)} characters long; a Yahoo ticker has at "
            f"most {MAX_SYMBOL_LENGTH} (check the ticker)"
        )
    if not _SYMBOL_RE.fullmatch(text):
        raise ConfigError(
            f"{what} {symbol!r} is not a plausible ticker symbol: use letters, digits and "
            "Yahoo's separators . - = ^ (e.g. AAPL, BRK-B, ^GSPC, EURUSD=X)"
        )
    return text


def normalize_symbols(symbols: object, *, what: str = "universe.tickers") -> list[str]:
    """Normalise a list of symbols; refuse an empty list and duplicates."""
    if isinstance(symbols, str):
        symbols = [s for s in symbols.split(",")]
    if not isinstance(symbols, list | tuple):
        raise ConfigError(f"{what} must be a list of ticker symbols, got {symbols!r}")
    out = [normalize_symbol(s, what=what) for s in symbols]
    if not out:
        raise ConfigError(f"{what} must name at least one ticker, got an empty list")
    seen: set[str] = set()
    dups = sorted({s for s in out if s in seen or seen.add(s)})  # type: ignore[func-returns-value]
    if dups:
        raise ConfigError(f"{what} lists {', '.join(dups)} more than once; name each ticker once")
    return out
