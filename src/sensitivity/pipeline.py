"""The pipeline's steps, free of any orchestrator.

Each step takes the validated :class:`~sensitivity.config.Config` and small values (symbols,
dates), reads and writes through the store, and returns a small, JSON-friendly outcome.
``flows/pipeline.py`` wires these steps as Prefect tasks; tests call them directly.

    fetch_symbol      source -> price store (one symbol)
    fetch_batch       fetch_symbol for several symbols (in a worker process: fetch_batch_logged)
    fit_universe      price store -> returns -> model -> sensitivity + summary tables
    write_run_report  tables -> HTML report + manifest
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import math
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from sensitivity import progress
from sensitivity.config import Config
from sensitivity.errors import ModelFitError, SourceError, StoreError, StoreLockedError
from sensitivity.prices import PriceArrays, date_index, float_columns
from sensitivity.returns import (
    AlignedReturns,
    aligned_returns_from_arrays,
    daily_risk_free,
    period_risk_free,
    price_series,
)
from sensitivity.reuse import FitInputs, Kept, reusable_rows
from sensitivity.sources.base import PriceSource, fetch_checked, make_source
from sensitivity.sources.quality import CheckedPrices, QualityReport
from sensitivity.store import (
    SENSITIVITY_SCHEMA,
    DateRange,
    PreparedMerge,
    PriceStore,
    ReportStore,
    SensitivityKey,
    StoredRows,
    as_read_back,
    file_identity,
    frame_from_price_table,
    one_sweep_per_folder,
    store_lock,
    table_days,
    table_from_frame,
)
from sensitivity.symbols import normalize_symbol

if TYPE_CHECKING:  # (the report, and matplotlib with it, is imported when it is drawn)
    from sensitivity.report import SectionDraft

log = logging.getLogger(__name__)

_VERSIONED = ("stock-sensitivity", "torch", "numpy", "pandas", "pyarrow", "prefect", "yfinance", "pydantic")


FetchMode = Literal["full", "incremental", "refetch"]


@dataclass(frozen=True)
class FetchOutcome:
    """What fetching one symbol did to the store.

    ``mode``: ``full`` (the whole requested range was fetched: nothing usable was stored, or
    the store lacked part of the range before its last date), ``incremental`` (only from a few
    stored trading days before the last stored date, ``source.overlap_days``, to the end) or
    ``refetch`` (the fetched days disagreed with the store, so the whole stored history plus
    the requested range was fetched again and replaced the stored one).  ``restated`` says
    whether the store disagreed, ``restatement`` how (the first differences).
    ``requested_*`` is the configured range, ``fetch_*`` the range the last request asked the
    source for.  ``rows_*`` count the merge (``rows_removed``: stored dates a refetch no
    longer has).  ``dropped_rows``, ``repaired_rows`` and ``quality_warnings`` are the
    boundary checks' records, ``{"date", "reason"}`` each (docs/data-quality.md).
    """

    symbol: str
    source: str
    rows_fetched: int
    rows_added: int
    rows_changed: int
    rows_stored: int
    first_date: str | None
    last_date: str | None
    seconds: float
    mode: FetchMode = "full"
    restated: bool = False
    restatement: str | None = None
    requested_start: str | None = None
    requested_end: str | None = None
    fetch_start: str | None = None
    fetch_end: str | None = None
    rows_removed: int = 0
    dropped_rows: list[dict[str, str]] = field(default_factory=list)
    repaired_rows: list[dict[str, str]] = field(default_factory=list)
    quality_warnings: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log: what was fetched and what it did to the store."""
        what = {
            "full": "full fetch",
            "incremental": "incremental fetch",
            "refetch": "history restated, full refetch",
        }[self.mode]
        line = (
            f"{self.symbol}: {what} {self.fetch_start} to {self.fetch_end} from {self.source}: "
            f"{self.rows_fetched} rows ({self.rows_added} new, {self.rows_changed} changed"
        )
        if self.rows_removed:
            line += f", {self.rows_removed} removed"
        line += f"), {self.rows_stored} stored"
        if self.restatement:
            line += f"; {self.restatement}"
        if self.dropped_rows:
            line += f"; {len(self.dropped_rows)} row(s) dropped by the quality checks"
        return line


@dataclass(frozen=True)
class FitOutcome:
    """What the fit wrote: the as-of date, row counts and the tickers without any data."""

    as_of: str
    index: str
    window: int
    rows: int
    rows_by_ticker: dict[str, int]
    fitted_by_ticker: dict[str, int]
    first_date: str
    last_date: str
    no_data: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Float noise allowed when comparing refetched days with the store (relative).
RESTATEMENT_RTOL: Final = 1e-9

#: The columns whose change means Yahoo restated the history (a dividend or split arrived).
RESTATEMENT_COLUMNS: Final = ("adj_close", "close", "dividends", "splits")

#: A refetch may drop at most this many stored dates (or 1% of them, if more) without an error.
MAX_REFETCH_LOSS: Final = 5

#: How often fetch_symbol starts over when another run rewrote the symbol's file meanwhile.
_MAX_STORE_RACES: Final = 3


@dataclass(frozen=True)
class FetchPlan:
    """The range to ask the source for and why (see :func:`plan_fetch`)."""

    mode: Literal["full", "incremental"]
    start: dt.date
    end: dt.date
    reason: str


def plan_fetch(
    stored_dates: pd.DatetimeIndex | None,
    coverage: Sequence[DateRange] | None,
    start: dt.date,
    end: dt.date,
    *,
    overlap: int,
) -> FetchPlan:
    """What to fetch for the requested ``[start, end]`` given what the store holds.  Pure.

    ``stored_dates`` are the stored trading dates and ``coverage`` the ranges fetched into the
    store (:meth:`~sensitivity.store.PriceStore.coverage`); None: nothing stored.

    * nothing stored, or part of ``[start, end]`` before the end of the stored coverage never
      fetched (an earlier ``start`` than stored, a gap between two backfills): a **full**
      fetch of ``[start, end]``;
    * otherwise **incremental**: from the ``overlap``-th last stored date on or before ``end``
      (never before ``start``) to ``end``, so the last stored days are fetched again and can
      be compared with the store.
    """
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1, got {overlap}")
    if stored_dates is None or coverage is None or len(stored_dates) == 0 or not coverage:
        return FetchPlan("full", start, end, "nothing stored yet")
    covering = next(((lo, hi) for lo, hi in coverage if lo <= start <= hi), None)
    if covering is None:
        first = coverage[0][0]
        why = (
            f"the store starts at {first}, after the requested start {start}"
            if start < first
            else f"the store never fetched {start}"
        )
        return FetchPlan("full", start, end, why)
    upto = covering[1]
    later = [lo for lo, _ in coverage if upto < lo <= end]
    if later:
        return FetchPlan(
            "full",
            start,
            end,
            f"the store lacks {upto + dt.timedelta(days=1)} to {later[0] - dt.timedelta(days=1)}",
        )
    hi = pd.Timestamp(min(end, upto))
    dates = stored_dates[(stored_dates >= pd.Timestamp(start)) & (stored_dates <= hi)]
    if len(dates) == 0:
        return FetchPlan("incremental", start, end, f"no stored day between {start} and {min(end, upto)}")
    anchor = dates[max(0, len(dates) - overlap)].date()
    kept = len(dates) - max(0, len(dates) - overlap)
    return FetchPlan(
        "incremental",
        anchor,
        end,
        f"stored up to {dates[-1].date()}; fetching from {anchor} ({kept} stored day(s) again, to compare)",
    )


