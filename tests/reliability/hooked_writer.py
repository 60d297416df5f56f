"""A real process that stops dead in the middle of one store write, for kill -9 and Ctrl-C tests.

    python hooked_writer.py PATTERN steps CONFIG DATA_DIR   the pipeline's steps, no Prefect
    python hooked_writer.py PATTERN cli ARGS...             the ``sensitivity`` command line

Every file the store writes goes through ``sensitivity.store.PreparedFile``.  The write of a
file whose name matches ``PATTERN`` (fnmatch) puts the first half of its bytes into the
temporary file, flushes it, prints ``MIDWRITE <path>`` and sleeps, so that the parent test can
kill the process right there.  With ``QUICK_REPORT=1`` the HTML renderer is replaced by a
one-line page (the battery's runs do not test the charts).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any


def _hook(pattern: str) -> None:
    import sensitivity.store as store

    real = store.PreparedFile

    class Hooked(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, write: Any, **options: Any) -> None:
            if not fnmatch.fnmatch(Path(path).name, pattern):
                super().__init__(path, write, **options)
                return

            def half(fh: IO[bytes]) -> None:
                buffer = io.BytesIO()
                write(buffer)
                data = buffer.getvalue()
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                print(f"MIDWRITE {path}", flush=True)
                time.sleep(300)

            super().__init__(path, half, **options)

    store.PreparedFile = Hooked  # type: ignore[misc]


def _quick_report() -> None:
    import sensitivity.report as report

    def render(table: Any, summary: Any, manifest: Any, **_: Any) -> bytes:
        return f"<!doctype html><p>{len(table)} rows</p>\n".encode()

    report.render_report = render  # type: ignore[assignment]


def _steps(config: str, data_dir: str) -> None:
    from sensitivity.config import load_config
    from sensitivity.pipeline import fetch_symbol, fit_universe, write_run_report

    cfg = load_config(config, {"data_dir": data_dir})
    started = dt.datetime.now(dt.UTC)
    fetches = [fetch_symbol(cfg, symbol) for symbol in cfg.fetch_symbols]
    fit = fit_universe(cfg, list(cfg.universe.tickers))
    write_run_report(cfg, fit, fetches, {}, started_at=started)
    print("DONE", flush=True)


def main() -> None:
    pattern, mode, *rest = sys.argv[1:]
    # Ctrl-C as at a terminal: a suite started from a background job (``make test &``) passes
    # SIGINT down ignored (POSIX), and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _hook(pattern)
    if os.environ.get("QUICK_REPORT") == "1":
        _quick_report()
    if mode == "steps":
        _steps(*rest)
    elif mode == "cli":
        from sensitivity.cli import main as cli_main

        sys.argv = ["sensitivity", *rest]
        cli_main()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
