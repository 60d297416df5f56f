"""The pipeline's steps, free of any orchestrator.

Each step takes the validated :class:`~sensitivity.config.Config` and small values (symbols,
dates), reads and writes through the store, and returns a small, JSON-friendly outcome.
``flows/pipeline.py`` wires these steps as Prefect tasks; tests call them directly.

    fetch_symbol      source -> price store (one symbol)
    fit_universe      price store -> returns -> model -> sensitivity + summary tables
    write_run_report  tables -> HTML report + manifest
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sensitivity import progress
from sensitivity.config import Config
from sensitivity.errors import ModelFitError
from sensitivity.returns import aligned_returns
from sensitivity.sources.base import PriceSource, make_source
from sensitivity.store import PriceStore, ReportStore, store_lock

_VERSIONED = ("stock-sensitivity", "torch", "numpy", "pandas", "pyarrow", "prefect", "yfinance", "pydantic")


@dataclass(frozen=True)
class FetchOutcome:
    """What fetching one symbol did to the store."""

    symbol: str
    source: str
    rows_fetched: int
    rows_added: int
    rows_changed: int
    rows_stored: int
    first_date: str | None
    last_date: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def fetch_symbol(config: Config, symbol: str, *, source: PriceSource | None = None) -> FetchOutcome:
    """Fetch ``symbol`` for the configured range and merge it into the price store.

    Raises the source's :class:`~sensitivity.errors.SourceError` on failure; the store is
    then left exactly as it was.
    """
    t0 = time.perf_counter()
    src = source if source is not None else make_source(config.source)
    u = config.universe
    frame = src.fetch(symbol, u.start, u.resolved_end)
    data_dir = config.output.data_dir
    with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
        merged = PriceStore(data_dir).merge(symbol, frame, source=src.name)
    outcome = FetchOutcome(
        symbol=symbol,
        source=src.name,
        rows_fetched=len(frame),
        rows_added=merged.rows_added,
        rows_changed=merged.rows_changed,
        rows_stored=merged.rows_after,
        first_date=_iso(frame.index.min()),
        last_date=_iso(frame.index.max()),
        seconds=round(time.perf_counter() - t0, 4),
    )
    return outcome


def fit_universe(config: Config, tickers: Sequence[str]) -> FitOutcome:
    """Fit every ticker in ``tickers`` against the index and write the sensitivity tables.

    Prices come from the store, limited to the configured date range.  Tickers without a
    single aligned return are reported in ``no_data`` (and not written).  Raises
    :class:`~sensitivity.errors.ModelFitError` when the index has no prices or no ticker
    has any return.
    """
    from sensitivity.api import quadratic_sensitivity
    from sensitivity.report import summary_table

    t0 = time.perf_counter()
    u, m = config.universe, config.model
    data_dir = config.output.data_dir
    frames = PriceStore(data_dir).read_many([u.index, *tickers], start=u.start, end=u.resolved_end)
    index_frame = frames.get(u.index)
    if index_frame is None or index_frame.empty:
        raise ModelFitError(
            f"{u.index}: the index has no stored prices between {u.start} and {u.resolved_end} "
            "(check the index symbol and the dates)"
        )
    stock_frames = {t: frames[t] for t in tickers if t in frames and not frames[t].empty}
    no_data = {
        t: f"no stored prices between {u.start} and {u.resolved_end}"
        for t in tickers
        if t not in stock_frames
    }
    if not stock_frames:
        raise ModelFitError(
            f"no ticker has prices between {u.start} and {u.resolved_end} "
            f"(tickers: {', '.join(tickers)}); check the symbols and the dates"
        )
    aligned = aligned_returns(index_frame, stock_frames)
    result = quadratic_sensitivity(
        aligned.stock_returns, aligned.index_returns, window=m.window, min_obs=m.min_obs
    )
    table = _with_prices(result, aligned.close, aligned.prev_close, u.index)
    rows_by_ticker = table.groupby("ticker", sort=False).size().to_dict()
    for t in stock_frames:
        if t not in rows_by_ticker:
            no_data[t] = (
                f"no date between {u.start} and {u.resolved_end} on which both it and "
                f"{u.index} traded twice in a row (no aligned return)"
            )
    table = table[~table["ticker"].isin(list(no_data))]
    if table.empty:
        raise ModelFitError(
            f"no ticker has an aligned return against {u.index} between {u.start} and "
            f"{u.resolved_end}; check the symbols and the dates"
        )
    fitted = table.dropna(subset=["sensitivity"]).groupby("ticker", sort=False).size().to_dict()
    summary = summary_table(table)
    reports = ReportStore(data_dir)
    with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
        reports.write_sensitivity(table)
        reports.write_summary(summary)
    dates = pd.to_datetime(table["date"])
    outcome = FitOutcome(
        as_of=_iso(dates.max()) or "",
        index=u.index,
        window=m.window,
        rows=len(table),
        rows_by_ticker={str(k): int(v) for k, v in rows_by_ticker.items() if k not in no_data},
        fitted_by_ticker={str(k): int(fitted.get(k, 0)) for k in rows_by_ticker if k not in no_data},
        first_date=_iso(dates.min()) or "",
        last_date=_iso(dates.max()) or "",
        no_data=no_data,
        seconds=round(time.perf_counter() - t0, 4),
    )
    progress.emit(progress.ProgressEvent("fit", detail=f"{outcome.rows} rows"))
    return outcome


def _with_prices(
    result: pd.DataFrame, close: pd.DataFrame, prev_close: pd.DataFrame, index_symbol: str
) -> pd.DataFrame:
    """Add ``index_ticker``, ``close``, ``prev_close`` and ``dollar_sensitivity`` to the fit."""
    dates = pd.DatetimeIndex(pd.to_datetime(result["date"]))
    rows = close.index.get_indexer(dates)
    cols = close.columns.get_indexer(pd.Index(result["ticker"]))
    if (rows < 0).any() or (cols < 0).any():  # pragma: no cover - returns and prices share labels
        raise ModelFitError("internal error: fitted rows do not line up with the price panel")
    out = result.copy()
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
) -> dict[str, str]:
    """Render the HTML report and the manifest of this run for ``fit.as_of``; return their paths."""
    from sensitivity.report import render_report

    data_dir = config.output.data_dir
    reports = ReportStore(data_dir)
    table = reports.read_sensitivity(
        index_ticker=config.universe.index, window=config.model.window, tickers=list(fit.rows_by_ticker)
    )
    summary = reports.read_summary(as_of=dt.date.fromisoformat(fit.as_of))
    summary = summary[
        (summary["index_ticker"] == config.universe.index)
        & (summary["window"] == config.model.window)
        & (summary["ticker"].isin(list(fit.rows_by_ticker)))
    ]
    manifest = build_manifest(config, fit, fetches, failures, started_at=started_at, run_id=run_id)
    html = render_report(table, summary, manifest)
    with store_lock(data_dir, timeout_s=config.runtime.lock_timeout_s):
        html_path, manifest_path = reports.write_report(dt.date.fromisoformat(fit.as_of), html, manifest)
    progress.emit(progress.ProgressEvent("report", detail=str(html_path)))
    return {
        "report": str(html_path),
        "manifest": str(manifest_path),
        "sensitivity": str(Path(data_dir) / "reports" / "sensitivity"),
        "summary": str(Path(data_dir) / "reports" / "summary"),
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
    "FetchOutcome",
    "FitOutcome",
    "build_manifest",
    "fetch_symbol",
    "fit_universe",
    "versions",
    "write_run_report",
]
