"""The Prefect flow ``stock-sensitivity``: thin wiring of :mod:`sensitivity.pipeline`.

Tasks hand each other symbols, dates and small dicts; the Parquet store is the hand-off.
Only the fetch task retries, and only on errors a retry can fix (network, rate limits).

Entry point (for ``prefect.yaml``, ``sensitivity run`` and ``sensitivity serve``):
``flows/pipeline.py:stock_sensitivity``.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import cloudpickle
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE as NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff
from prefect.utilities.annotations import quote, unmapped

from sensitivity import head_start, progress
from sensitivity.config import Config, load_config
from sensitivity.errors import (
    PartialRunError,
    SensitivityError,
    SourceError,
    StoreError,
    StoreLockedError,
)
from sensitivity.memory import use_jemalloc
from sensitivity.pipeline import (
    FetchOutcome,
    History,
    commit_batch,
    failure_reason,
    fetch_batch,
    fetch_symbol,
    fit_universe_with_history,
    replay_records,
    write_run_report,
)
from sensitivity.plan import FETCH_WORKER, SECTION_WORKER, fetch_batches, fetch_processes
from sensitivity.preload import engine_process, import_steps_in_background
from sensitivity.process_pool import ProcessPool, warm

if TYPE_CHECKING:  # (matplotlib is imported in the background while the fetch runs)
    from sensitivity.report import SectionDraft

DEFAULT_CONFIG = "config/default.toml"

# Prefect loads this file by path, under a module name Dask workers cannot import: ship the
# task functions by value (they call into the importable ``sensitivity`` package).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def heartbeats_without_join() -> bool:
    """Let a flow run end without waiting for its heartbeat thread; True once installed.

    Prefect (3.x, ``prefect.flow_engine._send_heartbeats``) emits a sync flow run's
    heartbeats from a daemon thread that sleeps in steps of one second, and joins it when
    the run ends: each run then idled until the step in progress was over, up to a second
    (half a second on average) after its last task, with both cores free.  The thread stops
    on its own at its next step once told to, and Prefect's async engine does not join it
    (``join_on_exit=False``); sync runs of this flow now do the same.  The heartbeats
    themselves are unchanged (zombie detection still sees them).  Installed when this module
    is imported, in the command's process and in a deployment's flow-run process alike; a
    Prefect without that function or that parameter is left as it is.
    """
    import contextlib
    import inspect

    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None or hasattr(original, "prefects"):  # absent, or installed already
        return original is not None
    try:
        if "join_on_exit" not in inspect.signature(original).parameters:
            return False
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        return False

    @contextlib.contextmanager
    def unjoined(engine: Any, join_on_exit: bool = True) -> Any:
        with original(engine, join_on_exit=False):
            yield

    unjoined.prefects = original  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = unjoined
    return True


heartbeats_without_join()

if engine_process():
    # A process Prefect started for one flow run (a deployment's): the workers' zygote imports
    # pandas, pyarrow and matplotlib now, while Prefect sets the run up, instead of when the
    # fetch and the report start their workers (sensitivity.process_pool.warm).
    warm(FETCH_WORKER, SECTION_WORKER)


def _retry_if_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry network errors, timeouts, server errors and rate limits (HTTP 429); never a symbol
    that does not exist, a range without prices, bad data or a store problem."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, SourceError):
        return exc.retryable
    if isinstance(exc, SensitivityError):  # bad data, the store: trying again cannot help
        return False
    return isinstance(exc, OSError | TimeoutError)


@task(
    name="fetch-prices",
    task_run_name="fetch-{symbol}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_if_transient,
    cache_policy=NO_CACHE,
)
def fetch_prices(config: Config, symbol: str) -> list[dict[str, Any]]:
    """Fetch one symbol into the price store (only what is new, unless the history was restated).

    Retries and their delays come from ``[source]`` (``retries``, ``retry_delay_s``, with
    exponential backoff and jitter; see :func:`fetch_options`).  A failure raises (that is
    what Prefect retries); success gives the one entry a batch would
    (``[{"symbol", "outcome"}]``), so that :func:`fetch_universe` reads both alike.
    """
    outcome = fetch_symbol(config, symbol)
    _log_outcome(get_run_logger(), outcome)
    return [{"symbol": symbol, "outcome": outcome.to_dict()}]


def _log_outcome(logger: Any, outcome: FetchOutcome, lines: list[str] | None = None) -> None:
    """One fetch's line and its quality records in the task's log; with ``lines`` the line is
    appended there instead (a batch logs its symbols' lines as one record)."""
    if lines is None:
        logger.info("%s", outcome.describe())
    else:
        lines.append(outcome.describe())
    if outcome.restated:
        logger.warning(
            "%s: the source restated its history (%s); refetched %s to %s and replaced the stored history",
            outcome.symbol,
            outcome.restatement,
            outcome.fetch_start,
            outcome.fetch_end,
        )
    for row in outcome.dropped_rows:
        logger.warning("%s: dropped the row of %s: %s", outcome.symbol, row["date"], row["reason"])
    for row in outcome.repaired_rows:
        logger.info("%s: %s: %s", outcome.symbol, row["date"], row["reason"])
    for row in outcome.quality_warnings:
        logger.warning("%s: %s: %s", outcome.symbol, row["date"], row["reason"])


@task(name="fetch-price-batch", task_run_name="fetch-{symbols[0]}-and-more", cache_policy=NO_CACHE)
def fetch_price_batch(
    config: Config, symbols: list[str], workers: ProcessPool | None = None
) -> list[dict[str, Any]]:
    """Fetch several symbols from a local source (``files``, ``sample``) into the price store.

    One task per symbol costs Prefect's bookkeeping (a task run, its states, its logs) on
    every symbol, more than reading a local file; a batch pays it once.  With ``workers``
    the batch runs in one of those worker processes (reading, checking and merging files is
    Python work that holds the GIL: threads of one process take turns at it) and this task's
    thread only waits; the worker's log records are replayed here.  A failed symbol never
    stops the others (entries as :func:`sensitivity.pipeline.fetch_batch` returns them; a
    store problem stops the run once every fetch has finished).  Local sources are not
    retried: a missing file or bad data stays so on a second read.
    """
    logger = get_run_logger()
    prepared = head_start.take(config, symbols)
    if prepared is not None:  # prepared while the run started (sensitivity.head_start)
        results = commit_batch(config, prepared)
    elif workers is None:
        results = fetch_batch(config, symbols)
    else:
        level = logging.getLogger("sensitivity").getEffectiveLevel()
        results, records = workers.call(_fetch_batch_here, config, symbols, level)
        replay_records(records)
    # One record for the batch's lines: each record is shipped to Prefect's API and stored by
    # its server, and 500 of them cost more CPU than the fetches' merges of a few days.
    lines: list[str] = []
    for entry in results:
        if "outcome" in entry:
            _log_outcome(logger, FetchOutcome(**entry["outcome"]), lines)
        else:
            logger.error("%s: %s", entry["symbol"], entry["error"])
    if lines:
        logger.info("%d symbol(s) fetched:\n%s", len(lines), "\n".join(lines))
    return results


def _fetch_batch_here(
    config: Config, symbols: list[str], level: int
) -> tuple[list[dict[str, Any]], list[logging.LogRecord]]:
    """What a worker process runs (``fetch_batch_logged``), run in this thread instead when
    no worker can: its records went to this process's loggers already."""
    return fetch_batch(config, symbols), []


def fetch_options(config: Config) -> dict[str, Any]:
    """The fetch task's retry options from ``[source]``: ``retries`` attempts more, waiting about
    ``retry_delay_s * 2**(n-1)`` seconds before retry n (randomised by Prefect's jitter, at most
    1.5 times that)."""
    return {
        "retries": config.source.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=config.source.retry_delay_s),
        "retry_jitter_factor": 0.5,
    }