def restatement(stored: pd.DataFrame, fetched: pd.DataFrame, start: dt.date, end: dt.date) -> str | None:
    """How the fetched days in ``[start, end]`` disagree with the stored ones, or None.  Pure.

    A stored date the fetch no longer has, or a value of :data:`RESTATEMENT_COLUMNS` that
    differs beyond :data:`RESTATEMENT_RTOL` (NaN equals NaN) is a disagreement: the source
    restated its history (a dividend or split re-adjusts every earlier adjusted close), or
    corrected it.  A date the fetch adds is not (the merge adds it).  Volume and the other
    prices are not compared (Yahoo revises the last day's volume routinely).
    """
    lo, hi = np.datetime64(start, "ns"), np.datetime64(end, "ns")
    stored_days = stored.index.to_numpy(dtype="datetime64[ns]")
    inside = np.flatnonzero((stored_days >= lo) & (stored_days <= hi))
    if inside.size == 0:
        return None
    problems: list[str] = []
    fetched_days = fetched.index.to_numpy(dtype="datetime64[ns]")
    common, in_old, in_new = np.intersect1d(
        stored_days[inside], fetched_days, assume_unique=True, return_indices=True
    )
    if common.size < inside.size:
        missing = np.ones(inside.size, dtype=bool)
        missing[in_old] = False
        first = pd.Timestamp(stored_days[inside][missing][0]).date()
        problems.append(f"{int(missing.sum())} stored date(s) no longer in the source (first {first})")
    rows_old, rows_new = inside[in_old], in_new
    old_columns = float_columns(stored, RESTATEMENT_COLUMNS)
    new_columns = float_columns(fetched, RESTATEMENT_COLUMNS)
    for col in RESTATEMENT_COLUMNS:
        a = old_columns[col][rows_old]
        b = new_columns[col][rows_new]
        same = np.isclose(a, b, rtol=RESTATEMENT_RTOL, atol=0.0, equal_nan=True)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            name = col.replace("_", " ")
            day = pd.Timestamp(common[i]).date()
            problems.append(
                f"{name} differs on {int((~same).sum())} day(s) (first {day}: stored "
                f"{float(a[i])!r}, now {float(b[i])!r})"
            )
    return "; ".join(problems) if problems else None


def refetch_range(coverage: Sequence[DateRange] | None, start: dt.date, end: dt.date) -> DateRange:
    """The range a restated history is fetched again over: the requested range and everything
    stored, so that the whole stored history moves to the new adjustment basis and no stored
    row outside the requested range is lost or left on the old basis.  Pure."""
    if not coverage:
        return (start, end)
    return (min(start, coverage[0][0]), max(end, coverage[-1][1]))


@dataclass(frozen=True, eq=False)
class _Stored:
    """A symbol's stored prices as one read saw them: the Arrow table (PRICE_SCHEMA, with
    provenance; None when nothing is stored), its coverage, the file's identity and what the
    source reported it had checked at the last merge."""

    table: pa.Table | None
    coverage: list[DateRange] | None
    fingerprint: tuple[int, int, int] | None
    checked_prefix: str | None = None

    @cached_property
    def _days(self) -> npt.NDArray[np.int64]:
        return table_days(self.table) if self.table is not None else np.zeros(0, dtype=np.int64)

    @cached_property
    def dates(self) -> pd.DatetimeIndex | None:
        """The stored dates (None when nothing is stored)."""
        return None if self.table is None else date_index(self._days)

    def between(self, start: dt.date, end: dt.date) -> pd.DataFrame:
        """The :data:`RESTATEMENT_COLUMNS` of the stored rows dated ``start`` to ``end`` (the
        few a daily fetch compares: the whole history is not converted to pandas)."""
        if self.table is None:
            raise ValueError("nothing is stored")
        bounds = np.array([start, end], dtype="datetime64[D]").astype(np.int64)  # as table_days counts
        lo = int(np.searchsorted(self._days, bounds[0], side="left"))
        hi = int(np.searchsorted(self._days, bounds[1], side="right"))
        rows = self.table.slice(lo, max(0, hi - lo)).select(["date", *RESTATEMENT_COLUMNS])
        return frame_from_price_table(rows)


def _read_stored(store: PriceStore, symbol: str) -> _Stored:
    """The stored prices and coverage of ``symbol`` as one consistent snapshot."""
    path = store.path_for(symbol)
    for _ in range(_MAX_STORE_RACES):
        before = file_identity(path)
        read = store.read_snapshot(symbol)
        if file_identity(path) == before:
            if read is None:
                return _Stored(None, None, before)
            return _Stored(read.table, read.coverage, before, read.checked_prefix)
    raise StoreError(
        f"{symbol}: another run rewrote {path} during each of {_MAX_STORE_RACES} reads; "
        "rerun when the other run has finished"
    )


def _check_refetch_loss(
    symbol: str, stored: pd.DatetimeIndex, refetched: pd.DataFrame, source: str, path: Path
) -> pd.DatetimeIndex:
    """The ``stored`` dates a refetch lacks; raises when they are too many to be glitches."""
    gone = stored.difference(pd.DatetimeIndex(refetched.index))
    limit = max(MAX_REFETCH_LOSS, math.ceil(0.01 * len(stored)))
    if len(gone) > limit:
        raise SourceError(
            f"{symbol}: {source} now lacks {len(gone)} of the {len(stored)} stored dates "
            f"({gone[0].date()} to {gone[-1].date()}) after restating the history; the stored "
            f"prices were left unchanged (check the symbol's history at the source; to accept "
            f"it, delete {path} and rerun)",
            symbol=symbol,
        )
    return pd.DatetimeIndex(gone)


