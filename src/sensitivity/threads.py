"""Chunks of elementwise tensor work run side by side on threads that run torch single-threaded.

The kernels (:mod:`sensitivity.model`, :mod:`sensitivity.sensitivity`,
:mod:`sensitivity.inference`) cut their panels into
chunks of about 2^17 cells and hand them to :func:`for_each_chunk`: torch releases the
GIL inside its operations, so the chunks compute in parallel, and no operation pays torch's
per-operation OpenMP fork-join (which stalls whenever another process holds a core).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["CHUNK_CELLS", "for_each_chunk", "run_single_threaded"]

#: Cells per chunk for elementwise work on the CPU (for the fit: at least one column).  A
#: chunk of the fit costs about 130 tensor operations whatever its size, each with a few
#: microseconds of dispatch that holds the GIL; chunks of torch's parallel grain (2^15) spent
#: a quarter of the time there, and with two threads most of the rest waiting for each
#: other's GIL hand-offs.  Measured on 2 cores, best of repeats (window 252): 500 x 5,000 took
#: 0.36 s at 2^15, 0.28 s at 2^16, 0.24 s at 2^17 and 2^18, 0.30 s at 2^19 (the ~40 planes of
#: two chunks no longer fit the last-level cache); 3,000 x 7,500 took 5.2, 4.3, 2.5, 2.8 and
#: 3.4 s.
CHUNK_CELLS: int = 1 << 17


def for_each_chunk(
    job: Callable[[int], None], starts: Sequence[int], device: torch.device, name: str
) -> None:
    """``job(start)`` for every start: on the CPU side by side on torch's intra-op thread count
    (:func:`run_single_threaded`), on an accelerator (large chunks) one after the other."""
    workers = 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), len(starts)))
    if workers > 1:
        run_single_threaded(job, starts, workers, name)
    else:
        for start in starts:
            job(start)


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
