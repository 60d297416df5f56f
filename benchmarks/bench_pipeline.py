"""Time the whole pipeline end to end: a full backfill, then the next day's incremental run.

    python benchmarks/bench_pipeline.py [--symbols 500 --years 20 --format csv|parquet]
                                        [--workdir DIR] [--keep] [--server] [--fresh-prefect]
                                        [--repeat N] [--deployment]

It writes a ``files`` source of ``--symbols`` synthetic stocks plus an index (``^SYN``), about
252 trading days a year, in Yahoo's column layout (``Date,Open,High,Low,Close,Adj Close,Volume``),
with a few late listings, delistings and missing days.  Then it runs the real command line,
``sensitivity run --config <cfg> --end <day>``, in a subprocess -- Python and Prefect start-up,
the embedded Prefect server, every fetch task, the fit, the Parquet writes and the HTML report
included -- twice:

1. the **full backfill** into an empty data folder;
2. after appending one trading day to every file, the **next day's run** (``--end`` one day
   later) on the same data folder: what the daily deployment does.  ``--repeat N`` runs it N
   times, each from a copy of the data folder as the backfill left it, and reports the best
   and the median: on a shared VM one run says little.

With ``--deployment`` (implies ``--server``) the next day is also run as production runs it:
``sensitivity serve --no-schedules`` serves the ``daily`` deployment of ``prefect.yaml`` and
``prefect deployment run 'stock-sensitivity/daily' --param config=... --param end=... --watch``
triggers it, ``--repeat`` times.  Its time is the flow run's, from the moment the serving
process took it (state Pending: the flow-run process is about to start) to its final state,
so the wait for the runner's next poll is left out; its CPU time and peak memory are not
measured (the process is the serving process's child).

For each run it prints the wall time, its CPU time and the system part of it, its minor page
faults, the peak resident memory of the largest process of the run (all from ``wait4``'s usage
of the waited-for process tree) and the rows written.  ``PREFECT_HOME`` points
into the work folder.  Prefect's database is created first (``prefect server database upgrade``,
timed and printed on its own: it happens once per Prefect installation, and took 15 to 20 s of
the first run on 2 cores); ``--fresh-prefect`` leaves it to the backfill instead, as on a
machine where Prefect never ran.  Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
INDEX = "^SYN"


@dataclass(frozen=True)
class RunResult:
    """One ``sensitivity run``: wall seconds, peak RSS (bytes), its exit status, and CPU seconds.

    ``cpu_seconds``: user + system time of the run's process tree (``wait4``: the process
    and the worker processes it waited for); ``server_cpu_seconds``: what the Prefect server
    spent meanwhile (NaN without a server or without psutil).  On a shared VM whose speed
    varies from hour to hour, CPU seconds move less than wall seconds.  ``system_seconds`` and
    ``minor_faults``: the system part of ``cpu_seconds`` and the page faults of the same
    processes (``wait4``); in the VM's slow spells a fault costs 9 to 14 us, and a daily run
    takes hundreds of thousands (benchmarks/README.md, session 21).
    """

    seconds: float
    peak_rss: int
    returncode: int
    output: str
    cpu_seconds: float = float("nan")
    server_cpu_seconds: float = float("nan")
    system_seconds: float = float("nan")
    minor_faults: int = -1


def synthetic_prices(symbols: int, days: int, seed: int = 7) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """Business-day dates and ``[days, symbols + 1]`` closes (column 0: the index); NaN = no row.

    A market model with fat-tailed index returns; every 25th stock lists late and every 40th
    delists; about 0.3% of the other days are missing.
    """
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range(end=pd.Timestamp("2024-12-31"), periods=days)
    market = rng.standard_t(4, days) * 0.008 + 0.0003
    beta = rng.uniform(0.4, 1.8, symbols)
    gamma = rng.normal(0.0, 3.0, symbols)
    noise = rng.normal(0.0, 0.015, (days, symbols))
    stock = 0.0002 + beta * market[:, None] + gamma * market[:, None] ** 2 + noise
    returns = np.column_stack([market, stock])
    prices = 100.0 * np.cumprod(1.0 + returns, axis=0)
    present = rng.random(prices.shape) > 0.003
    present[:, 0] = True
    for j in range(1, symbols + 1):
        if j % 25 == 0:
            present[: int(rng.integers(days // 4, 3 * days // 4)), j] = False
        if j % 40 == 0:
            present[int(rng.integers(days // 2, days - 300)) :, j] = False
    prices[~present] = np.nan
    return dates, prices


def symbol_names(symbols: int) -> list[str]:
    return [f"S{i:04d}" for i in range(1, symbols + 1)]


def yahoo_frame(dates: pd.DatetimeIndex, close: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Yahoo's columns for the rows where ``close`` exists (Adj Close = Close: no actions)."""
    ok = np.isfinite(close)
    c = close[ok]
    spread = 1.0 + np.abs(rng.normal(0.0, 0.004, c.size))
    return pd.DataFrame(
        {
            "Date": dates[ok].strftime("%Y-%m-%d"),
            "Open": c / spread,
            "High": c * spread,
            "Low": c / spread**2,
            "Close": c,
            "Adj Close": c,
            "Volume": rng.integers(10_000, 5_000_000, c.size).astype(np.float64),
        }
    )