def _log_quality(symbol: str, report: QualityReport) -> None:
    for issue in report.dropped:
        log.warning("%s: dropped the row of %s: %s", symbol, issue.date, issue.reason)
    for issue in report.repaired:
        log.info("%s: %s: %s", symbol, issue.date, issue.reason)
    for issue in report.warnings:
        log.warning("%s: %s: %s", symbol, issue.date, issue.reason)


def fetch_symbol(config: Config, symbol: str, *, source: PriceSource | None = None) -> FetchOutcome:
    """Fetch ``symbol`` for the configured range and merge it into the price store.

    Fetches only what the store lacks (:func:`plan_fetch`: an incremental update refetches
    the last ``source.overlap_days`` stored days); when the refetched days disagree with the
    store (:func:`restatement`), fetches the whole stored history plus the requested range
    again (:func:`refetch_range`) and replaces the stored history with it.  Every fetch
    passes the boundary checks (:mod:`sensitivity.sources.quality`); their records go to the
    log and the outcome.  :func:`prepare_fetch`, then :func:`commit_fetch`.

    Raises the source's :class:`~sensitivity.errors.SourceError` on failure (also when a
    refetch would drop more stored dates than :data:`MAX_REFETCH_LOSS` or 1%); the store is
    then left exactly as it was.  Raises :class:`~sensitivity.errors.StoreError` when another
    run keeps rewriting the symbol's file while this one fetches.
    """
    src = source if source is not None else make_source(config.source)
    sym = normalize_symbol(symbol)
    for _ in range(_MAX_STORE_RACES):
        prepared = prepare_fetch(config, sym, source=src)
        try:
            outcome = commit_fetch(config, prepared)
        finally:
            prepared.discard()
        if outcome is not None:
            return outcome
    raise StoreError(
        f"{sym}: another run rewrote its stored prices during each of {_MAX_STORE_RACES} fetches; "
        "rerun when the other run has finished"
    )


@dataclass(eq=False)
class PreparedFetch:
    """A fetch of one symbol done up to its commit (:func:`prepare_fetch`).

    The merged price file is written and fsynced under a temporary name that readers
    ignore; nothing visible has changed.  :func:`commit_fetch` puts it in place, in this
    process or another (everything here pickles: a worker process can prepare and its
    caller commit), if the stored file is still the one it was merged with.  Call
    :meth:`discard` in a ``finally`` (idempotent; a committed file stays).
    """

    symbol: str
    source: str
    merge: PreparedMerge
    #: The identity of the stored file the merge was made from (None: nothing was stored).
    fingerprint: tuple[int, int, int] | None
    mode: FetchMode
    #: The configured range (``universe.start`` to ``resolved_end`` when it was prepared).
    requested: DateRange
    covers: DateRange
    restated: str | None
    quality: QualityReport
    rows_fetched: int
    first_date: str | None
    last_date: str | None
    #: Seconds spent preparing.
    seconds: float

    def discard(self) -> None:
        """Remove the temporary merged file unless it was committed."""
        self.merge.discard()


def prepare_fetch(config: Config, symbol: str, *, source: PriceSource | None = None) -> PreparedFetch:
    """:func:`fetch_symbol` up to the commit: read the stored prices, plan, fetch, check and
    write the merged file under a temporary name (without the store's lock).

    Raises as :func:`fetch_symbol` does (the temporary file is then already removed).
    """
    t0 = time.perf_counter()
    src = source if source is not None else make_source(config.source)
    sym = normalize_symbol(symbol)
    u = config.universe
    start, end = u.start, u.resolved_end
    store = PriceStore(config.output.data_dir)
    stored = _read_stored(store, sym)
    plan = plan_fetch(
        stored.dates,
        stored.coverage,
        start,
        end,
        overlap=config.source.overlap_days,
    )
    log.info("%s: %s fetch %s to %s: %s", sym, plan.mode, plan.start, plan.end, plan.reason)
    got: CheckedPrices = fetch_checked(src, sym, plan.start, plan.end, checked_prefix=stored.checked_prefix)
    mode: FetchMode = plan.mode
    covers: DateRange = (plan.start, plan.end)
    restated = None
    if stored.dates is not None:
        restated = restatement(stored.between(plan.start, plan.end), got.frame, plan.start, plan.end)
    if restated is not None and stored.dates is not None:
        covers = refetch_range(stored.coverage, start, end)
        log.warning(
            "%s: the source restated the stored history (%s); fetching %s to %s again to replace it",
            sym,
            restated,
            covers[0],
            covers[1],
        )
        if not (plan.start <= covers[0] and covers[1] <= plan.end):
            got = fetch_checked(src, sym, covers[0], covers[1], checked_prefix=stored.checked_prefix)
        gone = _check_refetch_loss(sym, stored.dates, got.frame, src.name, store.path_for(sym))
        if len(gone):
            log.warning(
                "%s: %d stored date(s) are gone from the restated history and are removed: %s",
                sym,
                len(gone),
                ", ".join(str(d.date()) for d in gone),
            )
        mode = "refetch"
    # The merged file is written (and fsynced) here, before the lock is taken; under the
    # lock only the check that the stored file is still the one read and the rename remain
    # (commit_fetch), so concurrent fetches hold it for about a millisecond each.
    merge = store.prepare_merge(
        sym,
        got.frame,
        source=src.name,
        replace=mode == "refetch",
        covers=covers,
        stored=(stored.table, stored.coverage),
        checked_prefix=got.checked_prefix,
    )
    return PreparedFetch(
        symbol=sym,
        source=src.name,
        merge=merge,
        fingerprint=stored.fingerprint,
        mode=mode,
        requested=(start, end),
        covers=covers,
        restated=restated,
        quality=got.quality,
        rows_fetched=len(got.frame),
        first_date=_iso(got.frame.index.min()),
        last_date=_iso(got.frame.index.max()),
        seconds=time.perf_counter() - t0,
    )


