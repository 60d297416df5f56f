"""The ``sensitivity`` command line: parse, call the Prefect flow, print.

``sensitivity run`` runs the flow ``stock-sensitivity`` in this process (on a temporary local
Prefect server unless ``PREFECT_API_URL`` points at one) and prints where the outputs are and
a summary table.  Errors become one line per culprit on stderr and a documented exit status:

    0  success
    1  unexpected error (a bug: rerun with --debug and report it)
    2  invalid configuration, option or parameter (nothing was done)
    3  a symbol could not be fetched or its data is invalid (the others were written)
    4  the store could not be read or written (the file it names was left unchanged)
    5  another run holds the store's lock
    130 interrupted (Ctrl-C); the store is left as it was before the interrupted write
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from sensitivity import __version__, head_start, plan, progress
from sensitivity.config import Config, SourceKind, load_config
from sensitivity.errors import ConfigError, PartialRunError, SensitivityError
from sensitivity.memory import use_jemalloc
from sensitivity.preload import STEP_MODULES, collector_paused
from sensitivity.process_pool import discard_spares, prestart

FLOW_ENTRYPOINT = "flows/pipeline.py:stock_sensitivity"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Per-day market sensitivity of stocks, with confidence intervals, as Prefect flows.",
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
if not out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
    out.width = 160


def project_root() -> Path:
    """The folder holding ``flows/``: the source checkout, else the current directory."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "flows" / "pipeline.py").is_file():
            return candidate
    raise ConfigError(
        f"cannot find {FLOW_ENTRYPOINT.split(':')[0]} next to the package or in {Path.cwd()}; "
        "run from the project folder"
    )


def load_pipeline_flow() -> Any:
    """The flow object, loaded by entrypoint the way Prefect loads deployments."""
    from prefect.flows import load_flow_from_entrypoint

    path, name = FLOW_ENTRYPOINT.split(":")
    return load_flow_from_entrypoint(f"{project_root() / path}:{name}", use_placeholder_flow=False)


def _on_temporary_server(settings: Any) -> bool:
    """Whether a flow run with these Prefect settings talks to the temporary local server
    (no ``PREFECT_API_URL``, and Prefect allowed to start one)."""
    return not settings.api.url and bool(settings.server.ephemeral.enabled)


@contextlib.contextmanager
def _temporary_server_started_early() -> Iterator[None]:
    """Start Prefect's temporary API server now, and let the body run while it boots.

    Without ``PREFECT_API_URL`` a flow run starts a temporary server (a subprocess importing
    Prefect's server: 5 to 15 s) and waits for it before anything else.  Started here from a
    thread, it boots on one core while the body imports the flow and the steps' libraries on
    the other; the flow run then finds it up (Prefect keeps one temporary server per process).
    Everything Prefect needs is imported before the thread starts, so the thread imports
    nothing.  If the early start fails, the flow run starts the server itself, as without this.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not _on_temporary_server(settings):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    timeout = int(settings.server.ephemeral.startup_timeout_seconds)

    def start() -> None:
        with contextlib.suppress(Exception):  # the flow run retries and reports it
            server.start(timeout=timeout)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


@contextlib.contextmanager
def _no_heartbeats_on_a_temporary_server() -> Iterator[None]:
    """Run the body with Prefect's flow-run heartbeats off when the API is the temporary server.

    Heartbeats let a server notice a run whose process died; the temporary server dies with
    this process, so nothing could ever read them.  Against a configured server
    (``PREFECT_API_URL``) they stay on (and the run does not wait for their thread at its
    end: ``heartbeats_without_join`` in flows/pipeline.py).
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    if not _on_temporary_server(get_current_settings()):
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


