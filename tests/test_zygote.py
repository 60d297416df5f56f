"""The worker pool's zygote: workers forked from one interpreter that imported their module once.

The pool's behaviour with forked workers is tested in tests/test_process_pool.py (every test
there runs with both kinds of worker); here, what is particular to the zygote: one import for
all the workers, a new zygote when the caller's environment changes, and what happens when a
zygote dies.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sensitivity import process_pool
from sensitivity.process_pool import ProcessPool

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(socket, "send_fds"), reason="the zygote needs Linux's fd passing"
)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ends(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``import_probe`` that notes the pid of each process importing it."""
    imports = tmp_path / "imports.txt"
    (tmp_path / "import_probe.py").write_text(
        textwrap.dedent(
            f"""
            import os
            with open({str(imports)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")

            def who(*_):
                return os.getpid(), os.getppid()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return imports


def _in_caller(*_: object) -> tuple[int, int]:
    time.sleep(0.05)
    return os.getpid(), os.getppid()


@pytest.mark.parametrize("kind", ["forked", "fresh"])
def test_forked_workers_share_one_import_of_their_module(
    probe: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", kind == "forked")
    try:
        assert process_pool.prestart("import_probe:who", 1) == 1
        with ProcessPool("import_probe:who", 2) as pool:
            workers = {p.pid for p in pool._procs}
            time.sleep(0.5)
            answers = set(pool.map([() for _ in range(40)], _in_caller))
    finally:
        process_pool.discard_spares()
    answers.discard((os.getpid(), os.getppid()))
    assert answers, "no job ran in a worker"
    assert {pid for pid, _ in answers} <= workers
    importers = [int(line) for line in probe.read_text().split()]
    if kind == "forked":
        (zygote,) = importers  # imported once, by the zygote, for both workers
        assert {parent for _, parent in answers} == {zygote}
        assert zygote != os.getpid()
        assert _parent(zygote) == os.getpid()
    else:
        assert sorted(importers) == sorted(workers)  # each worker imported it
        assert {parent for _, parent in answers} == {os.getpid()}


def test_a_changed_environment_gets_a_new_zygote_and_the_old_one_ends_after_its_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    first = ProcessPool("os:getppid", 1)
    try:
        old = first.call(lambda: None)
        assert old is not None
        assert old != os.getpid()
        monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "seen")
        with ProcessPool("os:getenv", 1) as pool:
            # A worker started now sees the environment as it is now, as a fresh one would.
            assert pool.call(lambda name: "caller", "SENSITIVITY_ZYGOTE_PROBE") == "seen"
            (worker,) = pool._procs
            new = _parent(worker.pid)
        assert new not in (old, os.getpid())
        assert _running(old)  # its worker still serves the first pool
        assert first.call(lambda: None) == old
    finally:
        first.close()
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "changed again")
    with ProcessPool("os:getppid", 1) as pool:  # starts a third zygote and retires the idle ones
        third = pool.call(lambda: None)
    assert third not in (old, new)
    assert _ends(old), "the first zygote outlived its workers"
    assert _ends(new), "the second zygote outlived its workers"


def test_a_killed_zygote_takes_its_workers_along_and_the_caller_does_their_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "a zygote of its own")
    with ProcessPool("os:getppid", 2) as pool:
        time.sleep(0.3)
        workers = [p.pid for p in pool._procs]
        zygote = pool.call(lambda: None)
        assert zygote is not None
        assert zygote != os.getpid()
        os.kill(zygote, signal.SIGKILL)
        assert all(_ends(pid) for pid in workers)
        assert all(p.poll() is not None for p in pool._procs)
        assert [pool.call(lambda: "caller") for _ in range(5)] == ["caller"] * 5
    with ProcessPool("os:getppid", 1) as pool:  # the next pool gets a new zygote
        again = pool.call(lambda: None)
    assert again not in (None, zygote, os.getpid())


def test_a_spare_discarded_before_it_was_forked_ends_once_it_is(
    probe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zygote may still be importing when the caller gives a spare up: the spare is
    killed as soon as it exists, and nothing waits for it longer than that."""
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "another zygote")
    (probe.parent / "slow_probe.py").write_text("import time\ntime.sleep(1.0)\n\ndef f():\n    return 1\n")
    assert process_pool.prestart("slow_probe:f", 1) == 1
    with process_pool._SPARES_LOCK:
        (spare,) = process_pool._SPARES["slow_probe:f"]
    started = time.monotonic()
    process_pool.discard_spares()
    assert spare.poll() is not None
    assert time.monotonic() - started < 5.0
    assert spare.returncode == -signal.SIGKILL


def test_warm_imports_in_the_zygote_before_any_worker_is_asked_for(
    probe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "warmed")
    assert process_pool.warm("import_probe:who")
    deadline = time.monotonic() + 10.0
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (zygote,) = [int(line) for line in probe.read_text().split()]
    assert _parent(zygote) == os.getpid()
    with ProcessPool("import_probe:who", 1) as pool:
        pid, parent = pool.call(lambda: (os.getpid(), os.getppid()))
    assert parent == zygote
    assert pid != os.getpid()
    assert probe.read_text().split() == [str(zygote)]  # the worker found it imported


def test_warm_without_a_zygote_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", False)
    assert process_pool.warm("math:sqrt") is False


def test_a_zygote_that_cannot_run_leaves_the_workers_to_start_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    monkeypatch.setattr(process_pool, "_ZYGOTE_FAILED", False)
    monkeypatch.setattr(process_pool, "_ZYGOTE", "import os; os._exit(3)")
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "a zygote that dies")
    with ProcessPool("math:sqrt", 1) as pool:  # its one worker may be lost with the zygote
        assert pool.map([(float(i),) for i in range(20)], lambda v: v**0.5) == [i**0.5 for i in range(20)]
    deadline = time.monotonic() + 5.0
    while not process_pool._ZYGOTES[-1].gone and time.monotonic() < deadline:
        time.sleep(0.05)
    with ProcessPool("os:getppid", 1) as pool:
        assert pool.call(lambda: None) == os.getpid()  # a fresh interpreter, the caller's child
    assert process_pool._ZYGOTE_FAILED


def test_a_process_forked_from_the_caller_starts_a_zygote_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote answers the process that started it only: a child forked from that process
    (``os.fork``, multiprocessing's fork) would share its socket and mix up its answers."""
    monkeypatch.setattr(process_pool, "_USE_ZYGOTE", True)
    monkeypatch.setenv("SENSITIVITY_ZYGOTE_PROBE", "a parent's zygote")
    with ProcessPool("os:getppid", 1) as pool:
        parents = pool.call(lambda: None)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which leaves with os._exit
        code = 1
        try:
            with ProcessPool("os:getppid", 1) as pool:
                os.write(write, str(pool.call(lambda: None)).encode())
            process_pool._stop_zygotes()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        childs = int(answer.read() or 0)
    assert os.waitpid(child, 0)[1] == 0
    assert childs not in (0, parents, child)
    assert _running(parents)  # the child's exit did not end its parent's zygote
    with ProcessPool("os:getppid", 1) as pool:
        assert pool.call(lambda: None) == parents
