"""The worker-process pool: same results as the caller alone, whatever a worker does.

Every test runs jobs both ways and compares; the faults (a worker that cannot start, one that
raises, one that hangs, an argument that does not pickle, a worker that prints) must leave the
results those of the caller running everything itself, and never re-run a caller's script.
Each test runs with workers forked by the zygote and with workers started afresh.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sensitivity import process_pool
from sensitivity.process_pool import ProcessPool, available_cpus


@pytest.fixture(autouse=True, params=["forked", "fresh"])
def worker_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Workers forked by a zygote (where the platform allows) or each a fresh interpreter."""
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", request.param == "forked")
    return str(request.param)


def slow_pid(*_: Any) -> int:
    """The caller's stand-in for ``os:getpid``, slow enough that the workers get jobs too."""
    time.sleep(0.05)
    return os.getpid()


def test_jobs_are_shared_and_results_come_back_in_order() -> None:
    with ProcessPool("os:getpid", 2) as pool:
        assert pool.processes == 2
        time.sleep(0.5)  # let the workers boot
        pids = pool.map([() for _ in range(40)], slow_pid)
    assert len(pids) == 40
    workers = set(pids) - {os.getpid()}
    assert workers, "no job ran in a worker"
    assert len(workers) <= 2
    with ProcessPool("math:sqrt", 2) as pool:
        values = pool.map([(float(i),) for i in range(200)], math.sqrt)
    assert values == [math.sqrt(i) for i in range(200)]


def test_submit_then_gather_keeps_the_submission_order() -> None:
    with ProcessPool("math:sqrt", 1) as pool:
        places = [pool.submit(float(i)) for i in range(30)]
        time.sleep(0.3)  # the worker starts on them while the caller does something else
        values = pool.gather(math.sqrt)
        assert places == list(range(30))
        assert values == [math.sqrt(i) for i in range(30)]
        # After gather the workers take no more jobs; later ones run in the caller.
        pool.submit(4.0)
        assert pool.gather(math.sqrt) == [2.0]


def test_a_worker_that_cannot_start_leaves_the_jobs_to_the_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(process_pool, "_BOOT", "import sys; sys.exit(3)")
    with (
        caplog.at_level(logging.WARNING, logger="sensitivity.process_pool"),
        ProcessPool("math:sqrt", 2) as pool,
    ):
        time.sleep(0.3)
        values = pool.map([(float(i),) for i in range(50)], math.sqrt)
    assert values == [math.sqrt(i) for i in range(50)]


def test_a_job_the_worker_fails_is_run_by_the_caller_whose_error_propagates() -> None:
    with ProcessPool("math:sqrt", 2) as pool:
        time.sleep(0.3)
        pool.submit(4.0)
        pool.submit(-1.0)  # ValueError in the worker, then in the caller
        time.sleep(0.3)
        with pytest.raises(ValueError, match="math domain error"):
            pool.gather(math.sqrt)


def test_a_hung_worker_is_stopped_and_its_job_run_by_the_caller() -> None:
    with ProcessPool("time:sleep", 1, hang_s=0.5) as pool:
        time.sleep(0.5)
        pool.submit(60.0)
        time.sleep(0.5)  # the worker has it
        start = time.monotonic()
        assert pool.gather(lambda seconds: f"caller slept {seconds}") == ["caller slept 60.0"]
        assert time.monotonic() - start < 10.0


def test_an_argument_that_does_not_pickle_runs_in_the_caller() -> None:
    with ProcessPool("builtins:callable", 1) as pool:
        time.sleep(0.3)
        pool.submit(lambda: None)
        time.sleep(0.3)
        assert pool.gather(callable) == [True]


def test_what_a_worker_prints_does_not_reach_the_results(capfd: pytest.CaptureFixture[str]) -> None:
    with ProcessPool("builtins:print", 1) as pool:
        time.sleep(0.3)
        for i in range(5):
            pool.submit(f"printed by job {i}")
        time.sleep(0.5)
        results = pool.gather(lambda text: "caller")
    assert None in results  # answered by the worker, through the protocol its prints did not break
    assert set(results) <= {None, "caller"}


def test_no_workers_means_the_caller_runs_everything() -> None:
    with ProcessPool("math:sqrt", 0) as pool:
        assert pool.processes == 0
        assert pool.map([(9.0,)], math.sqrt) == [3.0]
    assert available_cpus() >= 1


