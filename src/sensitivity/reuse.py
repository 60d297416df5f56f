"""Which stored per-day rows a run can keep instead of computing them again.

A rolling fit's row on day ``t`` depends on the data of its window, on the centres and scales
of the ticker's fits (:func:`sensitivity.api.fit_anchors`, taken from its first year of data),
on where the calendar's blocks of ``window`` rows start (its dates from the first), on the
model's settings and on the code that computes it -- on nothing after ``t``.  So the rows a
file holds through its last date stay what a recomputation would give, to the bit, as long
as all of that through that date is unchanged.  Each per-day file written by the pipeline
keeps an :class:`~sensitivity.store.InputsStamp`: its last date and a digest of those inputs
through it (:meth:`FitInputs.digest`).  The next run computes the digest of its own inputs
through the same date; where they agree it keeps the file's rows and fits only the later days
(``quadratic_sensitivity(..., from_date=...)``), and where anything differs -- a restated
price, another start date, another window, risk-free rate or estimator, a new version of the
code -- it computes the ticker's rows in full, as without stamps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from sensitivity.returns import AlignedReturns
from sensitivity.store import SCHEMA_VERSIONS, InputsStamp, ReportStore, SensitivityKey, StoredTail

__all__ = ["FitInputs", "Kept", "code_digest", "reusable_rows"]

#: The modules whose code shapes the stored numbers: a change to any of them (an upgrade, or
#: an edit in a checkout) recomputes every ticker once.
_NUMERIC_MODULES = (
    "api",
    "buffers",
    "inference",
    "model",
    "parquet_splice",
    "pipeline",
    "returns",
    "reuse",
    "robust",
    "sensitivity",
    "store",
    "threads",
)


@cache
def code_digest() -> str:
    """A digest of the source of the modules that compute and store the per-day rows."""
    import torch

    folder = Path(__file__).parent
    h = hashlib.blake2b(digest_size=16)
    for name in _NUMERIC_MODULES:
        h.update(name.encode())
        h.update((folder / f"{name}.py").read_bytes())
    h.update(f"torch {torch.__version__} numpy {np.__version__}".encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class FitInputs:
    """What a run's per-day rows are computed from: aligned returns, risk-free returns
    (``[dates, tickers]`` or None) and the settings (:meth:`settings_of`)."""

    aligned: AlignedReturns
    risk_free: pd.DataFrame | None
    settings: bytes

    @staticmethod
    def settings_of(
        *, index: str, window: int, min_obs: int, se: str, hac_lags: int | None, fit: str, device: str
    ) -> bytes:
        """The settings part of every digest (``device``: the resolved device type)."""
        return json.dumps(
            {
                "index": index,
                "window": window,
                "min_obs": min_obs,
                "se": se,
                "hac_lags": hac_lags,
                "fit": fit,
                "device": device,
                "schema": SCHEMA_VERSIONS["sensitivity"],
                "code": code_digest(),
            },
            sort_keys=True,
        ).encode()

    @cached_property
    def anchors(self) -> pd.DataFrame:
        """:func:`~sensitivity.api.fit_anchors` of every ticker (computed once, when needed)."""
        from sensitivity.api import fit_anchors

        a = self.aligned
        return fit_anchors(a.stock_returns, a.index_returns, risk_free=self.risk_free)

    @cached_property
    def _columns(self) -> tuple[dict[str, int], list[np.ndarray]]:
        """Each ticker's column number and the hashed panels ticker-major (``[N, T]``; views
        where pandas holds a panel as one block)."""
        a = self.aligned
        panels = [a.stock_returns, a.index_returns, a.close, a.prev_close]
        if self.risk_free is not None:
            panels.append(self.risk_free)
        columns = a.stock_returns.columns
        arrays = [
            (p if p.columns.equals(columns) else p[columns]).to_numpy(dtype=np.float64).T for p in panels
        ]
        return {str(t): i for i, t in enumerate(columns)}, arrays

    @cached_property
    def _anchor_bytes(self) -> dict[str, bytes]:
        """Each ticker's anchors (:attr:`anchors`' row) as the bytes its digests start from."""
        values = np.ascontiguousarray(self.anchors.to_numpy(dtype=np.float64))
        return {str(t): values[i].tobytes() for i, t in enumerate(self.anchors.index)}

    def row_of(self, day: dt.date) -> int:
        """The calendar row of ``day``; -1 when it is not a date of the calendar.  (A lookup
        in the calendar's index: building a one-date index for ``get_indexer`` took 0.2 ms a
        ticker.)"""
        try:
            row = self.aligned.calendar.get_loc(pd.Timestamp(day))
        except KeyError:
            return -1
        return row if isinstance(row, int) else -1

    @cached_property
    def _running(self) -> dict[str, tuple[int, hashlib.blake2b]]:
        """Each ticker's latest running hash (:meth:`_hash_through`) and its calendar row."""
        return {}

    def digest(self, ticker: str, row: int) -> str:
        """The ticker's digest of everything its rows depend on through calendar row ``row``.

        Hashes the settings, the ticker's fits' anchors, then row by row through ``row`` the
        calendar's date and the ticker's stock and index returns, close, previous close and
        risk-free return (the bytes of the int64 dates and float64 values).  Row by row, so a
        later row's digest goes on from an earlier one's (a daily run checks its stamps at the
        stored rows, then stamps the new last rows: the second pass hashes only the new days).
        Safe on several threads, one ticker per thread, once :meth:`prepare` has run.
        """
        return self._hash_through(ticker, row).hexdigest()

    def _hash_through(self, ticker: str, row: int) -> hashlib.blake2b:
        columns, arrays = self._columns
        i = columns[ticker]
        kept = self._running.get(ticker)
        if kept is not None and kept[0] <= row:
            done, h = kept[0], kept[1].copy()
        else:
            done = -1
            h = hashlib.blake2b(self.settings, digest_size=20)
            h.update(b"risk-free" if self.risk_free is not None else b"raw")
            h.update(self._anchor_bytes[ticker])
        if row > done:
            # Rows [done + 1, row] interleaved (date, then each panel's value): one C-order
            # block, so hashing rows a and then b equals hashing a and b at once.
            block = np.empty((row - done, 1 + len(arrays)), dtype=np.float64)
            block[:, 0] = self.aligned.calendar.asi8[done + 1 : row + 1].view(np.float64)
            for k, values in enumerate(arrays, start=1):
                block[:, k] = values[i, done + 1 : row + 1]
            h.update(block.data)
        self._running[ticker] = (row, h)
        return h

    def grows(self, ticker: str, row: int) -> bool:
        """Whether ``ticker`` has a stock return after calendar row ``row`` (days to fit)."""
        columns, arrays = self._columns
        return bool(np.isfinite(arrays[0][columns[ticker], row + 1 :]).any())

    def prepare(self) -> None:
        """Compute what :meth:`digest` shares between tickers (before using it on threads)."""
        _ = self.anchors, self._anchor_bytes, self._columns, self._running
        if len(self.aligned.calendar):
            self.row_of(self.aligned.calendar[0].date())  # the calendar's lookup table, built once

    def stamps(self, last_dates: Mapping[str, dt.date]) -> dict[str, InputsStamp]:
        """The :class:`~sensitivity.store.InputsStamp` of each ticker's rows through its last date."""
        days = pd.DatetimeIndex([pd.Timestamp(d) for d in last_dates.values()])
        rows = self.aligned.calendar.get_indexer(days)
        return {
            t: InputsStamp(last_dates[t], self.digest(t, int(r)))
            for t, r in zip(last_dates, rows, strict=True)
            if r >= 0
        }


