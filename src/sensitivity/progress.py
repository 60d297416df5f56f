"""A tiny progress channel between the pipeline and whoever shows progress.

The flow's tasks call :func:`emit`; the CLI installs a reporter (a rich progress bar) with
:func:`use_reporter`.  With no reporter installed, events go nowhere.  The pipeline runs its
tasks in threads of the same process, so a process-wide reporter is enough; reporters must
be thread-safe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

Stage = Literal["start", "fetch", "fit", "report", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run: ``stage`` with an optional symbol, ok flag and totals."""

    stage: Stage
    symbol: str | None = None
    ok: bool = True
    detail: str = ""
    total: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[ProgressEvent], None]

_lock = threading.Lock()
_reporter: Reporter | None = None


def emit(event: ProgressEvent) -> None:
    """Send ``event`` to the installed reporter, if any; a failing reporter never breaks a run."""
    with _lock:
        reporter = _reporter
    if reporter is None:
        return
    # A display problem must never fail the pipeline.
    with contextlib.suppress(Exception):
        reporter(event)


@contextmanager
def use_reporter(reporter: Reporter) -> Iterator[None]:
    """Install ``reporter`` for the duration of the ``with`` block."""
    global _reporter
    with _lock:
        previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        with _lock:
            _reporter = previous
