"""Battery, part 4: the process dies, the disk fills up, two runs meet, the user presses Ctrl-C.

``kill -9`` and Ctrl-C need a real process: ``hooked_writer.py`` runs the pipeline (or the
command line) and stops in the middle of writing one chosen file, half of its bytes in the
temporary file, so that the signal lands exactly there.  The other faults run in this process.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import battery
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import Universe

import sensitivity.store as store_mod
from sensitivity.store import INPUTS_KEY, PriceStore

pytestmark = pytest.mark.usefixtures("prefect_harness")

AS_OF = "2020-02-26"  # the last of the 40 trading days


def _start(
    pattern: str, mode: str, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(battery.HOOKED), pattern, mode, *(str(a) for a in args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "QUICK_REPORT": "1", **(env or {})},
    )


def _wait_for_midwrite(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """The path the process is stuck writing (it printed ``MIDWRITE <path>``)."""
    assert proc.stdout is not None
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("MIDWRITE "):
                found.append(line.split(" ", 1)[1].strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the helper never reached the write: {err[-2000:]}")
    return found[0]


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; any still running at the end is killed (by its own pid)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _unstamp(path: Path) -> None:
    """Drop a per-day file's stamp, as an older version wrote it, so that the next run
    rewrites the file (a rerun with nothing new leaves stamped files alone)."""
    table = pq.read_table(path)
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != INPUTS_KEY}
    pq.write_table(table.replace_schema_metadata(meta), path)


# -- kill -9 in the middle of a write ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "target"),
    [
        pytest.param("KO.parquet", "prices/KO.parquet", id="price-store-write"),
        pytest.param("*__KO__w20.parquet", "reports/sensitivity/^GSPC__KO__w20.parquet", id="table-write"),
        pytest.param("report.html", f"reports/daily/{AS_OF}/report.html", id="report-write"),
    ],
)
def test_kill9_mid_write_keeps_the_previous_file_and_the_next_run_recovers(
    files_universe: Universe, reap: list[subprocess.Popen[str]], pattern: str, target: str
) -> None:
    u = files_universe
    if target.startswith("reports/sensitivity/"):
        _unstamp(u.data / target)
    clean = battery.tables(u.data)
    before = battery.checksums(u.data)
    proc = _start(pattern, "steps", u.config, u.data)
    reap.append(proc)
    stuck = _wait_for_midwrite(proc)
    assert stuck == str(u.data / target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    after = battery.checksums(u.data)
    assert after[target] == before[target]  # the previous file, byte for byte
    if target.endswith("report.html"):
        manifest = f"reports/daily/{AS_OF}/manifest.json"
        assert after[manifest] == before[manifest]
    # the half-written temporary file stays, hidden (with any other write the kill cut short)
    temps = battery.temp_files(u.data)
    assert all(t.parent == (u.data / target).parent and f".{proc.pid}." in t.name for t in temps), temps
    (temp,) = [t for t in temps if t.name.startswith(f".{Path(target).name}.{proc.pid}.")]
    assert temp.stat().st_size > 0
    assert len(pd.read_parquet(u.data / "prices")) > 0  # readers skip it
    assert len(pd.read_parquet(u.data / "reports" / "sensitivity")) > 0

    battery.assert_succeeded(battery.run(u.config, u.data))  # the lock died with the process
    assert battery.temp_files(u.data) == []
    battery.assert_same_tables(clean, battery.tables(u.data))


def test_kill9_while_the_head_start_prepares_writes_nothing_and_the_next_run_recovers(
    files_universe: Universe, tmp_path: Path
) -> None:
    """`sensitivity run` prepares the fetch in worker processes while it starts up
    (sensitivity.head_start); killed then, with merged price files prepared under temporary
    names, it has stored nothing: no price file appears, and the next run removes the
    temporaries and stores what a clean run stores."""
    u = files_universe
    clean = battery.tables(u.data)
    source = {"kind": "files", "path": str(u.csv), "retries": 0, "retry_delay_s": 0, "concurrency": 1}
    config = tmp_path / "head-start.toml"
    config.write_text(battery.config_text(source) + "fetch_processes = 2\n")  # (in [runtime])
    data = tmp_path / "fresh"
    env = {**os.environ, "QUICK_REPORT": "1"}
    env.pop("PREFECT_API_URL", None)  # a temporary server: the flow is seconds away
    exe = Path(sys.executable).with_name("sensitivity")
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(config), "--data-dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its workers and server die with it
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not battery.temp_files(data):
            time.sleep(0.01)
        prepared = battery.temp_files(data)
        assert prepared, "no fetch was prepared"
        assert not list((data / "prices").glob("*.parquet"))  # nothing committed yet
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    time.sleep(0.5)  # (the workers notice their parent's death within 0.25 s)
    assert not list((data / "prices").glob("*.parquet"))
    assert not (data / "reports").exists()
    assert all(t.parent == data / "prices" for t in battery.temp_files(data))

    battery.assert_succeeded(battery.run(u.config, data))
    assert battery.temp_files(data) == []
    battery.assert_same_tables(clean, battery.tables(data))


# -- write errors ---------------------------------------------------------------------------------------


def _failing_write(monkeypatch: pytest.MonkeyPatch, pattern: str, error: OSError) -> None:
    """Every store write of a file named like ``pattern`` writes a few bytes, then fails."""
    import fnmatch

    real = store_mod.PreparedFile

    class Hooked(real):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, write: Callable[[IO[bytes]], None], **options: Any) -> None:
            if not fnmatch.fnmatch(Path(path).name, pattern):
                super().__init__(path, write, **options)
                return

            def broken(fh: IO[bytes]) -> None:
                fh.write(b"PAR1 the first bytes")
                raise error

            super().__init__(path, broken, **options)

    monkeypatch.setattr(store_mod, "PreparedFile", Hooked)


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_on_a_price_write_stops_the_run_and_changes_nothing(
    files_universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    u = files_universe
    before = battery.checksums(u.data)
    _failing_write(monkeypatch, "*.parquet", _enospc())
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(
        outcome,
        4,
        r"^error: cannot write .*/prices/(\^GSPC|KO|MSFT)\.parquet: the disk is full \(free some space and "
        r"rerun\); the previous file was left unchanged$",
    )
    assert battery.checksums(u.data) == before
    assert battery.temp_files(u.data) == []


def test_disk_full_on_the_report_write_keeps_the_previous_report(
    files_universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    u = files_universe
    before = battery.checksums(u.data)
    _failing_write(monkeypatch, "report.html", _enospc())
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(
        outcome, 4, rf"^error: cannot write .*/daily/{AS_OF}/report\.html: the disk is full"
    )
    after = battery.checksums(u.data)
    reports = {k: v for k, v in before.items() if k.startswith("reports/")}
    assert {k: after[k] for k in reports} == reports
    assert battery.temp_files(u.data) == []


def test_permission_denied_on_a_table_write_is_a_store_error(
    files_universe: Universe, monkeypatch: pytest.MonkeyPatch
) -> None:
    u = files_universe
    _unstamp(u.data / "reports/sensitivity/^GSPC__MSFT__w20.parquet")
    before = battery.checksums(u.data)
    _failing_write(monkeypatch, "*__MSFT__*", PermissionError(errno.EACCES, "Permission denied"))
    outcome = battery.run(u.config, u.data)
    battery.assert_refused(
        outcome,
        4,
        r"^error: cannot write .*__MSFT__w20\.parquet: permission denied \(check the folder's permissions",
    )
    after = battery.checksums(u.data)
    key = "reports/sensitivity/^GSPC__MSFT__w20.parquet"
    assert after[key] == before[key]
    assert battery.temp_files(u.data) == []


# -- two runs at once -------------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from sensitivity.store import store_lock
with store_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(data: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_store_locked_by_another_run_stops_with_status_5(
    files_universe: Universe, reap: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    u = files_universe
    config = battery.files_config(tmp_path / "short-wait.toml", u.csv, lock_timeout_s=0.5)
    before = battery.checksums(u.data)
    holder = _hold_lock(u.data, 120)
    reap.append(holder)
    outcome = battery.run(config, u.data)
    battery.assert_refused(
        outcome,
        5,
        rf"^error: another run \(pid {holder.pid}, started [-0-9T:+]+\) is writing to {u.data}; wait for it "
        r"to finish or pass a different --data-dir$",
    )
    assert battery.checksums(u.data) == before


def test_second_run_waits_for_the_first_and_then_succeeds(
    files_universe: Universe, reap: list[subprocess.Popen[str]]
) -> None:
    u = files_universe  # lock_timeout_s = 5
    clean = battery.tables(u.data)
    reap.append(_hold_lock(u.data, 1.5))
    t0 = time.monotonic()
    battery.assert_succeeded(battery.run(u.config, u.data))
    assert time.monotonic() - t0 >= 1.0
    battery.assert_same_tables(clean, battery.tables(u.data))


def _cli_env() -> dict[str, str]:
    """For a CLI subprocess: the session's Prefect server (no temporary server to start)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, url
    assert url.startswith("http://127.0.0.1:"), url
    return {"PREFECT_API_URL": url}