def commit_fetch(config: Config, prepared: PreparedFetch) -> FetchOutcome | None:
    """Put a prepared fetch in place under the store's lock; its outcome, or None when the
    stored file changed since it was read (another run rewrote it) or the prepared file is
    gone: then nothing was changed, and the symbol must be fetched again.

    Logs the boundary checks' records and the outcome.  Does not discard ``prepared``.
    """
    t0 = time.perf_counter()
    sym = prepared.symbol
    data_dir = config.output.data_dir
    store = PriceStore(data_dir)
    with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
        if file_identity(store.path_for(sym)) != prepared.fingerprint:
            log.info("%s: another run rewrote the stored prices meanwhile; starting over", sym)
            return None
        if not prepared.merge.file.pending():
            log.info("%s: the prepared price file is gone (its writer stopped); starting over", sym)
            return None
        merged = prepared.merge.commit()
    _log_quality(sym, prepared.quality)
    outcome = FetchOutcome(
        symbol=sym,
        source=prepared.source,
        rows_fetched=prepared.rows_fetched,
        rows_added=merged.rows_added,
        rows_changed=merged.rows_changed,
        rows_stored=merged.rows_after,
        first_date=prepared.first_date,
        last_date=prepared.last_date,
        seconds=round(prepared.seconds + time.perf_counter() - t0, 4),
        mode=prepared.mode,
        restated=prepared.restated is not None,
        restatement=prepared.restated,
        requested_start=prepared.requested[0].isoformat(),
        requested_end=prepared.requested[1].isoformat(),
        fetch_start=prepared.covers[0].isoformat(),
        fetch_end=prepared.covers[1].isoformat(),
        rows_removed=merged.rows_removed,
        dropped_rows=[i.to_dict() for i in prepared.quality.dropped],
        repaired_rows=[i.to_dict() for i in prepared.quality.repaired],
        quality_warnings=[i.to_dict() for i in prepared.quality.warnings],
    )
    log.info("%s", outcome.describe())
    return outcome


def failure_reason(symbol: str, exc: object) -> str:
    """A failed fetch's message as one line, without the leading ``SYMBOL: ``."""
    if isinstance(exc, BaseException):
        text = " ".join(str(exc).split()) or type(exc).__name__
    else:
        text = "the fetch did not complete"
    prefix = f"{symbol}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def fetch_batch(config: Config, symbols: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`fetch_symbol` for each symbol in turn; a failed symbol never stops the others.

    One entry per symbol, in order: ``{"symbol", "outcome"}`` (:meth:`FetchOutcome.to_dict`)
    or ``{"symbol", "error", "store_error", "locked"}``: the one-line reason
    (:func:`failure_reason`), and whether it was a store problem (another run holds the
    lock, a full disk, a damaged file), which the caller treats as fatal once every fetch
    has finished.
    """
    with one_sweep_per_folder():
        return [_fetch_entry(config, symbol) for symbol in symbols]


def _fetch_entry(config: Config, symbol: str, prepared: PreparedFetch | None = None) -> dict[str, Any]:
    """One entry of :func:`fetch_batch`: ``prepared`` committed, or where there is none or
    it cannot be (the stored file changed meanwhile), :func:`fetch_symbol`."""
    try:
        outcome = None
        if prepared is not None:
            try:
                outcome = commit_fetch(config, prepared)
            finally:
                prepared.discard()
        if outcome is None:
            outcome = fetch_symbol(config, symbol)
    except Exception as exc:  # recorded per symbol; the caller decides what stops the run
        return {
            "symbol": symbol,
            "error": failure_reason(symbol, exc),
            "store_error": isinstance(exc, StoreError),
            "locked": isinstance(exc, StoreLockedError),
        }
    return {"symbol": symbol, "outcome": outcome.to_dict()}


@contextlib.contextmanager
def _records_at(level: int) -> Iterator[list[logging.LogRecord]]:
    """The records the ``sensitivity`` loggers give at ``level`` or above meanwhile, made
    picklable (message formatted, no arguments, exception text only) and not passed on."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args, record.exc_info = record.getMessage(), None, None
            records.append(record)

    root = logging.getLogger("sensitivity")
    keep = _Keep(level)
    previous = (root.level, root.propagate)
    root.addHandler(keep)
    root.setLevel(level)
    root.propagate = False
    try:
        yield records
    finally:
        root.removeHandler(keep)
        root.setLevel(previous[0])
        root.propagate = previous[1]


def fetch_batch_logged(
    config: Config, symbols: Sequence[str], level: int
) -> tuple[list[dict[str, Any]], list[logging.LogRecord]]:
    """:func:`fetch_batch` and the records the ``sensitivity`` loggers gave at ``level`` or above.

    For a worker process (:class:`~sensitivity.process_pool.ProcessPool`): its records
    cannot reach the caller's handlers, so they travel back with the results, made
    picklable (message formatted, no arguments, exception text only), for the caller to
    hand to its own loggers (:func:`replay_records`).  The records are not passed on here.
    """
    with _records_at(level) as records:
        return fetch_batch(config, symbols), records


def prepare_batch_logged(
    config: Config, symbols: Sequence[str], level: int
) -> list[tuple[str, PreparedFetch | None, list[logging.LogRecord]]]:
    """:func:`prepare_fetch` of each symbol, for a worker process that prepares a batch ahead
    of the task that commits it (:mod:`sensitivity.head_start`): per symbol its prepared
    fetch, or None where preparing failed (the committing task then fetches it itself and
    gives the error), and the records it logged meanwhile (see :func:`fetch_batch_logged`).
    """
    out: list[tuple[str, PreparedFetch | None, list[logging.LogRecord]]] = []
    with _records_at(level) as records, one_sweep_per_folder():
        for symbol in symbols:
            first = len(records)
            try:
                prepared: PreparedFetch | None = prepare_fetch(config, symbol)
            except Exception:  # fetched again by the task, which reports the error
                prepared = None
            out.append((symbol, prepared, records[first:] if prepared is not None else []))
    return out


def commit_batch(
    config: Config, prepared: Sequence[tuple[str, PreparedFetch | None, Sequence[logging.LogRecord]]]
) -> list[dict[str, Any]]:
    """The entries of :func:`fetch_batch` for a batch :func:`prepare_batch_logged` prepared:
    each symbol's records replayed (:func:`replay_records`) and its fetch committed, or
    fetched here where it was not prepared or cannot be committed."""
    results = []
    with one_sweep_per_folder():
        for symbol, fetch, records in prepared:
            replay_records(records)
            results.append(_fetch_entry(config, symbol, fetch))
    return results


def replay_records(records: Sequence[logging.LogRecord]) -> None:
    """Hand records captured by :func:`fetch_batch_logged` to this process's loggers."""
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


#: The per-day rows a fit hands to the report, per combination (see :class:`FittedUniverse`).
History: TypeAlias = dict[SensitivityKey, pd.DataFrame | pa.Table | StoredRows]