#: Set by :func:`main`: the process is the ``sensitivity`` command's own, which may tune
#: its garbage collector.  Not when ``app`` is called from another program (or a test's
#: ``CliRunner``): freezing would keep that program's unreachable objects for its lifetime.
_OWN_PROCESS = False


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The body (the run's start-up imports) with the garbage collector paused, and what it
    made frozen after, in the command's own process (:data:`_OWN_PROCESS`).

    The modules of Prefect, torch, pandas and matplotlib make some 600,000 objects that live
    until the process ends, and every full collection walked all of them: five or six while
    they were imported (0.25 to 0.6 s; Prefect's settings, imported first to see whether a
    temporary server is needed, had been left outside the pause), and the one at exit took
    about 1 s after a 500-ticker run (0.2 s frozen; measured with ``gc.callbacks``).  Frozen
    objects are still freed by reference counting; only cycles among them wait for the exit.
    """
    with collector_paused(_OWN_PROCESS):
        yield


def _load_flow_and_steps() -> Any:
    """The flow, with what its fit and report use (torch, matplotlib) imported before it runs."""
    flow = load_pipeline_flow()
    for name in STEP_MODULES:  # what the fit and the report import (torch, matplotlib)
        importlib.import_module(name)
    return flow


def _prestart_workers(cfg: Config) -> None:
    """Start the worker processes the run's fetch and report will use, before the imports.

    Until the flow's first task this process imports Prefect, torch and matplotlib and starts
    the flow run: three to four seconds on one core.  The fetch's and the report's worker
    processes (:mod:`sensitivity.plan`) spend about a second each importing pandas, pyarrow
    or matplotlib; started now they do it on the idle cores and wait, ready
    (:func:`sensitivity.process_pool.prestart`), instead of when the steps start, with every
    core busy.  The fetch's workers go on to prepare the fetch itself
    (:mod:`sensitivity.head_start`), which the flow's fetch tasks then commit.
    """
    symbols = list(cfg.fetch_symbols)
    if not head_start.start(cfg, level=_logging_level()):  # its workers prepare the fetch meanwhile
        prestart(plan.FETCH_WORKER, plan.fetch_processes(cfg, plan.fetch_batches(cfg, symbols)))
    sections = plan.charted_sections([len(cfg.universe.tickers)])
    prestart(plan.SECTION_WORKER, plan.section_workers(sections))


def _check_source(cfg: Config) -> None:
    """Refuse a ``files`` source whose ``source.path`` is not a folder (a ConfigError)."""
    if cfg.source.kind == "files":
        from sensitivity.sources.base import make_source

        make_source(cfg.source)


def _logging_level() -> int:
    """The level of ``PREFECT_LOGGING_LEVEL`` (what the flow's loggers will pass on), else INFO."""
    level = logging.getLevelName(os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").strip().upper())
    return level if isinstance(level, int) else logging.INFO


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        err.print_exception(show_locals=False)
    if isinstance(exc, PartialRunError):
        for symbol, reason in sorted(exc.failures.items()):
            err.print(f"error: {symbol}: {reason}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, SensitivityError):
        lines = str(exc).splitlines() or [type(exc).__name__]
        for line in lines:
            err.print(f"error: {line}", markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted: nothing half-written was kept; rerun to finish", markup=False)
        raise typer.Exit(130)
    err.print(
        f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
        markup=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


class _RichReporter:
    """Shows the progress events of a run as a rich progress bar on stderr.

    While fetching, the description counts failed symbols and restated histories (refetched
    in full) and names the symbol that just completed.
    """

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("starting Prefect", total=None)
        self.failed = 0
        self.restated = 0

    def __call__(self, event: progress.ProgressEvent) -> None:
        if event.stage == "start":
            self.bar.update(self.task, description="fetching prices", total=event.total, completed=0)
        elif event.stage == "fetch":
            self.failed += 0 if event.ok else 1
            self.restated += 1 if event.extra.get("restated") else 0
            notes = [f"{self.failed} failed"] if self.failed else []
            notes += [f"{self.restated} restated"] if self.restated else []
            note = f" ({', '.join(notes)})" if notes else ""
            mode = event.extra.get("mode")
            how = f" [{mode}]" if event.ok and isinstance(mode, str) else "" if event.ok else " [failed]"
            self.bar.update(self.task, advance=1, description=f"fetching prices{note}: {event.symbol}{how}")
        elif event.stage == "fit":
            self.bar.update(self.task, description=f"fitted {event.detail}")
        elif event.stage == "report":
            self.bar.update(self.task, description="report written")


#: Rows of the console's summary table are all shown up to this many tickers; beyond, the
#: highest and lowest :data:`CONSOLE_ENDS` each (the summary table and the report hold all).
CONSOLE_ALL_UP_TO = 25
CONSOLE_ENDS = 10


def console_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any] | None], str | None]:
    """The rows the console shows, highest sensitivity first (``None``: the gap), and a caption.

    Up to :data:`CONSOLE_ALL_UP_TO` tickers, all of them and no caption.  Beyond, the
    :data:`CONSOLE_ENDS` highest and lowest sensitivities with a gap between, and a caption
    saying how many are left out and naming (up to five) the tickers without a value.
    """
    fitted = sorted((r for r in rows if r.get("sensitivity") is not None), key=lambda r: -r["sensitivity"])
    unfitted = [r for r in rows if r.get("sensitivity") is None]
    if len(rows) <= CONSOLE_ALL_UP_TO:
        return [*fitted, *unfitted], None
    if len(fitted) > 2 * CONSOLE_ENDS:
        shown: list[dict[str, Any] | None] = [*fitted[:CONSOLE_ENDS], None, *fitted[-CONSOLE_ENDS:]]
        left_out = len(fitted) - 2 * CONSOLE_ENDS
    else:
        shown, left_out = list(fitted), 0
    caption = f"{len(rows)} tickers; shown: every one with a sensitivity"
    if left_out:
        caption = (
            f"{len(rows)} tickers; shown: the {CONSOLE_ENDS} highest and the {CONSOLE_ENDS} lowest "
            f"sensitivities ({left_out} in between left out)"
        )
    if unfitted:
        names = ", ".join(str(r["ticker"]) for r in unfitted[:5])
        more = f" and {len(unfitted) - 5} more" if len(unfitted) > 5 else ""
        caption += f"; {len(unfitted)} without a sensitivity: {names}{more}"
    return shown, caption + ". Every ticker is in the summary table and the report."


def _print_result(result: dict[str, Any]) -> None:
    rows, caption = console_rows(list(result.get("rows", [])))
    table = Table(
        title=f"Sensitivity as of {result.get('as_of')}",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for col in ("ticker", "date", "sensitivity", "± se", "beta", "gamma", "linear beta", "r2", "$ per +1%"):
        table.add_column(col, justify="left" if col in ("ticker", "date") else "right")

    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in rows:
        if r is None:
            table.add_row("…", *[""] * 8)
            continue
        table.add_row(
            r["ticker"],
            r["date"],
            fmt(r["sensitivity"], ".3f"),
            fmt(r["sensitivity_se"], ".3f"),
            fmt(r["beta"], ".3f"),
            fmt(r["gamma"], ".2f"),
            fmt(r["linear_beta"], ".3f"),
            fmt(r["r2"], ".2f"),
            fmt(r["dollar_sensitivity"], ".3f"),
        )
    out.print(table)
    paths = result.get("paths", {})
    for label, key in (
        ("per-day table", "sensitivity"),
        ("summary", "summary"),
        ("scenarios", "scenarios"),
        ("report", "report"),
        ("manifest", "manifest"),
    ):
        if key in paths:
            out.print(f"{label:>14}: {paths[key]}", markup=False)


@app.command()
def run(
    config: Annotated[Path, typer.Option(help="TOML configuration file.")] = Path("config/default.toml"),
    tickers: Annotated[
        str | None, typer.Option(help="Comma-separated stock symbols, e.g. AAPL,MSFT.")
    ] = None,
    index: Annotated[str | None, typer.Option(help="Index symbol, e.g. ^GSPC.")] = None,
    start: Annotated[str | None, typer.Option(help="First price date, YYYY-MM-DD (inclusive).")] = None,
    end: Annotated[str | None, typer.Option(help="Last price date, YYYY-MM-DD (inclusive).")] = None,
    source: Annotated[SourceKind | None, typer.Option(help="Price source.")] = None,
    # Plain strings, not Path: Path("") is ".", which would turn an empty value into the
    # current folder instead of the refusal the config gives it.
    source_path: Annotated[
        str | None, typer.Option(help="Folder of <SYMBOL>.csv/.parquet for --source files.")
    ] = None,
    window: Annotated[
        int | None, typer.Option(help="Rolling window in trading days; 0 = full sample.")
    ] = None,
    min_obs: Annotated[int | None, typer.Option(help="Fewest returns a fit needs.")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder of the price store and the reports.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
) -> None:
    """Run the whole pipeline: fetch, fit, write tables and the report."""
    overrides: dict[str, Any] = {
        "tickers": tickers,
        "index": index,
        "start": start,
        "end": end,
        "source": source,
        "source_path": source_path,
        "window": window,
        "min_obs": min_obs,
        "data_dir": data_dir,
    }
    try:
        cfg = load_config(config, overrides)  # refuse bad input before Prefect starts
    except SensitivityError as exc:
        _fail(exc, debug)
    # Prefect's logs still reach its API (the UI); the console shows them only with --verbose,
    # so a failure prints our one-line messages, not Prefect's tracebacks.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home
    # The temporary local server can take longer than Prefect's 20 s default to start on a
    # small or busy machine; waiting a little longer beats failing the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    params: dict[str, Any] = {
        "config": str(config),
        "tickers": list(cfg.universe.tickers) if tickers else None,
        "index": index,
        "start": cfg.universe.start if start else None,
        "end": cfg.universe.end if end else None,
        "source": source,
        "source_path": overrides["source_path"],
        "window": window,
        "min_obs": min_obs,
        "data_dir": overrides["data_dir"],
    }
    use_jemalloc()  # Arrow's pool for this process, before any work (sensitivity.memory)
    _prestart_workers(cfg)
    try:
        # After the workers started: the source's check imports pandas and pyarrow (0.4 s on
        # one core, the other idle until the workers are there).  A bad source.path still
        # stops the run before Prefect starts (exit 2); the workers are stopped below.
        with _collector_paused():
            _check_source(cfg)
            with _temporary_server_started_early():
                flow = _load_flow_and_steps()
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with (
            Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar,
            progress.use_reporter(_RichReporter(bar)),
            _no_heartbeats_on_a_temporary_server(),
        ):
            result = flow(**{k: v for k, v in params.items() if v is not None})
    except PartialRunError as exc:
        if exc.result:
            _print_result(exc.result)
        _fail(exc, debug)
    except BaseException as exc:
        _fail(exc, debug)
    finally:
        head_start.finish()  # (a no-op once the fetch has ended it)
        discard_spares()  # those the run did not take (it stopped early, or planned otherwise)
    _print_result(result)


@app.command()
def serve(
    deployment: Annotated[
        list[str] | None, typer.Option(help="Serve only these deployments (by name).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most runs at once in this process.", min=1)] = 1,
    schedules: Annotated[
        bool,
        typer.Option(
            help="Keep the cron schedules of prefect.yaml; --no-schedules serves the deployments "
            "for triggered runs only (a staging or test server that must not start the daily run)."
        ),
    ] = True,
) -> None:
    """Serve the deployments of prefect.yaml from this process (no work pool needed)."""
    import importlib.util

    try:
        root = project_root()
        spec = importlib.util.spec_from_file_location(
            "sensitivity_flows_deployments", root / "flows" / "deployments.py"
        )
        if spec is None or spec.loader is None:  # pragma: no cover
            raise ConfigError(f"cannot load {root / 'flows' / 'deployments.py'}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        os.chdir(root)  # deployments' relative paths (config/, data/) are relative to the project
        module.serve_deployments(root, names=deployment or None, limit=limit, schedules=schedules)
    except SensitivityError as exc:
        _fail(exc, False)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    _leave()


def _leave() -> None:
    """End the command's process once it has succeeded, without tearing down its modules.

    What the interpreter's exit does first is done as it does it: the threads that are not
    daemons are joined and what was registered to run then runs (Prefect drains its log and
    event services there, closing its connections), then the ``atexit`` handlers (Prefect's
    temporary server is stopped, spare workers killed, logging flushed, weak finalizers
    called), and the standard streams are flushed; what is skipped is deallocating every
    object of Prefect, torch, pandas and matplotlib one by one, about 0.3 s after a
    500-ticker run.  Every file the run wrote was flushed, synced and closed by then.  Where
    the interpreter lacks those hooks, it exits as usual.
    """
    join_threads = getattr(threading, "_shutdown", None)
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if (
        join_threads is None
        or run_handlers is None
        or threading.current_thread() is not threading.main_thread()
    ):
        sys.exit(0)
    join_threads()
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


__all__ = ["app", "main"]