def test_the_callers_script_is_never_run_again(tmp_path: Path, worker_kind: str) -> None:
    """Unlike spawn/forkserver pools, a worker does not re-import the caller's ``__main__``."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import math, time
            from pathlib import Path
            from sensitivity import process_pool
            from sensitivity.process_pool import ProcessPool

            process_pool._USE_ZYGOTE = {worker_kind == "forked"}

            marker = Path({str(marker)!r})
            marker.write_text(marker.read_text() + "run\\n" if marker.exists() else "run\\n")
            def slow_sqrt(v):
                time.sleep(0.01)
                return math.sqrt(v)

            with ProcessPool("math:sqrt", 2) as pool:
                time.sleep(0.5)
                print(pool.map([(float(i),) for i in range(100)], slow_sqrt))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "run\n"
    assert done.stdout.strip() == str([math.sqrt(i) for i in range(100)])


def test_workers_leave_ctrl_c_to_the_caller() -> None:
    """Ctrl-C reaches the whole process group; the workers ignore it (no tracebacks), the caller
    handles it and closing the pool ends them."""
    with ProcessPool("math:sqrt", 1) as pool:
        time.sleep(0.5)
        (worker,) = pool._procs
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(0.3)
        assert worker.poll() is None
        pool.submit(16.0)
        time.sleep(0.2)
        assert pool.gather(lambda v: "caller") == [4.0]
    assert worker.poll() == 0


def test_a_worker_whose_caller_was_killed_ends_at_once(tmp_path: Path, worker_kind: str) -> None:
    """``kill -9`` of the caller: its worker stops within a second instead of finishing its job."""
    script = tmp_path / "caller.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from sensitivity import process_pool
            from sensitivity.process_pool import ProcessPool

            process_pool._USE_ZYGOTE = {worker_kind == "forked"}
            pool = ProcessPool("time:sleep", 1)
            time.sleep(0.5)
            pool.submit(60.0)
            time.sleep(0.5)
            print(pool._procs[0].pid, flush=True)
            time.sleep(60)
            """
        )
    )
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    worker = int(caller.stdout.readline())
    assert _running(worker)  # sleeping in its 60 s job
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not _running(worker):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed caller by 5 s")


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for whoever adopted it to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_call_runs_each_threads_job_in_a_worker_and_returns_its_own_result() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ProcessPool("os:getpid", 2) as pool:
        time.sleep(0.5)  # let the workers boot
        with ThreadPoolExecutor(4) as threads:
            pids = list(threads.map(lambda _: pool.call(slow_pid), range(12)))
    # Every job ran in a worker (the calling threads only waited), on at most two of them.
    assert os.getpid() not in pids
    assert 1 <= len(set(pids)) <= 2
    with ProcessPool("math:sqrt", 2) as pool, ThreadPoolExecutor(3) as threads:
        values = list(threads.map(lambda i: pool.call(math.sqrt, float(i)), range(60)))
    assert values == [math.sqrt(i) for i in range(60)]


def test_call_without_a_worker_runs_in_the_calling_thread_at_once() -> None:
    with ProcessPool("os:getpid", 0) as pool:
        start = time.monotonic()
        assert pool.call(os.getpid) == os.getpid()
        assert time.monotonic() - start < 0.1


def test_call_runs_a_job_the_worker_fails_in_the_caller_whose_error_propagates() -> None:
    with ProcessPool("math:sqrt", 1) as pool:
        time.sleep(0.3)
        assert pool.call(lambda x: "caller", -1.0) == "caller"  # the worker raised ValueError
        with pytest.raises(ValueError):
            pool.call(math.sqrt, -1.0)
        assert pool.call(math.sqrt, 16.0) == 4.0  # the worker is still there


def test_call_stops_a_hung_worker_and_runs_the_job_in_the_caller() -> None:
    with ProcessPool("time:sleep", 1, hang_s=0.5) as pool:
        time.sleep(0.5)
        start = time.monotonic()
        assert pool.call(lambda seconds: f"caller slept {seconds}", 60.0) == "caller slept 60.0"
        assert time.monotonic() - start < 10.0
        # The worker is gone: later calls run in the caller straight away.
        assert pool.call(lambda seconds: "caller", 60.0) == "caller"


def test_call_after_a_worker_died_runs_in_the_caller(tmp_path: Path) -> None:
    with ProcessPool("os:_exit", 1) as pool:
        time.sleep(0.3)
        assert pool.call(lambda code: f"caller {code}", 3) == "caller 3"  # the worker exited
        start = time.monotonic()
        assert pool.call(lambda code: "caller again", 3) == "caller again"
        assert time.monotonic() - start < 2.0


def _waiting_call(
    pool: ProcessPool, local: Any, seconds: float
) -> tuple[threading.Thread, list[BaseException]]:
    """A thread that waits in ``pool.call(local, seconds)`` (a worker sleeps on the job), and
    the RuntimeError it gets, if any."""
    errors: list[BaseException] = []

    def wait_for_worker() -> None:
        try:
            pool.call(local, seconds)
        except RuntimeError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_worker)
    waiter.start()
    time.sleep(0.5)  # the worker sleeps on the job
    return waiter, errors


def test_call_refuses_once_the_pool_is_closed_and_a_waiting_thread_does_not_run_the_job() -> None:
    pool = ProcessPool("time:sleep", 1, hang_s=30.0)
    time.sleep(0.3)
    ran_here: list[float] = []
    waiter, errors = _waiting_call(pool, ran_here.append, 3.0)
    pool.close()
    waiter.join(10.0)
    assert not waiter.is_alive()
    assert ran_here == []
    assert len(errors) == 1
    with pytest.raises(RuntimeError, match="closed"):
        pool.call(ran_here.append, 1.0)


