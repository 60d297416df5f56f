"""Import what the fit and the report need while the fetch runs.

A run started by ``sensitivity run`` imports torch and matplotlib before the flow starts
(beside Prefect's own imports).  A deployment run's process (``sensitivity serve``, a worker)
starts with Prefect and the flow's module only, so the fit step imported torch (1.2 to 2 s on
one core) and the report matplotlib (about 0.4 s) while nothing else ran: the fetch had
finished.  The fetch itself runs in worker processes, or waits on the network, and leaves
the flow's process mostly idle; :func:`import_steps_in_background` does those imports then,
on a thread.  The cores are shared, so a local fetch takes a little longer (at 500 symbols on
two cores: fit step 1.2 to 2 s shorter, fetch 0.5 to 1.3 s longer, the run 0.2 to 0.7 s
shorter; benchmarks/README.md, session 17).

Python's per-module import locks keep this safe: a step that imports one of these modules
while the thread still does waits for it and gets the complete module; an import error is
left for the step's own import to raise, in its task, as without this module.

In a process Prefect started to run one flow run (:func:`engine_process`: the child
``sensitivity serve`` spawns for a run, or ``python -m prefect.engine``), which ends with it,
the garbage collector is paused while the thread imports and what the process holds then is
frozen, as ``sensitivity run`` does for its start-up: full collections otherwise walked the
600,000 objects of these libraries and Prefect's again and again.  Elsewhere (a test, a
notebook calling the flow) the process's collector is left alone.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Final

__all__ = ["STEP_MODULES", "collector_paused", "engine_process", "import_steps_in_background"]

log = logging.getLogger(__name__)

#: What the fit (torch) and the report (matplotlib) import, in the order the run needs them.
STEP_MODULES: Final = ("sensitivity.api", "sensitivity.report")


def import_steps_in_background() -> threading.Thread | None:
    """Import :data:`STEP_MODULES` on a daemon thread; None when all are imported already."""
    missing = [name for name in STEP_MODULES if name not in sys.modules]
    if not missing:
        return None

    tune = engine_process()

    def run() -> None:
        with collector_paused(tune):
            for name in missing:
                try:
                    importlib.import_module(name)
                except Exception:  # the step's own import raises it where it belongs
                    log.debug("importing %s ahead failed", name, exc_info=True)
                    return

    thread = threading.Thread(target=run, name="sensitivity-import-steps", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def collector_paused(when: bool = True) -> Iterator[None]:
    """The body with the garbage collector paused, and what the process holds frozen after
    (full collections then skip it; frozen objects are still freed by reference counting,
    only cycles among them wait for the exit), when ``when``; else nothing changes.  For the
    imports of a process that lives only as long as the modules it imports: its run or its
    flow run, never a caller's process."""
    enabled = gc.isenabled()
    if when:
        gc.disable()
    try:
        yield
    finally:
        if when:
            gc.freeze()
            if enabled:
                gc.enable()


def engine_process() -> bool:
    """Whether this process is one Prefect started to run a flow run, which ends when the run
    does: ``python -m prefect.engine`` (a worker, or a deployment whose code is loaded from
    storage), or the child a runner spawns for a deployment it serves (``sensitivity serve``;
    Prefect names the deployment in ``PREFECT__DEPLOYMENT_NAME`` for it)."""
    import multiprocessing

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) == "prefect.engine":
        return True
    return multiprocessing.parent_process() is not None and "PREFECT__DEPLOYMENT_NAME" in os.environ
