"""Which allocator Arrow uses in a pipeline run's own process.

pyarrow's wheels make mimalloc (version 3) Arrow's default memory pool.  It backs its arenas
with transparent huge pages where the kernel allows them and hands freed memory back a second
later, so a fresh process, which every run is, zeroes a 2 MiB page again and again for the
few kilobytes it touches: ``perf`` put a tenth of a daily run's CPU time (500 tickers) in the
kernel's ``clear_page_erms`` under ``mi_page_free_list_extend``, nearly all of it in the run's
own process (reading and writing the per-day files: reading the 500 files took 2.2-2.8 s
instead of 1.2-1.8 s).  mimalloc's own switch (``MIMALLOC_ALLOW_THP=0``) turns huge pages off
for the whole process with ``prctl``, which slowed the torch kernel's large panels by a
quarter, so the run takes Arrow's jemalloc pool instead, where pyarrow was built with it
(Linux wheels; not macOS or Windows).

:func:`use_jemalloc` is called by ``sensitivity run`` and at the start of the flow (so
also in runs of the deployments), not on import: a program that only imports the library
keeps its own choice.  The fetch's worker processes keep Arrow's default (their share of the
zeroing was under 1% of a run).  A pool named in ``ARROW_DEFAULT_MEMORY_POOL`` is always left
alone.
"""

from __future__ import annotations

import os

__all__ = ["POOL_VARIABLE", "use_jemalloc"]

#: Arrow's environment variable naming its default pool (read when Arrow first allocates).
POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def use_jemalloc() -> str:
    """Make jemalloc Arrow's default pool in this process; return the backend in use
    (unchanged when the user named one in ``ARROW_DEFAULT_MEMORY_POOL``, or when this
    pyarrow has no jemalloc).  Idempotent."""
    import pyarrow as pa

    if POOL_VARIABLE not in os.environ:
        try:
            pool = pa.jemalloc_memory_pool()
        except NotImplementedError:  # built without jemalloc: keep Arrow's default
            return str(pa.default_memory_pool().backend_name)
        pa.set_memory_pool(pool)
    return str(pa.default_memory_pool().backend_name)