@dataclass(frozen=True, eq=False)
class Kept:
    """A ticker's stored rows that a run keeps: what was read of its file (``stored``: its
    rows from ``stored.skipped`` on, the rows before kept as bytes), its last date, its
    calendar row and whether it has later days to fit (:meth:`FitInputs.grows`).  The table's
    ``cleared`` columns (:func:`reusable_rows`) are all null when it has."""

    stored: StoredTail
    through: dt.date
    row: int
    grows: bool

    @property
    def table(self) -> pa.Table:
        """The rows read: the file's from row ``stored.skipped`` on."""
        return self.stored.table


def reusable_rows(
    reports: ReportStore,
    inputs: FitInputs,
    *,
    index: str,
    window: int,
    tickers: Iterable[str],
    cleared: Collection[str] = (),
) -> dict[str, Kept]:
    """The stored per-day rows of ``tickers`` that ``inputs`` would compute again, bit for bit.

    Reads the footer of each ticker's file; where the digest of ``inputs`` through the
    stamp's date matches the stamp's, reads the file (whose last row must be dated
    ``through``): its last row group, where the groups before can be kept as bytes
    (:meth:`~sensitivity.store.ReportStore.read_sensitivity_tails`), else all of it.  Files
    without a stamp or with another digest are left out (not decoded): those tickers are
    computed in full.  ``cleared``: columns the caller writes null in the
    stored rows of a ticker with later days (the Huber fit, kept on the latest row only when
    ``fit = "ols"``): for those tickers they are not decoded and come back all null.
    """
    keys = {(index, t, window): t for t in tickers}
    rows: dict[str, tuple[int, bool]] = {}  # calendar row, later days to fit
    inputs.prepare()

    def same_inputs(key: SensitivityKey, stamp: InputsStamp) -> bool:
        row = inputs.row_of(stamp.through)
        if row < 0 or inputs.digest(keys[key], row) != stamp.digest:
            return False
        rows[keys[key]] = (row, inputs.grows(keys[key], row))
        return True

    def unused(key: SensitivityKey) -> Collection[str]:
        return cleared if rows[keys[key]][1] else ()

    tails = reports.read_sensitivity_tails(keys, keep=same_inputs, unused=unused)
    kept: dict[str, Kept] = {}
    for key, stored in tails.items():
        t, table, stamp = keys[key], stored.table, stored.stamp
        if stamp is None or table.num_rows == 0 or table.column("date")[-1].as_py() != stamp.through:
            continue
        kept[t] = Kept(stored, stamp.through, *rows[t])
    return kept