@dataclass(frozen=True, eq=False)
class FittedUniverse:
    """What :func:`fit_universe_with_history` wrote: its outcome and the per-day rows.

    ``history`` holds the rows written to ``reports/sensitivity/`` in the columns the report
    draws from (:data:`sensitivity.report.SENSITIVITY_COLUMNS`), per combination (its key ->
    its rows by date, a DataFrame for a ticker fitted in full; for one a daily run extended,
    the Arrow table of the rows kept and added, or a :class:`~sensitivity.store.StoredRows`
    where its older row groups were copied as bytes, which reads them back from the file as
    this run read it when the report asks), as :func:`~sensitivity.report.render_report`
    takes them: what :func:`write_run_report` would otherwise read back from the store;
    None when they are more than :data:`HANDOVER_MAX_BYTES` (the report then reads them back).
    """

    outcome: FitOutcome
    history: History | None
    #: The report's charted sections started before the writes (``draft_report``), else None.
    draft: SectionDraft | None = None


#: The largest copy of the per-day rows (the report's columns, float64) that
#: :func:`fit_universe_with_history` keeps.  The copy is made while the whole table is still
#: in memory, so beyond this the fit would hold about one and a half tables at once (about
#: 11 GB at 3,000 tickers x 30 years, against 7 GB for the table); the report then reads
#: the rows back from the files instead, as it did before the handover.
HANDOVER_MAX_BYTES: int = 1 << 30


def fit_universe(config: Config, tickers: Sequence[str]) -> FitOutcome:
    """Fit every ticker in ``tickers`` against the index and write the sensitivity tables.

    Prices come from the store, limited to the configured date range.  Tickers without a
    single aligned return are reported in ``no_data`` (and not written).  With
    ``model.risk_free`` or ``model.risk_free_symbol`` the model is fitted on excess returns
    (:func:`_risk_free_returns`).  Writes the per-day table, the summary (with the ``fit``
    used) and the scenario table of the run's ``as_of`` (:func:`~sensitivity.scenarios.scenario_table`
    over ``model.scenarios``).  Raises :class:`~sensitivity.errors.ModelFitError` when the
    index (or the risk-free rate symbol) has no prices or no ticker has any return.
    """
    return _fit_universe(config, tickers).outcome


def fit_universe_with_history(
    config: Config, tickers: Sequence[str], *, draft_report: bool = False
) -> FittedUniverse:
    """:func:`fit_universe`, keeping the per-day rows it wrote for the report.

    The report of the same run then draws from these rows instead of reading the
    ``reports/sensitivity/`` files back (at 500 tickers x 20 years the read took 3 to 4 s), and
    it shows exactly what this run computed even if another run rewrote a file meanwhile.
    The rows are a copy of half the table's columns (about 0.4 GB at that size), kept only up
    to :data:`HANDOVER_MAX_BYTES`; above, ``history`` is None.  ``draft_report``: start the
    report's charted sections in its worker processes before writing (``draft``; see
    :func:`~sensitivity.report.draft_sections`), for a caller that renders the report next
    (:func:`write_run_report`) and closes the draft otherwise.
    """
    return _fit_universe(config, tickers, with_history=True, draft_report=draft_report)


def _fit_universe(
    config: Config, tickers: Sequence[str], *, with_history: bool = False, draft_report: bool = False
) -> FittedUniverse:
    """:func:`fit_universe`, and with ``with_history`` the per-day rows it wrote (report columns).

    With a rolling window, a ticker whose stored file was computed from the same inputs
    through its last date (:mod:`sensitivity.reuse`) keeps those rows: only its later days
    are fitted and appended (a daily run fits a day, not twenty years); every other ticker
    is fitted in full.  Either way every file holds what a fit of the whole range gives.
    """
    from sensitivity.api import HUBER_COLUMNS, quadratic_sensitivity
    from sensitivity.model import resolve_device
    from sensitivity.report import SENSITIVITY_COLUMNS, summary_table
    from sensitivity.scenarios import scenario_table

    t0 = time.perf_counter()
    u, m = config.universe, config.model
    data_dir = config.output.data_dir
    wanted = [u.index, *tickers]
    if m.risk_free_symbol is not None and m.risk_free_symbol not in wanted:
        wanted.append(m.risk_free_symbol)
    # Only the prices the returns are taken from (price_series): a quarter of each file, as
    # arrays (a pandas frame per symbol cost twice the read).
    arrays = PriceStore(data_dir).read_many_arrays(
        wanted, start=u.start, end=u.resolved_end, columns=("close", "adj_close")
    )
    index_arrays = arrays.get(u.index)
    if index_arrays is None or not len(index_arrays):
        raise ModelFitError(
            f"{u.index}: the index has no stored prices between {u.start} and {u.resolved_end} "
            "(check the index symbol and the dates)"
        )
    stock_arrays = {t: arrays[t] for t in tickers if t in arrays and len(arrays[t])}
    no_data = {
        t: f"no stored prices between {u.start} and {u.resolved_end}"
        for t in tickers
        if t not in stock_arrays
    }
    if not stock_arrays:
        raise ModelFitError(
            f"no ticker has prices between {u.start} and {u.resolved_end} "
            f"(tickers: {', '.join(tickers)}); check the symbols and the dates"
        )
    aligned = aligned_returns_from_arrays(index_arrays, stock_arrays, index_symbol=u.index)
    inputs = FitInputs(
        aligned,
        _risk_free_returns(config, aligned, arrays),
        FitInputs.settings_of(
            index=u.index,
            window=m.window,
            min_obs=m.min_obs,
            se=m.se,
            hac_lags=m.hac_lags,
            fit=m.fit,
            device=resolve_device(config.runtime.device).type,
        ),
    )
    reports = ReportStore(data_dir)
    kept = (
        reusable_rows(
            reports,
            inputs,
            index=u.index,
            window=m.window,
            tickers=aligned.tickers,
            cleared=HUBER_COLUMNS if m.fit == "ols" else (),
        )
        if m.window > 0
        else {}
    )
    growing = _growing(inputs, kept)

    def fit(names: list[str], from_date: dt.date | None = None) -> tuple[pd.DataFrame, _Runs]:
        every = len(names) == len(aligned.tickers)
        rf = inputs.risk_free
        result = quadratic_sensitivity(
            aligned.stock_returns if every else aligned.stock_returns[names],
            aligned.index_returns if every else aligned.index_returns[names],
            window=m.window,
            min_obs=m.min_obs,
            se=m.se,
            hac_lags=m.hac_lags,
            fit=m.fit,
            risk_free=rf if rf is None or every else rf[names],
            device=config.runtime.device,
            from_date=from_date,
        )
        runs = _Runs.of(result)
        return _with_prices(result, aligned.close, aligned.prev_close, u.index, runs), runs

    full = [t for t in aligned.tickers if t not in kept]
    table, runs = fit(full) if full else (None, None)
    added = (
        _after(fit(list(growing), min(growing.values()))[0], {t: kept[t].through for t in growing})
        if growing
        else None
    )
    extended = _extended(kept, added, clear_huber=m.fit == "ols")
    rows = _Rows.of(table, runs, extended, kept)
    for t in stock_arrays:
        if t not in rows.total:
            no_data[t] = (
                f"no date between {u.start} and {u.resolved_end} on which both it and "
                f"{u.index} traded twice in a row (no aligned return)"
            )
    # no_data names only tickers without a row (no stored prices, or none aligned): nothing to drop.
    if not rows.total:
        raise ModelFitError(
            f"no ticker has an aligned return against {u.index} between {u.start} and "
            f"{u.resolved_end}; check the symbols and the dates"
        )
    summary = summary_table(rows.latest)
    summary["fit"] = m.fit
    scenarios = scenario_table(summary, m.scenarios, fit=m.fit)
    last_dates = {t: d for t, d in rows.last.items() if t in full or t in growing}
    stamps = {(u.index, t, m.window): s for t, s in inputs.stamps(last_dates).items()} if m.window > 0 else {}
    order = [t for t in aligned.tickers if t in rows.total]
    history = None
    if with_history and sum(rows.total.values()) * len(SENSITIVITY_COLUMNS) * 8 <= HANDOVER_MAX_BYTES:
        stored = {t: k.stored.rows_from(extended[t], SENSITIVITY_COLUMNS) for t, k in kept.items()}
        history = _history(table, runs, stored, (u.index, m.window), order, list(SENSITIVITY_COLUMNS))
    # The report's charted sections start in its worker processes now, from what this run is
    # about to write: the writes below leave a core half idle (their Python holds the GIL).
    draft = _draft_report(config, history, summary, scenarios) if draft_report and history else None
    try:
        with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
            if table is not None and len(table):
                reports.write_sensitivity(table, stamps=stamps)
            if growing:
                reports.write_sensitivity_tables(
                    {(u.index, t, m.window): extended[t] for t in growing},
                    stamps=stamps,
                    kept={(u.index, t, m.window): kept[t].stored for t in growing},
                )
            reports.write_summary(summary)
            reports.write_scenarios(scenarios)
    except BaseException:
        if draft is not None:
            draft.close()
        raise
    outcome = FitOutcome(
        as_of=rows.as_of.isoformat(),
        index=u.index,
        window=m.window,
        rows=sum(rows.total.values()),
        rows_by_ticker={t: rows.total[t] for t in order},
        fitted_by_ticker={t: rows.fitted[t] for t in order},
        first_date=rows.first_date.isoformat(),
        last_date=rows.as_of.isoformat(),
        no_data=no_data,
        seconds=round(time.perf_counter() - t0, 4),
    )
    progress.emit(progress.ProgressEvent("fit", detail=f"{outcome.rows} rows"))
    log.info(
        "fit %d ticker(s) in full; kept the stored rows of %d, %d of them with new days",
        len(full),
        len(kept),
        len(growing),
    )
    return FittedUniverse(outcome, history, draft)