@task(name="fit-sensitivity", cache_policy=NO_CACHE, persist_result=False)
def fit_sensitivity(
    config: Config, tickers: list[str]
) -> tuple[dict[str, Any], History | None, SectionDraft | None]:
    """One batched fit of every ticker; writes the sensitivity and summary tables.

    Returns the outcome, the per-day rows written, in the report's columns and per
    combination, which the report task draws from instead of reading them back (never
    persisted: they stay in the flow's memory; None above ``pipeline.HANDOVER_MAX_BYTES``),
    and the report's charted sections its workers started drawing while the fit wrote
    (``pipeline.fit_universe_with_history(draft_report=True)``; None without workers).
    """
    fitted = fit_universe_with_history(config, tickers, draft_report=True)
    return fitted.outcome.to_dict(), fitted.history, fitted.draft


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(
    config: Config,
    fit: dict[str, Any],
    fetches: list[dict[str, Any]],
    failures: dict[str, str],
    started_at: dt.datetime,
    history: History | None = None,
    draft: SectionDraft | None = None,
) -> dict[str, str]:
    """Render the HTML report and the manifest (from ``history``, the fit's rows, when given;
    ``draft``: the sections the fit started)."""
    from sensitivity.pipeline import FitOutcome

    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    return write_run_report(
        config,
        FitOutcome(**fit),
        [FetchOutcome(**f) for f in fetches],
        failures,
        started_at=started_at,
        run_id=run_id,
        history=history,
        draft=draft,
    )