def write_source(
    folder: Path, names: list[str], dates: pd.DatetimeIndex, prices: np.ndarray, fmt: str
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for j, name in enumerate([INDEX, *names]):
        frame = yahoo_frame(dates, prices[:, j], rng)
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        else:
            frame.to_parquet(folder / f"{name}.parquet", index=False)


def append_day(folder: Path, names: list[str], day: pd.Timestamp, fmt: str) -> None:
    """Add one trading day ``day`` to every symbol that still trades (the next day's prices)."""
    rng = np.random.default_rng(2)
    for name in [INDEX, *names]:
        path = folder / f"{name}.{fmt}"
        if fmt == "csv":
            last = path.read_text().rstrip("\n").rsplit("\n", 1)[-1].split(",")
        else:
            last = [str(v) for v in pd.read_parquet(path).iloc[-1].tolist()]
        if last[0] != day.strftime("%Y-%m-%d") and pd.Timestamp(last[0]) < day - pd.Timedelta(days=7):
            continue  # delisted: no new row
        close = float(last[4]) * (1.0 + rng.normal(0.0003, 0.01))
        row = yahoo_frame(pd.DatetimeIndex([day]), np.array([close]), rng)
        if fmt == "csv":
            with path.open("a") as fh:
                row.to_csv(fh, index=False, header=False)
        else:
            pd.concat([pd.read_parquet(path), row], ignore_index=True).to_parquet(path, index=False)


def write_config(path: Path, names: list[str], source: Path, data_dir: Path, start: dt.date) -> None:
    tickers = ", ".join(f'"{n}"' for n in names)
    path.write_text(
        f"""[universe]
index = "{INDEX}"
tickers = [{tickers}]
start = {start.isoformat()}

[source]
kind = "files"
path = "{source}"

[model]
window = 252
min_obs = 126

[output]
data_dir = "{data_dir}"
""",
        encoding="utf-8",
    )


def run_cli(
    args: list[str], env: dict[str, str], log: Path, server: subprocess.Popen[bytes] | None = None
) -> RunResult:
    """Run ``sensitivity <args>`` in a subprocess: wall time, the peak RSS and CPU time of its
    process tree, and the CPU time ``server`` (a running Prefect server) spent meanwhile.

    The peak and the CPU time come from ``wait4``: the largest ``ru_maxrss`` of the process
    and of the descendants it waited for, and the sum of their user and system time.
    """
    exe = Path(sys.executable).parent / "sensitivity"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from sensitivity.cli import main; main()"]
    server_before = server_cpu(server)
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return RunResult(
        seconds,
        usage.ru_maxrss * 1024,
        proc.returncode,
        log.read_text(),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        server_cpu_seconds=server_cpu(server) - server_before,
        system_seconds=usage.ru_stime,
        minor_faults=usage.ru_minflt,
    )


def server_cpu(server: subprocess.Popen[bytes] | None) -> float:
    """User + system seconds of ``server`` and its descendants so far (NaN if unknown)."""
    if server is None:
        return float("nan")
    try:
        import psutil
    except ImportError:  # not a dependency of the project: then the column says "-"
        return float("nan")
    try:
        root = psutil.Process(server.pid)
        total = 0.0
        for proc in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total
    except psutil.Error:
        return float("nan")


def create_prefect_database(env: dict[str, str], log: Path) -> float:
    """Create (migrate) Prefect's database under ``env``'s ``PREFECT_HOME``; returns the seconds."""
    exe = Path(sys.executable).parent / "prefect"
    start = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(
            [str(exe), "server", "database", "upgrade", "-y"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"prefect server database upgrade failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``prefect server start`` on 127.0.0.1 (a free port); returns the process and its API URL."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "prefect"
    cmd = [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prefect server start exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the Prefect server did not answer within 180 s; see {log}")


def start_serving(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``sensitivity serve --no-schedules --deployment daily`` from the project root, once it
    serves (its console says so)."""
    exe = Path(sys.executable).parent / "sensitivity"
    # The runner polls for runs to start every 10 s by default; 2 s keeps the benchmark short.
    env = {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    cmd = [str(exe), "serve", "--no-schedules", "--deployment", "daily"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sensitivity serve exited with {proc.returncode}; see {log}")
        if "being served" in log.read_text(errors="replace"):
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"sensitivity serve did not start serving within 180 s; see {log}")


def run_deployment(
    cfg: Path, end: str, env: dict[str, str], log: Path, server: subprocess.Popen[bytes] | None
) -> RunResult:
    """Trigger the served ``daily`` deployment for the next day and wait for it to finish.

    The time is the flow run's from Pending (the serving process took it and starts its
    process) to its final state, read from Prefect's database under ``env``'s
    ``PREFECT_HOME``; CPU time and peak memory are unknown (NaN, 0).
    """
    import re
    import sqlite3

    exe = Path(sys.executable).parent / "prefect"
    cmd = [
        str(exe),
        "deployment",
        "run",
        "stock-sensitivity/daily",
        "--param",
        f"config={cfg}",
        "--param",
        f"end={end}",
        "--watch",
    ]
    server_before = server_cpu(server)
    with log.open("w") as fh:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    output = log.read_text(errors="replace")
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    if done.returncode != 0 or found is None:
        return RunResult(float("nan"), 0, done.returncode or 1, output)
    db = Path(env["PREFECT_HOME"]) / "prefect.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states = dict(
            conn.execute(
                "select type, min(timestamp) from flow_run_state where flow_run_id = ? group by type",
                (found.group(1),),
            ).fetchall()
        )
    if "PENDING" not in states or "COMPLETED" not in states:
        return RunResult(float("nan"), 0, 1, output + f"\nflow run states: {sorted(states)}")
    seconds = (
        dt.datetime.fromisoformat(states["COMPLETED"]) - dt.datetime.fromisoformat(states["PENDING"])
    ).total_seconds()
    return RunResult(seconds, 0, 0, output, server_cpu_seconds=server_cpu(server) - server_before)


def step_times(prefect_home: Path) -> list[tuple[str, float, float, float]]:
    """Per flow run (oldest first): (flow run name, fetch s, fit s, report s) from the Prefect
    database of ``prefect_home`` (the start and end of each task run); empty if unreadable."""
    import sqlite3

    path = prefect_home / "prefect.db"
    if not path.exists():
        return []
    out: list[tuple[str, float, float, float]] = []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            flows = db.execute(
                "select id, name from flow_run where parent_task_run_id is null order by start_time"
            ).fetchall()
            for flow_id, name in flows:
                spans = {}
                for task, lo, hi in db.execute(
                    "select t.name, min(t.start_time), max(t.end_time) from task_run t "
                    "left join flow_run f on t.flow_run_id = f.id "
                    "where t.flow_run_id = ? or f.parent_task_run_id in "
                    "(select id from task_run where flow_run_id = ?) group by substr(t.name, 1, 5)",
                    (flow_id, flow_id),
                ):
                    spans[task[:5]] = (
                        dt.datetime.fromisoformat(hi) - dt.datetime.fromisoformat(lo)
                    ).total_seconds()
                out.append((name, spans.get("fetch", 0.0), spans.get("fit-s", 0.0), spans.get("write", 0.0)))
    except (sqlite3.Error, ValueError, TypeError):
        return []
    return out


def rows_written(data_dir: Path) -> tuple[int, int]:
    """(sensitivity rows, sensitivity files) under ``data_dir``."""
    import pyarrow.dataset as ds

    folder = data_dir / "reports" / "sensitivity"
    files = sorted(folder.glob("*.parquet"))
    return ds.dataset(files, format="parquet").count_rows(), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--years", type=int, default=20)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument(
        "--server",
        action="store_true",
        help="run against a `prefect server start` on 127.0.0.1 (as scheduled deployments do) "
        "instead of the CLI's temporary server",
    )
    parser.add_argument(
        "--fresh-prefect",
        action="store_true",
        help="do not create Prefect's database before the backfill (the backfill then pays for it)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="next-day runs, each from the data folder as the backfill left it (best and median shown)",
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="also run the next day as the served `daily` deployment, triggered by "
        "`prefect deployment run` (implies --server)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.deployment:
        args.server = True

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    names = symbol_names(args.symbols)
    days = 252 * args.years
    source, data_dir, cfg = work / "source", work / "data", work / "config.toml"
    snapshot = work / "data-after-backfill"
    for path in (source, data_dir, snapshot):
        shutil.rmtree(path, ignore_errors=True)
    dates, prices = synthetic_prices(args.symbols, days + 1)
    # The last business day is held back: the incremental run appends it.
    write_source(source, names, dates[:-1], prices[:-1], args.format)
    write_config(cfg, names, source, data_dir, dates[0].date())
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(work / "prefect-home")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    created_db = None
    if not args.fresh_prefect:
        created_db = create_prefect_database(env, work / "prefect-db.log")
    server = None
    if args.server:
        server, env["PREFECT_API_URL"] = start_server(env, work / "server.log")
    print(f"# {args.symbols} symbols + index x {days} trading days ({args.years} years), {args.format} files")
    print(f"# Prefect: {'a running server' if server else 'the temporary server the CLI starts'}")
    print(f"# {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"# work folder: {work}")
    if created_db is not None:
        print(f"# Prefect's database created in {created_db:.1f} s before the runs (once per installation)")
    else:
        print("# Prefect's database: created by the backfill (--fresh-prefect)")

    first = run_cli(
        ["run", "--config", str(cfg), "--end", dates[-2].strftime("%Y-%m-%d")],
        env,
        work / "backfill.log",
        server,
    )
    if first.returncode != 0:
        print(first.output[-4000:])
        raise SystemExit(f"the backfill failed with exit status {first.returncode}")
    rows_full, files_full = rows_written(data_dir)

    append_day(source, names, dates[-1], args.format)
    next_day = dates[-1].strftime("%Y-%m-%d")
    if args.repeat > 1 or args.deployment:  # a later next day starts from the same state
        shutil.copytree(data_dir, snapshot, symlinks=True)

    def from_backfill() -> None:
        """The data folder as the backfill left it again, written out before the next run."""
        shutil.rmtree(data_dir)
        shutil.copytree(snapshot, data_dir, symlinks=True)
        os.sync()

    # (label, "backfill" | "cli" | "deployment", result, rows in sensitivity/ after the run)
    results: list[tuple[str, str, RunResult, int]] = [("full backfill", "backfill", first, rows_full)]
    for i in range(args.repeat):
        if i:
            from_backfill()
        res = run_cli(
            ["run", "--config", str(cfg), "--end", next_day], env, work / f"incremental-{i + 1}.log", server
        )
        if res.returncode != 0:
            print(res.output[-4000:])
            raise SystemExit(f"the incremental run failed with exit status {res.returncode}")
        rows_inc, files_inc = rows_written(data_dir)
        results.append((f"next day (incremental) {i + 1}", "cli", res, rows_inc))
    if args.deployment:
        serving = start_serving(env, work / "serve.log")
        try:
            for i in range(args.repeat):
                from_backfill()
                res = run_deployment(cfg, next_day, env, work / f"deployment-{i + 1}.log", server)
                if res.returncode != 0:
                    print(res.output[-4000:])
                    raise SystemExit(f"the deployment run failed (exit status {res.returncode})")
                results.append(
                    (f"next day, deployment run {i + 1}", "deployment", res, rows_written(data_dir)[0])
                )
        finally:
            serving.terminate()
            serving.wait(timeout=60)
    if server is not None:
        server.terminate()
        server.wait(timeout=30)

    print(
        f"\n| {'run':<34} | {'wall s':>8} | {'CPU s':>7} | {'system s':>8} | {'faults k':>8} "
        f"| {'server CPU s':>12} | {'peak RSS MB':>11} | {'rows in sensitivity/':>20} |"
    )
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 13}|{'-' * 22}|")
    for label, _, res, n in results:
        server_s = "-" if math.isnan(res.server_cpu_seconds) else f"{res.server_cpu_seconds:.1f}"
        cpu_s = "-" if math.isnan(res.cpu_seconds) else f"{res.cpu_seconds:.1f}"
        sys_s = "-" if math.isnan(res.system_seconds) else f"{res.system_seconds:.1f}"
        faults = "-" if res.minor_faults < 0 else f"{res.minor_faults / 1000:.0f}"
        rss = f"{res.peak_rss / 2**20:.0f}" if res.peak_rss else "-"
        print(
            f"| {label:<34} | {res.seconds:8.1f} | {cpu_s:>7} | {sys_s:>8} | {faults:>8} | {server_s:>12} "
            f"| {rss:>11} | {n:>20,} |"
        )
    runs = {kind: [res for _, k, res, _ in results if k == kind] for kind in ("cli", "deployment")}
    for kind, what in (("cli", "next day (sensitivity run)"), ("deployment", "next day as a deployment run")):
        times = [res.seconds for res in runs[kind]]
        if len(times) > 1:
            print(f"{what}: best {min(times):.1f} s, median {float(np.median(times)):.1f} s of {len(times)}")
    steps = step_times(work / "prefect-home")
    if len(steps) >= len(results):
        print(f"\n| {'steps (task runs, s)':<34} | {'fetch':>8} | {'fit':>8} | {'report':>8} | {'rest':>8} |")
        print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
        for (label, _, res, _), (_, fetch, fit, report) in zip(results, steps[-len(results) :], strict=True):
            rest = res.seconds - fetch - fit - report
            print(f"| {label:<34} | {fetch:8.1f} | {fit:8.1f} | {report:8.1f} | {rest:8.1f} |")
        print("rest: Python and Prefect start-up (imports, the API server unless one runs), exit.")
    print("\npeak RSS: the largest process of each run (wait4's ru_maxrss of the run's process tree).")
    print(
        "CPU s: user + system seconds of the run's process tree (its fetch and report workers "
        "included); system s: the part of it spent in the kernel; faults k: minor page faults of "
        "the same processes, in thousands; server CPU s: the Prefect server's meanwhile. Two "
        "cores: a run cannot take less wall time than half of the two together."
    )
    if args.deployment:
        print(
            "deployment run: from the moment the serving process took the run (Pending) to its "
            "end; the wait for the runner's poll is left out, CPU and memory not measured."
        )
    print(f"files in sensitivity/: {files_full} after the backfill, {files_inc} after the next day")
    print(f"load average now: {os.getloadavg()[0]:.2f}")
    if args.json:
        second = min(runs["cli"], key=lambda r: r.seconds)
        args.json.write_text(
            json.dumps(
                {
                    "symbols": args.symbols,
                    "days": days,
                    "format": args.format,
                    "backfill_s": first.seconds,
                    "incremental_s": second.seconds,
                    "incremental_runs_s": [r.seconds for r in runs["cli"]],
                    "deployment_runs_s": [r.seconds for r in runs["deployment"]],
                    "backfill_cpu_s": first.cpu_seconds,
                    "incremental_cpu_s": second.cpu_seconds,
                    "backfill_system_s": first.system_seconds,
                    "incremental_system_s": second.system_seconds,
                    "backfill_minor_faults": first.minor_faults,
                    "incremental_minor_faults": second.minor_faults,
                    "backfill_server_cpu_s": None
                    if math.isnan(first.server_cpu_seconds)
                    else first.server_cpu_seconds,
                    "incremental_server_cpu_s": None
                    if math.isnan(second.server_cpu_seconds)
                    else second.server_cpu_seconds,
                    "peak_rss_bytes": second.peak_rss,
                    "backfill_peak_rss_bytes": first.peak_rss,
                    "rows": rows_inc,
                },
                indent=2,
            )
        )
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