def _draft_report(
    config: Config, history: History, summary: pd.DataFrame, scenarios: pd.DataFrame
) -> SectionDraft | None:
    """The report's charted sections, started from what the fit is about to write (the
    summary and scenarios as the store will read them back; :func:`write_run_report` passes
    the draft to :func:`~sensitivity.report.render_report`, which checks each section is the
    one it would draw).  None where it has no worker or cannot start: the report then draws
    everything itself."""
    from sensitivity.report import draft_sections

    try:
        return draft_sections(
            history,
            as_read_back(summary, "summary"),
            {"config": config.to_dict()},  # the manifest's part the sections use
            scenarios=as_read_back(scenarios, "scenarios"),
        )
    except Exception as exc:  # the report itself will say what is wrong with its inputs
        log.debug("no report draft: %s", exc)
        return None


def _growing(inputs: FitInputs, kept: Mapping[str, Kept]) -> dict[str, dt.date]:
    """Kept tickers with a return after their stored rows: the first calendar date after them."""
    calendar = inputs.aligned.calendar
    return {t: calendar[k.row + 1].date() for t, k in kept.items() if k.grows}


def _after(frame: pd.DataFrame, through: Mapping[str, dt.date]) -> pd.DataFrame:
    """The rows of ``frame`` dated after their ticker's ``through`` date."""
    limit = frame["ticker"].map({t: pd.Timestamp(d) for t, d in through.items()})
    return frame.loc[(pd.to_datetime(frame["date"]) > limit).to_numpy()].reset_index(drop=True)


def _extended(
    kept: Mapping[str, Kept], added: pd.DataFrame | None, *, clear_huber: bool
) -> dict[str, pa.Table]:
    """Each kept ticker's rows as read (its file's from row ``stored.skipped`` on), then the
    rows ``added`` for it: the rows its file gets from there on.

    ``clear_huber``: with ``fit = "ols"`` only a ticker's latest row has a Huber fit, so the
    stored rows of a ticker that gained rows lose theirs (as a fit of the whole range gives).
    """
    from sensitivity.api import HUBER_COLUMNS

    new: dict[str, pa.Table] = {}
    if added is not None and len(added):
        table = table_from_frame(added, SENSITIVITY_SCHEMA, "sensitivity table")
        codes, names = _ticker_codes(added)
        bounds = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1], True])
        for lo, hi in itertools.pairwise(bounds.tolist()):
            new[names[int(codes[lo])]] = table.slice(int(lo), int(hi - lo))
    out: dict[str, pa.Table] = {}
    for t, k in kept.items():
        if t not in new:
            out[t] = k.table
            continue
        old = k.table
        if clear_huber:
            for name in HUBER_COLUMNS:
                old = _cleared(old, name)
        out[t] = pa.concat_tables([old, new[t].replace_schema_metadata(old.schema.metadata)])
    return out


def _cleared(table: pa.Table, name: str) -> pa.Table:
    """``table`` with the column ``name`` all null.  A stored ticker's Huber columns are null
    but on its last row: those rows are kept as they are (no copy), the last one replaced."""
    i = table.schema.get_field_index(name)
    column = table.column(i)
    n = table.num_rows
    head = column.slice(0, n - 1)
    chunks = [*head.chunks] if head.null_count == n - 1 else [pa.nulls(n - 1, column.type)]
    cleared = pa.chunked_array([*chunks, pa.nulls(1, column.type)], type=column.type)
    return table.set_column(i, table.schema.field(i), cleared)