def test_close_without_wait_kills_a_busy_worker_at_once() -> None:
    pool = ProcessPool("time:sleep", 1, hang_s=300.0)
    time.sleep(0.3)
    waiter, errors = _waiting_call(pool, time.sleep, 60.0)
    worker = pool._procs[0]
    start = time.monotonic()
    pool.close(wait=False)
    waiter.join(10.0)
    assert time.monotonic() - start < 5.0  # not the 60 s job, nor hang_s
    assert worker.poll() is not None
    assert not waiter.is_alive()
    assert len(errors) == 1


def test_a_stopped_worker_leaves_without_tearing_down_its_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Told to stop, a worker that has answered its jobs exits at once, with status 0: what
    the interpreter runs at exit (here an ``atexit`` handler; in a report worker, the teardown
    of matplotlib and pandas) is skipped, so ``close`` does not wait through it.  What it
    printed, even without a line end, still reaches standard error."""
    (tmp_path / "exit_probe.py").write_text(
        textwrap.dedent(
            """
            import atexit, os, pathlib, sys

            def arm(path):
                atexit.register(pathlib.Path(path).write_text, "the interpreter's teardown ran")
                print("half a line on stdout", end="")
                sys.stderr.write("half a line on stderr")
                return os.getpid()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "teardown.txt"
    with ProcessPool("exit_probe:arm", 1) as pool:
        time.sleep(0.3)  # let the worker boot
        assert pool.call(slow_pid, str(marker)) != os.getpid()  # it ran in the worker
        worker = pool._procs[0]
    assert worker.returncode == 0
    assert not marker.exists()
    printed = capfd.readouterr().err  # the worker's stdout goes to stderr
    assert "half a line on stdout" in printed
    assert "half a line on stderr" in printed


def test_a_pool_takes_the_spares_prestarted_for_its_function_and_starts_the_rest() -> None:
    try:
        assert process_pool.prestart("os:getpid", 2) == 2
        assert process_pool.prestart("math:sqrt", 1) == 1
        with process_pool._SPARES_LOCK:
            spare_pids = {p.pid for p in process_pool._SPARES["os:getpid"]}
        assert process_pool.spares("os:getpid") == 2
        assert process_pool.spares() == 3
        with ProcessPool("os:getpid", 3) as pool:
            assert pool.processes == 3
            assert process_pool.spares("os:getpid") == 0
            assert process_pool.spares("math:sqrt") == 1  # another function's spare is left alone
            pool_pids = {p.pid for p in pool._procs}
            assert spare_pids <= pool_pids  # both spares, plus one started
            time.sleep(0.5)
            pids = pool.map([() for _ in range(40)], slow_pid)
        assert set(pids) - {os.getpid()}, "no job ran in a worker"
        assert set(pids) - {os.getpid()} <= pool_pids
        with ProcessPool("math:sqrt", 1) as pool:  # the sqrt spare serves sqrt
            assert process_pool.spares() == 0
            assert pool.map([(float(i),) for i in range(50)], math.sqrt) == [math.sqrt(i) for i in range(50)]
    finally:
        process_pool.discard_spares()


def test_a_spare_that_died_is_replaced_and_the_results_are_the_callers() -> None:
    try:
        process_pool.prestart("math:sqrt", 1)
        with process_pool._SPARES_LOCK:
            spare = process_pool._SPARES["math:sqrt"][0]
        spare.kill()
        spare.wait()
        with ProcessPool("math:sqrt", 1) as pool:
            assert pool.processes == 1
            assert spare not in pool._procs
            assert pool.map([(float(i),) for i in range(20)], math.sqrt) == [math.sqrt(i) for i in range(20)]
    finally:
        process_pool.discard_spares()


def test_discarded_spares_end_at_once_and_leave_nothing_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    process_pool.prestart("sensitivity.pipeline:fetch_batch_logged", 2)
    with process_pool._SPARES_LOCK:
        procs = list(process_pool._SPARES["sensitivity.pipeline:fetch_batch_logged"])
    started = time.monotonic()
    process_pool.discard_spares()
    assert time.monotonic() - started < 5.0
    assert all(p.poll() is not None for p in procs)
    assert process_pool.spares() == 0
    # A spare whose caller closes its pipe while it waits exits quietly (no traceback).
    process_pool.prestart("math:sqrt", 1)
    with process_pool._SPARES_LOCK:
        proc = process_pool._SPARES.pop("math:sqrt")[0]
    time.sleep(0.5)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    process_pool._close_pipes(proc)
    assert "Traceback" not in capfd.readouterr().err


def _in_caller() -> None:
    return None


@pytest.mark.parametrize("spare", [False, True], ids=["started", "prestarted"])
def test_a_workers_imports_are_frozen_and_its_collector_on(spare: bool) -> None:
    """A worker pauses its garbage collector while it imports its function's module, freezes
    what the imports made (its collections skip them) and collects again for its jobs."""
    try:
        for function in ("gc:get_freeze_count", "gc:isenabled"):
            if spare:
                assert process_pool.prestart(function, 1) == 1
            with ProcessPool(function, 1) as pool:
                result = pool.call(_in_caller)
            assert result is not None, "the job ran in the caller"
            assert result > 1000 if function == "gc:get_freeze_count" else result is True
    finally:
        process_pool.discard_spares()