def test_two_cli_runs_at_once_leave_the_store_of_one_clean_run(
    files_universe: Universe, reap: list[subprocess.Popen[str]]
) -> None:
    u = files_universe
    clean = battery.tables(u.data)
    args = ("run", "--config", u.config, "--data-dir", u.data)
    both = [_start("-no-file-", "cli", *args, env=_cli_env()) for _ in range(2)]
    reap.extend(both)
    for proc in both:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    battery.assert_same_tables(clean, battery.tables(u.data))
    assert battery.temp_files(u.data) == []


# -- Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_mid_report_write_exits_130_and_keeps_the_store(
    files_universe: Universe, reap: list[subprocess.Popen[str]]
) -> None:
    u = files_universe
    clean = battery.tables(u.data)
    before = battery.checksums(u.data)
    proc = _start("report.html", "cli", "run", "--config", u.config, "--data-dir", u.data, env=_cli_env())
    reap.append(proc)
    assert _wait_for_midwrite(proc) == str(u.data / "reports" / "daily" / AS_OF / "report.html")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "interrupted: nothing half-written was kept; rerun to finish", err
    assert "Traceback" not in err
    after = battery.checksums(u.data)
    reports = {k: v for k, v in before.items() if k.startswith("reports/")}
    assert {k: after[k] for k in reports} == reports  # the report it was writing: the previous one
    assert battery.temp_files(u.data) == []  # the interrupted write removed its temporary file
    for symbol in battery.SYMBOLS:  # every stored file still reads
        assert PriceStore(u.data).read(symbol) is not None
    battery.assert_succeeded(battery.run(u.config, u.data))
    battery.assert_same_tables(clean, battery.tables(u.data))