@dataclass(frozen=True)
class _Rows:
    """Counts and dates of a fit's rows per ticker (computed and kept together), and each
    ticker's latest row (the summary's input)."""

    total: dict[str, int]
    fitted: dict[str, int]
    last: dict[str, dt.date]
    first_date: dt.date
    as_of: dt.date
    latest: pd.DataFrame

    @classmethod
    def of(
        cls,
        table: pd.DataFrame | None,
        runs: _Runs | None,
        extended: Mapping[str, pa.Table],
        kept: Mapping[str, Kept],
    ) -> _Rows:
        """Of the rows fitted in full (``table``, its :class:`_Runs`) and the kept tickers'
        (``extended``: their rows from ``kept[t].stored.skipped`` on)."""
        total: dict[str, int] = {}
        fitted: dict[str, int] = {}
        last: dict[str, dt.date] = {}
        firsts: list[dt.date] = []
        latest: list[pd.DataFrame] = []
        if table is not None and runs is not None and len(table):
            codes, names, dates = runs.codes, runs.names, runs.dates
            has_value = table["sensitivity"].notna().to_numpy()
            total.update(zip(names, np.bincount(codes, minlength=len(names)).tolist(), strict=True))
            fitted.update(
                zip(names, np.bincount(codes[has_value], minlength=len(names)).tolist(), strict=True)
            )
            latest.append(table.iloc[runs.ends] if runs.ends is not None else table)
            last.update(zip(names, (d.date() for d in dates.iloc[_last_positions(codes)]), strict=True))
            firsts.append(dates.min().date())
        if extended:
            ends = [t.slice(t.num_rows - 1) for t in extended.values()]
            latest.append(pa.concat_tables(ends).to_pandas(date_as_object=False))
            for t, tab in extended.items():
                stored = kept[t].stored
                total[t] = stored.skipped + tab.num_rows
                fitted[t] = stored.skipped_fitted + tab.num_rows - tab.column("sensitivity").null_count
                last[t] = tab.column("date")[-1].as_py()
                firsts.append(stored.first_date or tab.column("date")[0].as_py())
        frame = pd.concat(latest, ignore_index=True) if len(latest) > 1 else (latest or [pd.DataFrame()])[0]
        as_of = max(last.values()) if last else dt.date.min
        return cls(total, fitted, last, min(firsts) if firsts else dt.date.min, as_of, frame)


