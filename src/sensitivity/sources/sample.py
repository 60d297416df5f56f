"""The bundled offline sample: ``data/sample/<SYMBOL>.parquet`` in the project's own format.

Each file has the columns ``date`` (date32), ``open, high, low, close, adj_close, volume,
dividends, splits`` (float64), ``fetched_at`` (timestamp, UTC) and ``source`` (string); this
source reads the date and the price columns only.  The sample holds real Yahoo daily prices
(see ``data/sample/`` for provenance and licence), so it runs the whole pipeline offline.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sensitivity.errors import DataValidationError, SourceError, SymbolNotFoundError
from sensitivity.prices import PRICE_COLUMNS, check_price_frame
from sensitivity.sources.base import check_date_range, trading_date_index
from sensitivity.sources.quality import CheckedPrices, clean_price_frame
from sensitivity.symbols import normalize_symbol

__all__ = ["DEFAULT_SAMPLE_DIR", "SampleSource", "sample_price_frame"]

#: ``data/sample`` at the project root (this file is ``src/sensitivity/sources/sample.py``).
DEFAULT_SAMPLE_DIR: Path = Path(__file__).resolve().parents[3] / "data" / "sample"

#: The columns read from a sample file.
SAMPLE_COLUMNS: tuple[str, ...] = ("date", *PRICE_COLUMNS)


class SampleSource:
    """Prices from the bundled sample (or another folder in the same format)."""

    name = "sample"

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else DEFAULT_SAMPLE_DIR

    def __repr__(self) -> str:
        return f"SampleSource({str(self.folder)!r})"

    def symbols(self) -> list[str]:
        """The symbols the sample holds, sorted (empty when the folder is missing)."""
        try:
            return sorted(p.stem for p in self.folder.glob("*.parquet") if p.is_file())
        except OSError:
            return []

    # -- extract -------------------------------------------------------------------------

    def read_table(self, symbol: str) -> pa.Table:
        """The date and price columns of ``symbol``'s sample file, as stored."""
        sym = normalize_symbol(symbol)
        path = self.folder / f"{sym}.parquet"
        if not path.is_file():
            if not self.folder.is_dir():
                raise SourceError(
                    f"{sym}: the sample folder {self.folder} does not exist (restore data/sample "
                    "from the repository, or use source.kind = 'yahoo' or 'files')",
                    symbol=sym,
                )
            available = ", ".join(self.symbols()) or "none"
            raise SymbolNotFoundError(
                f"{sym}: not in the bundled sample (available: {available}); pick one of those "
                "or use source.kind = 'yahoo' or 'files' for other symbols",
                symbol=sym,
            )
        try:
            return pq.read_table(path, columns=list(SAMPLE_COLUMNS))
        except (pa.ArrowInvalid, KeyError) as exc:
            raise DataValidationError(
                f"{sym}: sample file {path} is unreadable or lacks a column of "
                f"{', '.join(SAMPLE_COLUMNS)} ({exc}); restore data/sample from the repository"
            ) from exc
        except OSError as exc:
            raise SourceError(f"{sym}: cannot read sample file {path} ({exc})", symbol=sym) from exc

    def fetch_checked(self, symbol: str, start: dt.date, end: dt.date) -> CheckedPrices:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive) and the report of
        the boundary checks (:func:`~sensitivity.sources.quality.clean_price_frame`)."""
        check_date_range(start, end)
        sym = normalize_symbol(symbol)
        frame = sample_price_frame(self.read_table(sym), sym)
        return clean_price_frame(frame, sym, origin="the bundled sample", start=start, end=end)

    def fetch(self, symbol: str, start: dt.date, end: dt.date) -> pd.DataFrame:
        """The price frame of ``symbol`` from ``start`` to ``end`` (inclusive)."""
        return self.fetch_checked(symbol, start, end).frame


# -- transform (pure) ---------------------------------------------------------------------------


def sample_price_frame(table: pa.Table, symbol: str) -> pd.DataFrame:
    """A sample table (``date`` + price columns) as a checked price frame. Pure."""
    missing = [c for c in SAMPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise DataValidationError(
            f"{symbol}: the sample file lacks column(s) {', '.join(missing)}; restore data/sample"
        )
    dates = table.column("date")
    if dates.null_count or not (pa.types.is_date(dates.type) or pa.types.is_timestamp(dates.type)):
        raise DataValidationError(
            f"{symbol}: the sample file's date column must hold dates without nulls, got "
            f"{dates.type} with {dates.null_count} null(s); restore data/sample"
        )
    index = trading_date_index(dates.to_numpy())
    data = {
        c: np.asarray(table.column(c).cast(pa.float64()).to_pandas(), dtype=np.float64) for c in PRICE_COLUMNS
    }
    frame = pd.DataFrame(data, index=index)
    if not frame.index.is_monotonic_increasing:
        frame = frame.sort_index(kind="stable")
    return check_price_frame(frame, symbol)
