"""How a run splits its work: the fetch batches and the worker processes of the fetch and the report.

Pure rules on the configuration and a few counts, importing nothing heavy (no pandas, Prefect,
torch or matplotlib), so that ``sensitivity run`` can start the worker processes a run will
use before it imports those itself (:func:`sensitivity.process_pool.prestart`), and the flow
and the report decide the same way when they use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from sensitivity.config import Config
from sensitivity.process_pool import available_cpus

__all__ = [
    "CHART_LIMIT",
    "FETCH_WORKER",
    "MAX_BATCH",
    "MAX_SECTION_WORKERS",
    "PROCESS_MIN_SYMBOLS",
    "SECTIONS_PER_WORKER",
    "SECTION_WORKER",
    "charted_sections",
    "fetch_batches",
    "fetch_processes",
    "section_workers",
]

#: What a fetch worker process runs (one local batch per job).
FETCH_WORKER: Final = "sensitivity.pipeline:fetch_batch_logged"
#: What a report worker process runs (one ticker section per job).
SECTION_WORKER: Final = "sensitivity.report:_worker_section"

#: The most symbols one local fetch task takes (its log and progress stay readable).
MAX_BATCH: Final = 128
#: Fewest symbols for which ``runtime.fetch_processes = "auto"`` starts worker processes.
PROCESS_MIN_SYMBOLS: Final = 64

#: Above this many tickers per (index, window) the report charts only the ``CHART_LIMIT // 2``
#: most and least sensitive ones (the overview still lists every ticker).
CHART_LIMIT: Final[int] = 40
#: Charted sections per worker process below which the report draws them all itself: a
#: worker takes about 1.3 s to start (a fresh interpreter importing matplotlib and pandas),
#: a section about 0.2 to 0.35 s to draw.
SECTIONS_PER_WORKER: Final[int] = 8
#: Most worker processes one report starts.
MAX_SECTION_WORKERS: Final[int] = 8


def fetch_batches(config: Config, symbols: Sequence[str]) -> list[list[str]]:
    """How the fetches are split into tasks: one symbol per task for Yahoo (the network is the
    bottleneck, and Prefect retries each symbol on its own), about two batches per worker for
    the local sources (``files``, ``sample``), in the configured order."""
    if config.source.kind == "yahoo" or not symbols:
        return [[s] for s in symbols]
    workers = config.source.concurrency
    if config.runtime.task_runner == "dask":
        workers = max(workers, config.runtime.dask_workers)
    size = max(1, min(MAX_BATCH, math.ceil(len(symbols) / (2 * workers))))
    return [list(symbols[i : i + size]) for i in range(0, len(symbols), size)]


def fetch_processes(config: Config, batches: Sequence[Sequence[str]], *, cpus: int | None = None) -> int:
    """Worker processes the local batches run in (0: the task threads run them).

    Only for a local fetch (not Yahoo's task per symbol) on the thread runner (Dask has
    processes of its own).  ``runtime.fetch_processes``: ``"auto"`` is one process per CPU
    (``cpus``, default :func:`~sensitivity.process_pool.available_cpus`), at most
    ``source.concurrency``, from :data:`PROCESS_MIN_SYMBOLS` symbols and two CPUs up (a worker
    takes about a second to start, the time of a few dozen local fetches); 0 none; N that
    many.  Never more than there are batches.
    """
    if config.runtime.task_runner == "dask" or all(len(b) == 1 for b in batches):
        return 0
    wanted = config.runtime.fetch_processes
    if wanted == "auto":
        if sum(len(b) for b in batches) < PROCESS_MIN_SYMBOLS:
            return 0
        processes = min(config.source.concurrency, available_cpus() if cpus is None else cpus)
        processes = processes if processes >= 2 else 0
    else:
        processes = int(wanted)
    return max(0, min(processes, len(batches)))


def charted_sections(tickers_per_group: Sequence[int], chart_limit: int = CHART_LIMIT) -> int:
    """Ticker sections with charts in a report whose (index, window) groups hold these many
    tickers: every ticker up to ``chart_limit`` per group, else ``chart_limit``."""
    return sum(min(n, chart_limit) for n in tickers_per_group)


def section_workers(sections: int, workers: int | None = None, *, cpus: int | None = None) -> int:
    """Worker processes that draw ``sections`` charted sections beside the report's caller.

    ``workers`` None: one per spare CPU (``cpus - 1``), at most :data:`MAX_SECTION_WORKERS`
    and one per :data:`SECTIONS_PER_WORKER` sections; else that many.  Never more than there
    are sections.
    """
    if workers is None:
        spare = (available_cpus() if cpus is None else cpus) - 1
        workers = min(spare, sections // SECTIONS_PER_WORKER, MAX_SECTION_WORKERS)
    return max(0, min(workers, sections))