def _last_positions(codes: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """The position of each code's last row (codes ``0 .. k-1``)."""
    n = int(codes.max()) + 1 if len(codes) else 0
    last = np.full(n, -1, dtype=np.intp)
    last[codes] = np.arange(len(codes), dtype=np.intp)  # later positions overwrite earlier ones
    return last


@dataclass(frozen=True, eq=False)
class _Runs:
    """A fitted table's rows by ticker, worked out once for the price lookup, the counts, the
    summary and the report's hand-over: each row's ticker code (:func:`_ticker_codes`) and
    date, and each ticker's last position when the rows run ticker by ticker, each by date
    (:func:`_run_ends`; None otherwise).  At 2.5 million rows each of these took 0.03 to 0.1 s."""

    codes: npt.NDArray[np.intp]
    names: list[str]
    dates: pd.Series
    ends: npt.NDArray[np.intp] | None

    @classmethod
    def of(cls, table: pd.DataFrame) -> _Runs:
        codes, names = _ticker_codes(table)
        dates = pd.to_datetime(table["date"])
        return cls(codes, names, dates, _run_ends(codes, dates))


def _run_ends(codes: npt.NDArray[np.intp], dates: pd.Series) -> npt.NDArray[np.intp] | None:
    """Positions of each ticker's latest row when the rows run ticker by ticker, each by date
    (as the fit writes them); None otherwise (then the summary groups every row).

    A ticker's latest row then ends its run: the summary of those rows alone is the table's,
    without grouping and sorting 2.5 million rows (0.25 s at 500 tickers x 20 years).
    """
    ends = np.r_[codes[1:] != codes[:-1], True] if len(codes) else np.zeros(0, dtype=bool)
    days = dates.to_numpy(dtype="datetime64[ns]")
    # One run per ticker: as many runs as distinct codes, which are the runs' own codes.
    runs_in_order = int(ends.sum()) == len(np.unique(codes[ends])) and bool(
        np.all((days[1:] > days[:-1]) | ends[:-1])
    )
    return np.flatnonzero(ends) if runs_in_order else None


def _history(
    table: pd.DataFrame | None,
    runs: _Runs | None,
    stored: Mapping[str, StoredRows | pa.Table],
    combo: tuple[str, int],
    order: Sequence[str],
    columns: list[str],
) -> History:
    """The report's columns of every row written or kept, per combination, in ``order``.

    The rows of tickers fitted in full are slices of one copy of those columns (the fit
    writes them ticker by ticker, each by date; otherwise they are grouped); a kept ticker's
    are its rows as read and added (an Arrow table), or, where the rows before them were
    kept as bytes, its :class:`~sensitivity.store.StoredRows`, which reads those back only
    for what the report draws.  Nothing is converted to pandas here: the report converts
    only the combinations it charts.
    """
    index, window = combo
    parts: dict[str, pd.DataFrame | pa.Table | StoredRows] = {}
    if table is not None and runs is not None and len(table):
        rows = table[columns]
        if runs.ends is not None:
            starts = np.r_[0, runs.ends[:-1] + 1]
            for lo, hi in zip(starts.tolist(), (runs.ends + 1).tolist(), strict=True):
                parts[runs.names[int(runs.codes[lo])]] = rows.iloc[lo:hi]
        else:
            for name, group in rows.groupby("ticker", sort=False):
                parts[str(name)] = group.sort_values("date", kind="stable")
    parts.update(stored)
    return {(index, t, window): parts[t] for t in order if t in parts}


def _risk_free_returns(
    config: Config, aligned: AlignedReturns, arrays: Mapping[str, PriceArrays]
) -> pd.DataFrame | None:
    """Each aligned return's risk-free return (``[dates, tickers]``), or None for raw returns.

    ``model.risk_free``: a constant annual rate; ``model.risk_free_symbol``: the stored rate
    series of that symbol (its adjusted close, else close, in percent per year), taken on
    the same date as each return.  A date without a rate has no excess return: it is dropped
    from the fits and the table (never filled).
    """
    m = config.model
    if m.risk_free_symbol is None:
        if m.risk_free == 0.0:
            return None
        daily = daily_risk_free(m.risk_free, aligned.calendar)
    else:
        u = config.universe
        rate_arrays = arrays.get(m.risk_free_symbol)
        if rate_arrays is None or not len(rate_arrays):
            raise ModelFitError(
                f"{m.risk_free_symbol}: the risk-free rate has no stored prices between {u.start} "
                f"and {u.resolved_end} (check model.risk_free_symbol and the dates)"
            )
        rates = price_series(rate_arrays.frame(), symbol=m.risk_free_symbol)
        daily = daily_risk_free(rates.dropna(), aligned.calendar)
    return period_risk_free(aligned, daily)


def _ticker_codes(table: pd.DataFrame) -> tuple[npt.NDArray[np.intp], list[str]]:
    """Each row's ticker as a code into the tickers in order of appearance: what the counts
    per ticker and the price lookup work on (grouping 2.4 million strings took 0.2 s a time)."""
    codes, names = pd.factorize(table["ticker"], sort=False)
    return np.asarray(codes, dtype=np.intp), [str(n) for n in names]


def _with_prices(
    result: pd.DataFrame,
    close: pd.DataFrame,
    prev_close: pd.DataFrame,
    index_symbol: str,
    runs: _Runs | None = None,
) -> pd.DataFrame:
    """Add ``index_ticker``, ``close``, ``prev_close`` and ``dollar_sensitivity`` to the fit
    (in place); ``runs``: its :class:`_Runs`, when the caller has them."""
    runs = runs if runs is not None else _Runs.of(result)
    codes, names = runs.codes, runs.names
    dates = pd.DatetimeIndex(runs.dates)
    rows = close.index.get_indexer(dates)
    cols = close.columns.get_indexer(pd.Index(names, dtype=object))[codes] if names else codes
    if (rows < 0).any() or (cols < 0).any():  # pragma: no cover - returns and prices share labels
        raise ModelFitError("internal error: fitted rows do not line up with the price panel")
    out = result  # the fit's own fresh frame: extended in place (a copy of ~1 GB costs seconds)
    out.insert(1, "index_ticker", index_symbol)
    out["close"] = close.to_numpy(dtype=np.float64)[rows, cols]
    out["prev_close"] = prev_close.to_numpy(dtype=np.float64)[rows, cols]
    out["dollar_sensitivity"] = 0.01 * out["sensitivity"].to_numpy() * out["prev_close"].to_numpy()
    return out


def write_run_report(
    config: Config,
    fit: FitOutcome,
    fetches: Sequence[FetchOutcome],
    failures: Mapping[str, str],
    *,
    started_at: dt.datetime,
    run_id: str | None = None,
    history: Mapping[SensitivityKey, pd.DataFrame | pa.Table] | None = None,
    draft: SectionDraft | None = None,
) -> dict[str, str]:
    """Render the HTML report and the manifest of this run for ``fit.as_of``; return their paths.

    ``history``: the per-day rows the fit wrote (:attr:`FittedUniverse.history`); without it
    they are read back from ``reports/sensitivity/``.  ``draft``: the sections the fit started
    (:attr:`FittedUniverse.draft`), taken over where they are this page's, closed otherwise.
    The page is the same either way.
    """
    from sensitivity.report import SENSITIVITY_COLUMNS, render_report

    data_dir = config.output.data_dir
    reports = ReportStore(data_dir)
    table: pd.DataFrame | Mapping[SensitivityKey, pd.DataFrame | pa.Table]
    try:
        if history is not None:
            table = history
        else:
            table = reports.read_sensitivity(
                index_ticker=config.universe.index,
                window=config.model.window,
                tickers=list(fit.rows_by_ticker),
                columns=SENSITIVITY_COLUMNS,  # what the report reads: half the table's columns
            )
        summary = reports.read_summary(as_of=dt.date.fromisoformat(fit.as_of))
        summary = summary[
            (summary["index_ticker"] == config.universe.index)
            & (summary["window"] == config.model.window)
            & (summary["ticker"].isin(list(fit.rows_by_ticker)))
        ]
        scenarios = reports.read_scenarios(as_of=dt.date.fromisoformat(fit.as_of))
        manifest = build_manifest(config, fit, fetches, failures, started_at=started_at, run_id=run_id)
        html = render_report(table, summary, manifest, scenarios=scenarios, draft=draft)
    except BaseException:
        if draft is not None:
            draft.close()  # (a no-op once the page took it over)
        raise
    with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
        html_path, manifest_path = reports.write_report(dt.date.fromisoformat(fit.as_of), html, manifest)
    progress.emit(progress.ProgressEvent("report", detail=str(html_path)))
    return {
        "report": str(html_path),
        "manifest": str(manifest_path),
        "sensitivity": str(Path(data_dir) / "reports" / "sensitivity"),
        "summary": str(Path(data_dir) / "reports" / "summary"),
        "scenarios": str(Path(data_dir) / "reports" / "scenarios"),
    }


def build_manifest(
    config: Config,
    fit: FitOutcome,
    fetches: Sequence[FetchOutcome],
    failures: Mapping[str, str],
    *,
    started_at: dt.datetime,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The machine-readable record of a run (see docs/schema.md, "Manifest")."""
    return {
        "as_of": fit.as_of,
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "config": config.to_dict(),
        "source": {"kind": config.source.kind, "names": sorted({f.source for f in fetches})},
        "requested_range": {
            "start": config.universe.start.isoformat(),
            "end": config.universe.resolved_end.isoformat(),
        },
        "data_range": {"first": fit.first_date, "last": fit.last_date},
        "rows": {
            "total": fit.rows,
            "by_ticker": fit.rows_by_ticker,
            "fitted_by_ticker": fit.fitted_by_ticker,
        },
        "fetches": [f.to_dict() for f in fetches],
        "failures": dict(sorted(failures.items())),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _iso(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return None
    return pd.Timestamp(value).date().isoformat()  # type: ignore[arg-type]


__all__ = [
    "HANDOVER_MAX_BYTES",
    "FetchOutcome",
    "FetchPlan",
    "FitOutcome",
    "FittedUniverse",
    "History",
    "build_manifest",
    "fetch_symbol",
    "fit_universe",
    "fit_universe_with_history",
    "plan_fetch",
    "refetch_range",
    "restatement",
    "versions",
    "write_run_report",
]
