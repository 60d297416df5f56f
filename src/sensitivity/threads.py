"""Chunks of elementwise tensor work run side by side on threads that run torch single-threaded.

The kernels (:mod:`sensitivity.model`, :mod:`sensitivity.inference`) cut their panels into
chunks of about 2^17 cells and hand them to :func:`run_single_threaded`: torch releases the
GIL inside its operations, so the chunks compute in parallel, and no operation pays torch's
per-operation OpenMP fork-join (which stalls whenever another process holds a core).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["CHUNK_CELLS", "chunk_workers", "run_single_threaded"]

#: Cells per chunk for elementwise work on the CPU (see ``sensitivity.model._CPU_CHUNK_CELLS``
#: for the measurements behind it).
CHUNK_CELLS: int = 1 << 17


def chunk_workers(device: torch.device, chunks: int) -> int:
    """Threads for ``chunks`` chunks side by side: torch's intra-op thread count on the CPU, else 1
    (on an accelerator the chunks are large and run one after the other)."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), chunks))


def run_single_threaded(job: Callable[[int], None], starts: Iterable[int], workers: int, name: str) -> None:
    """``job(start)`` for every start on ``workers`` threads, each running torch single-threaded.

    The chunks are the unit of parallelism: torch releases the GIL inside its operations, so
    the threads compute side by side, and each operation runs on the thread that calls it.
    Left to itself torch would split every operation above its parallel grain over an OpenMP
    team of its own (a fork-join per operation: thousands per fit, each stalling whenever
    another process holds a core; and one team per thread would oversubscribe the cores).

    ``torch.set_num_threads(1)`` in a worker sets that thread's OpenMP thread count; it also
    sets torch's process-wide default, which only threads that have not yet run a parallel
    operation read, so the caller's count is put back as soon as the pool is done.  Results do
    not depend on any of this (each cell's arithmetic is the same on any thread).
    """
    caller_threads = torch.get_num_threads()

    def single_threaded() -> None:
        torch.get_num_threads()  # settle this thread's lazy set-up before changing it
        torch.set_num_threads(1)

    try:
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=name, initializer=single_threaded
        ) as pool:
            for _ in pool.map(job, starts):
                pass
    finally:
        torch.set_num_threads(caller_threads)
