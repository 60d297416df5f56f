"""A local fetch's head start: prepare the fetches while the run is still starting up.

``sensitivity run`` knows from its configuration, before it imports Prefect, which symbols
its flow will fetch and in which batches (:func:`sensitivity.plan.fetch_batches`).  For a
local source (``files``, ``sample``) it starts the fetch's worker processes at once and has
them *prepare* every batch (:func:`sensitivity.pipeline.prepare_batch_logged`: read the
stored prices, read and check the source file, write the merged price file under a
temporary name that readers ignore) while the run itself imports Prefect and creates the
flow run on the other core -- four to six seconds in which that core was idle.

Nothing visible changes before the flow's fetch task commits: the task of each batch takes
its prepared fetches (:func:`take`) and puts each in place under the store's lock, checking
that the stored file is still the one it was merged with
(:func:`sensitivity.pipeline.commit_batch`); a symbol that was not prepared, or whose file
another run rewrote meanwhile, is fetched by the task itself, as without a head start.  The
task logs what the preparation logged, then the commit.  A flow that runs with another
configuration than the one prepared for (compared whole, and its last day: a run without
``end`` may cross midnight), or a batch whose worker failed, gets nothing here and fetches
as usual.  :func:`finish` ends it: prepared files that
no task took are removed, and the worker processes stopped.  Deployment runs (started by
Prefect, not by ``sensitivity run``) have no head start.

Knows nothing of Prefect: the CLI calls :func:`start` and :func:`finish`, the flow's tasks
:func:`take` and :func:`covers`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from sensitivity import plan
from sensitivity.config import Config
from sensitivity.process_pool import ProcessPool

if TYPE_CHECKING:  # (not imported at run time: the CLI starts this before pandas is loaded)
    from sensitivity.pipeline import PreparedFetch

__all__ = ["PREPARE_WORKER", "covers", "finish", "start", "take"]

_log = logging.getLogger(__name__)

#: What the head start's worker processes run (one batch per job).
PREPARE_WORKER: Final = "sensitivity.pipeline:prepare_batch_logged"

#: Prepared entries of one batch (see :func:`sensitivity.pipeline.prepare_batch_logged`).
Prepared = list[tuple[str, "PreparedFetch | None", list[logging.LogRecord]]]


@dataclass(eq=False)
class _HeadStart:
    config: Config
    #: ``universe.resolved_end`` when it started (today, where ``end`` is not set).
    end: dt.date
    pool: ProcessPool
    #: The batches not yet taken, each with the future of its preparation.
    jobs: dict[tuple[str, ...], Future[Prepared | None]]
    #: Every batch it prepares, taken or not.
    batches: frozenset[tuple[str, ...]] = frozenset()
    threads: list[threading.Thread] = field(default_factory=list)


_LOCK = threading.Lock()
_CURRENT: _HeadStart | None = None


def start(config: Config, *, level: int = logging.INFO) -> bool:
    """Start preparing the fetch of ``config`` in worker processes; False when it has none
    (Yahoo's task per symbol, too few symbols, ``runtime.fetch_processes = 0``, one CPU, or
    ``runtime.fetch_head_start = false``).  ``level``: the lowest log level the preparation
    records for the tasks to log."""
    global _CURRENT
    if not config.runtime.fetch_head_start:
        return False
    symbols = list(config.fetch_symbols)
    batches = plan.fetch_batches(config, symbols)
    processes = plan.fetch_processes(config, batches)
    if processes < 1:
        return False
    finish()  # (a run starts one; a second start replaces the first)
    pool = ProcessPool(PREPARE_WORKER, processes, initializer=_YIELD, initargs=(_NICENESS,), hang_s=_HANG_S)
    if pool.processes < 1:
        pool.close()
        return False
    jobs: dict[tuple[str, ...], Future[Prepared | None]] = {tuple(b): Future() for b in batches}
    queue = deque(jobs.items())
    head = _HeadStart(config, config.universe.resolved_end, pool, jobs, frozenset(jobs))

    def work() -> None:
        # One thread per worker, taking the batches in order: the flow's first tasks find
        # theirs prepared first.
        while True:
            try:
                batch, future = queue.popleft()
            except IndexError:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(pool.call(_not_prepared, config, list(batch), level))
            except BaseException as exc:  # the pool was closed (finish): nothing prepared
                future.set_exception(exc)

    for _ in range(pool.processes):
        thread = threading.Thread(target=work, name="fetch-head-start", daemon=True)
        thread.start()
        head.threads.append(thread)
    with _LOCK:
        _CURRENT = head
    return True


#: A prepare job a worker has not finished after this long is given up (the task fetches).
_HANG_S: Final = 600.0

#: The workers' niceness: they use the cores the run's own start-up leaves idle and yield
#: the rest to it (at the same priority they took a third of the busy core from it, and the
#: flow started three seconds later: a head start that gained nothing).
_NICENESS: Final = 10
_YIELD: Final = "sensitivity.head_start:lower_priority"


def lower_priority(niceness: int) -> None:
    """Run this process ``niceness`` steps nicer (a worker's initializer; where the OS has no
    niceness, nothing changes)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(niceness)


def _not_prepared(config: Config, symbols: Sequence[str], level: int) -> None:
    """What a job no worker answered gives: nothing prepared (the task fetches itself)."""
    return None


def _for(head: _HeadStart | None, config: Config) -> bool:
    """Whether ``head`` prepared the fetch of ``config``: the same configuration, compared
    whole, and the same last day (a run without ``end`` that crosses midnight asks for one
    more day than was prepared)."""
    return head is not None and head.config == config and head.end == config.universe.resolved_end


def covers(config: Config, batches: Sequence[Sequence[str]]) -> bool:
    """Whether a head start for ``config`` holds a job for each of ``batches`` (taken or not)."""
    with _LOCK:
        head = _CURRENT
    if head is None or not _for(head, config):
        return False
    return all(tuple(b) in head.batches for b in batches)


def take(config: Config, symbols: Sequence[str]) -> Prepared | None:
    """The prepared fetches of the batch ``symbols`` (waiting for them if they are still
    being prepared), or None when the head start has none for ``config`` and this batch.
    Each batch is handed out once; the caller commits or discards every prepared fetch."""
    with _LOCK:
        head = _CURRENT
        if head is None or not _for(head, config):
            return None
        future = head.jobs.pop(tuple(symbols), None)
    if future is None:
        return None
    try:
        return future.result()
    except Exception:
        return None


def finish() -> None:
    """End the head start: remove the prepared files no task took and stop the workers."""
    global _CURRENT
    with _LOCK:
        head, _CURRENT = _CURRENT, None
    if head is None:
        return
    for future in head.jobs.values():
        future.cancel()  # not started yet: never will be
    head.pool.close(wait=False)  # a job in hand is stopped; its worker's files are swept later
    for thread in head.threads:
        thread.join()
    for future in head.jobs.values():
        if future.cancelled() or future.exception() is not None:
            continue
        for _symbol, prepared, _records in future.result() or ():
            if prepared is not None:
                prepared.discard()