def task_runner_for(config: Config) -> Any:
    """The task runner the fetches run on: threads here, or Dask workers (``[runtime]``)."""
    rt = config.runtime
    if rt.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if rt.dask_address:
            return DaskTaskRunner(address=rt.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": rt.dask_workers, "threads_per_worker": 1, "processes": True}
        )
    return ThreadPoolTaskRunner(max_workers=config.source.concurrency)


@flow(name="fetch-universe", validate_parameters=False)
def fetch_universe(config: Config) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Fetch every symbol (index and tickers); a failed symbol never stops the others.

    A store error (another run holds the lock, a full disk, a damaged or newer stored file)
    is no fault of the symbol's data: once every fetch has finished, it is raised so that the
    run stops with the store's exit status (5 locked, else 4).

    At most ``source.concurrency`` fetches run at once (the task runner's workers).  The
    progress artifact ``fetch-progress`` follows the symbols as they complete; the CLI's
    progress bar gets a ``fetch`` event per symbol.  Returns the outcomes of the fetched
    symbols (in the configured order) and a one-line reason per failed symbol.
    """
    symbols = list(config.fetch_symbols)
    tracker = _ProgressArtifact(len(symbols))
    batches = fetch_batches(config, symbols)
    # Prepared while `sensitivity run` started up: the tasks commit, and fetch in their
    # threads only what was not prepared (sensitivity.head_start).
    workers = None if head_start.covers(config, batches) else fetch_workers(config, batches)
    try:
        result = _fetch_all(config, symbols, batches, workers, tracker)
    except BaseException:
        # Interrupted (Ctrl-C, a cancelled run) or failed: stop the workers now rather than
        # after the batches in hand, which may be waiting for another run's store lock.  A
        # killed fetch leaves the stored file as it was (the store writes atomically).
        if workers is not None:
            workers.close(wait=False)
        raise
    finally:
        head_start.finish()  # its workers' memory back before the fit (a no-op without one)
    if workers is not None:
        workers.close()
    return result


def _fetch_subflow(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`fetch_universe` as a subflow of the current run, on the fetch's task runner.

    Without heartbeats of its own: the parent run's heartbeat thread already says that this
    process is alive (and Prefect used to join a flow run's heartbeat thread when the run
    ended, while that thread slept in 1 s steps: both cores idle for up to a second between
    the fetch and the fit; see :func:`heartbeats_without_join`).
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return fetch_universe.with_options(task_runner=task_runner_for(cfg))(cfg)


def fetch_workers(config: Config, batches: Sequence[Sequence[str]]) -> ProcessPool | None:
    """The worker processes the local batches run in (:func:`sensitivity.plan.fetch_processes`;
    those :func:`sensitivity.process_pool.prestart` started are taken first), or None to run
    them in the task threads."""
    processes = fetch_processes(config, batches)
    if processes < 1:
        return None
    return ProcessPool(FETCH_WORKER, processes, hang_s=_BATCH_HANG_S)


#: A batch a worker has not finished after this long is taken back and run in the task's
#: thread (a day: a fetch may legitimately wait ``runtime.lock_timeout_s`` per symbol for
#: another run's store lock).
_BATCH_HANG_S = 86_400.0


def _fetch_all(
    config: Config,
    symbols: list[str],
    batches: list[list[str]],
    workers: ProcessPool | None,
    tracker: _ProgressArtifact,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`fetch_universe`'s work: the fetch tasks, then their results as they complete."""
    futures: Any
    if all(len(b) == 1 for b in batches):
        fetch = fetch_prices.with_options(**fetch_options(config))
        futures = fetch.map(config=unmapped(config), symbol=[b[0] for b in batches])
    else:
        futures = fetch_price_batch.map(config=unmapped(config), symbols=batches, workers=unmapped(workers))
    batch_of = dict(zip(futures, batches, strict=True))
    outcomes: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    store_errors: list[StoreError] = []
    for future in as_completed(list(futures)):
        batch = batch_of[future]
        result = future.result(raise_on_failure=False)
        # One entry per symbol of the task, or the exception it raised (a single symbol's fetch
        # failed, or a whole batch task crashed) for each of its symbols.
        entries: list[dict[str, Any]] = (
            result if isinstance(result, list) else [{"symbol": s, "exception": result} for s in batch]
        )
        for entry in entries:
            symbol = str(entry["symbol"])
            extra: dict[str, Any] = {}
            if "outcome" in entry:
                done = outcomes[symbol] = entry["outcome"]
                extra = {"mode": done.get("mode"), "restated": bool(done.get("restated"))}
            elif "exception" in entry:
                failures[symbol] = failure_reason(symbol, entry["exception"])
                if isinstance(entry["exception"], StoreError):
                    store_errors.append(entry["exception"])
            else:
                failures[symbol] = entry["error"]
                if entry["store_error"]:
                    kind = StoreLockedError if entry["locked"] else StoreError
                    store_errors.append(kind(f"{symbol}: {entry['error']}"))
            ok = symbol not in failures
            progress.emit(progress.ProgressEvent("fetch", symbol=symbol, ok=ok, extra=extra))
        tracker.advance(len(entries), failed=len(failures))
    if store_errors:
        raise next((e for e in store_errors if isinstance(e, StoreLockedError)), store_errors[0])
    return [outcomes[s] for s in symbols if s in outcomes], failures


class _ProgressArtifact:
    """The ``fetch-progress`` Prefect progress artifact of one fetch-universe run.

    A failure to create or update it is logged once and never fails the run: it only shows
    progress.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.done = 0
        self.id: Any = None
        self._broken = False
        self._call(
            lambda: create_progress_artifact(
                progress=0.0, key="fetch-progress", description=f"Fetching {total} symbol(s)"
            )
        )

    def advance(self, count: int = 1, *, failed: int) -> None:
        """``count`` more symbols completed (fetched or failed): one update per finished task."""
        self.done += count
        if self.id is None:
            return
        note = f", {failed} failed" if failed else ""
        self._call(
            lambda: update_progress_artifact(
                artifact_id=self.id,
                progress=round(100.0 * self.done / self.total, 2),
                description=f"{self.done} of {self.total} symbol(s) done{note}",
            )
        )

    def _call(self, action: Any) -> None:
        if self._broken:
            return
        try:
            result = action()
        except Exception as exc:  # a display problem never fails the run
            self._broken = True
            get_run_logger().warning("cannot update the fetch-progress artifact: %s", exc)
            return
        if self.id is None:
            self.id = result


def _publish(
    summary: dict[str, Any], fit: dict[str, Any], failures: dict[str, str], paths: dict[str, str]
) -> None:
    """The run's Prefect artifacts: the summary table, the overview in Markdown, a link to the report."""
    from pathlib import Path

    from sensitivity.report import overview_markdown

    rows = list(summary.get("rows", []))
    create_table_artifact(
        key="sensitivity-summary",
        table=rows,
        description=(
            f"Per-ticker sensitivity as of {fit['as_of']} against {fit['index']} (window {fit['window']})."
        ),
    )
    n_tickers = len(fit["rows_by_ticker"])
    lines = [
        f"# stock-sensitivity as of {fit['as_of']}",
        "",
        f"Index **{fit['index']}**, window {fit['window']}, {fit['rows']} rows for "
        f"{n_tickers} tickers, {fit['first_date']} to {fit['last_date']}.",
        "",
    ]
    overview = overview_markdown(rows, limit=_OVERVIEW_ROWS)
    if overview:
        shown = min(_OVERVIEW_ROWS, len(rows))
        lines += [f"## Most sensitive today ({shown} of {len(rows)})", "", overview, ""]
    if failures:
        lines += [
            f"## Failed symbols ({len(failures)})",
            "",
            *[f"- **{s}**: {' '.join(str(r).split())}" for s, r in sorted(failures.items())],
            "",
        ]
    report = Path(paths["report"]).resolve()
    lines += [f"Report: `{report}`", "", f"Manifest: `{Path(paths['manifest']).resolve()}`"]
    create_markdown_artifact(
        key="sensitivity-run",
        markdown="\n".join(lines),
        description=f"Most sensitive stocks as of {fit['as_of']}, with the significance of their curves.",
    )
    create_link_artifact(
        key="sensitivity-report", link=report.as_uri(), link_text=f"HTML report as of {fit['as_of']}"
    )


#: Rows of the overview in the markdown artifact (the table artifact holds every ticker).
_OVERVIEW_ROWS = 20


@flow(name="stock-sensitivity", validate_parameters=True, log_prints=False)
def stock_sensitivity(
    tickers: list[str] | None = None,
    index: str | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
    source: Literal["yahoo", "files", "sample"] | None = None,
    source_path: str | None = None,
    window: int | None = None,
    min_obs: int | None = None,
    data_dir: str | None = None,
    config: str = DEFAULT_CONFIG,
) -> dict[str, Any]:
    """Fetch prices, fit the quadratic market model and write the per-day sensitivity tables.

    Every parameter left at None takes its value from the config file ``config``.  The run
    fails at once, before any work, when the configuration is invalid.  When some symbols
    fail, the others are still written and the run ends Failed, listing each failed symbol.
    """
    started_at = dt.datetime.now(dt.UTC)
    use_jemalloc()  # Arrow's pool for this run's own process (sensitivity.memory)
    logger = get_run_logger()
    cfg = load_config(
        config,
        {
            "tickers": tickers,
            "index": index,
            "start": start,
            "end": end,
            "source": source,
            "source_path": source_path,
            "window": window,
            "min_obs": min_obs,
            "data_dir": data_dir,
        },
    )
    import_steps_in_background()  # torch and matplotlib, while the fetch runs (sensitivity.preload)
    u = cfg.universe
    logger.info(
        "%d tickers against %s, %s to %s, source %s, window %d (min_obs %d), data_dir %s",
        len(u.tickers),
        u.index,
        u.start,
        u.resolved_end,
        cfg.source.kind,
        cfg.model.window,
        cfg.model.min_obs,
        cfg.output.data_dir,
    )
    progress.emit(progress.ProgressEvent("start", total=len(cfg.fetch_symbols)))
    fetches, failures = _fetch_subflow(cfg)
    if u.index in failures:
        raise SourceError(f"{u.index}: the index could not be fetched: {failures[u.index]}", symbol=u.index)
    rate = cfg.model.risk_free_symbol
    if rate is not None and rate in failures:
        raise SourceError(
            f"{rate}: the risk-free rate (model.risk_free_symbol) could not be fetched: {failures[rate]}",
            symbol=rate,
        )
    ok = [t for t in u.tickers if t not in failures]
    if not ok:
        raise PartialRunError(failures)
    fit, history, draft = fit_sensitivity(quote(cfg), quote(ok))
    failures.update(fit["no_data"])
    # quote(): plain data, no futures inside; Prefect would otherwise visit every element of
    # the 500 fetch outcomes and per-ticker counts before the task starts (0.1 s).
    try:
        paths = write_report(
            quote(cfg), quote(fit), quote(fetches), quote(failures), started_at, quote(history), quote(draft)
        )
    finally:
        if draft is not None:
            draft.close()  # the report took it over (a no-op then) or never started
    summary = _summary_rows(cfg, fit)
    _publish(summary, fit, failures, paths)
    result = {"as_of": fit["as_of"], "rows": fit["rows"], "paths": paths, "failures": failures, **summary}
    progress.emit(progress.ProgressEvent("done", ok=not failures))
    for symbol, reason in sorted(failures.items()):
        logger.error("%s: %s", symbol, reason)
    if failures:
        raise PartialRunError(failures, written=len(fit["rows_by_ticker"]), result=result)
    return result


def _summary_rows(cfg: Config, fit: dict[str, Any]) -> dict[str, Any]:
    """The latest row per ticker (small, JSON-friendly) for the artifact and the CLI."""
    from sensitivity.store import ReportStore

    summary = ReportStore(cfg.output.data_dir).read_summary(as_of=dt.date.fromisoformat(fit["as_of"]))
    summary = summary[
        (summary["index_ticker"] == cfg.universe.index)
        & (summary["window"] == cfg.model.window)
        & (summary["ticker"].isin(list(fit["rows_by_ticker"])))
    ]
    cols = [
        "ticker",
        "date",
        "n_obs",
        "sensitivity",
        "sensitivity_se",
        "sensitivity_ci_lower",
        "sensitivity_ci_upper",
        "beta",
        "gamma",
        "gamma_se",
        "gamma_p",
        "linear_beta",
        "r2",
        "dollar_sensitivity",
    ]
    rows = summary[cols].astype(object).where(summary[cols].notna(), None).to_dict("records")
    for row in rows:
        row["date"] = str(row["date"])
    return {"rows": rows}


if __name__ == "__main__":
    stock_sensitivity()
