"""A small pool of worker processes for a pure function, with the caller as one more worker.

The report draws dozens of charts, and matplotlib holds the GIL while it draws, so threads do
not help; processes do.  The same goes for the local fetches (pandas and pyarrow calls of a
few milliseconds each), whose task threads hand their batches over with
:meth:`ProcessPool.call`.  The standard pools do not fit a library:

* ``spawn`` and ``forkserver`` children (``multiprocessing``, ``ProcessPoolExecutor``) re-run
  the caller's ``__main__`` script to rebuild its module, so a user's unguarded script runs
  its top level again in every worker;
* ``fork`` copies a process whose other threads (Prefect's event loop, its log shipper) may
  hold locks at that instant: the child can deadlock on them.

So each worker here runs a bootstrap of its own (``python -c``): it takes the caller's
``sys.path`` (the same modules), runs an optional initializer, imports the target function by
name and answers jobs on its standard input and output (length-prefixed pickles; what the
worker prints goes to its standard error, never into the protocol).  Nothing of the caller's
``__main__`` is imported.  The workers are forked by a *zygote*, one such interpreter started
for the purpose, which imports each worker's module before forking it: a daily run's three
workers import pandas, pyarrow and matplotlib once instead of three times (about 1.2 CPU s
in all instead of 2.9, on two cores busy with the run's start-up), and share those pages.
The zygote has no threads, so forking it is safe where forking the caller is not; where the
platform cannot pass a pipe to it (not Linux), each worker is a fresh interpreter.
:func:`prestart` starts such workers ahead of the pool that will take them, importing their
function's module while the caller is busy elsewhere.
The pickles travel only on the private pipes between the caller and the workers it started,
never through a file or a socket.

:meth:`ProcessPool.submit` queues a job, which a free worker takes at once; the caller goes on
with its own work meanwhile, and :meth:`ProcessPool.gather` has it run the jobs still queued
with ``local`` beside the workers, so the pool is never slower than the caller alone by more
than the workers' start.  A job a worker fails on -- it raised, it died, it hung for
``hang_s`` or could not be sent -- is run again by ``local`` in the caller, so results (and
exceptions) are those of the caller running everything itself.  The workers and the caller
must compute the same function; this module does not know what it computes.  A worker ignores
Ctrl-C (the caller handles it) and ends when its caller dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import IO, Any

__all__ = ["ProcessPool", "available_cpus", "discard_spares", "prestart", "spares", "warm"]

_log = logging.getLogger(__name__)

#: Length prefix of every message: an unsigned 64-bit big-endian byte count.
_HEADER = struct.Struct(">Q")

#: The worker's program.  It ignores Ctrl-C (the caller handles it and closes the pool, which
#: ends the worker), keeps its original standard output for the protocol and points file
#: descriptor 1 (and ``sys.stdout``) at standard error, reads the setup message, takes the
#: caller's ``sys.path`` and hands over to :func:`serve`.  A spare (:func:`prestart`) is first
#: told only which function it will serve: it imports that function's module, then waits for
#: its setup.  The garbage collector is paused while it imports the function's module
#: (pandas, pyarrow, matplotlib: some 300,000 objects that live as long as the worker), which
#: are then frozen, so that the collections of its jobs do not walk them again and again.  A
#: worker whose caller closes the pipe before its setup exits quietly.  Once
#: :func:`serve` returns (told to stop, or the caller gone) the worker has sent every answer;
#: it flushes what it printed and leaves at once (``os._exit``) instead of tearing down pandas,
#: pyarrow and matplotlib, which took 0.1 to 0.2 s that :meth:`ProcessPool.close` waited through.
_BOOT = """\
import gc, importlib, os, pickle, signal, struct, sys
gc.disable()
signal.signal(signal.SIGINT, signal.SIG_IGN)
proto = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
src = sys.stdin.buffer
def setup():
    head = src.read(8)
    if len(head) < 8:
        os._exit(0)
    data = src.read(struct.unpack(">Q", head)[0])
    message = pickle.loads(data)
    if message is None:
        os._exit(0)
    sys.path[:] = message["sys_path"]
    return message
def load(name):
    try:
        importlib.import_module(name.partition(":")[0])
    except Exception:
        pass  # serve() imports it again and the caller hears why
message = setup()
if "preload" in message:
    load(message["preload"])
    message = setup()
load(message["function"])
gc.freeze()
gc.enable()
from sensitivity.process_pool import serve
serve(src, proto, message)
try:
    sys.__stdout__.flush()
    sys.stderr.flush()
finally:
    os._exit(0)
"""

#: Marks a job no worker has answered.
_PENDING = object()


#: The zygote's program: one interpreter that imports the workers' modules once and forks a
#: worker for each request (:class:`_Zygote`).  It has no thread of its own (the fork is
#: safe), ignores Ctrl-C like the workers, and reads requests on an anonymous socket pair
#: from its caller: a JSON text (a ticket, the caller's ``sys.path`` and the module to import
#: first) with the worker's two pipe ends attached (without them, it only imports: :func:`warm`).
#: A forked worker runs :data:`_BOOT`, which
#: the zygote was given on its command line, as a fresh worker does.  It answers with
#: fixed-size records of integers: ``(1, ticket, pid)`` once forked, ``(2, pid, status)``
#: once it has reaped a worker.  It leaves when its caller closes the socket or dies; its
#: workers then see their parent gone and leave too (:func:`serve`).
_ZYGOTE = """\
import gc, importlib, json, os, select, signal, socket, struct, sys
gc.disable()
signal.signal(signal.SIGINT, signal.SIG_IGN)
control = socket.socket(fileno=int(sys.argv[1]))
program = compile(sys.argv[2], "<worker>", "exec")
wake_r, wake_w = os.pipe()
os.set_blocking(wake_r, False)
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda *_: None)
reply = struct.Struct(">Bqq")
def tell(*values):
    try:
        control.send(reply.pack(*values))
    except OSError:
        os._exit(0)  # the caller has gone
def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        tell(2, pid, os.waitstatus_to_exitcode(status))
def become_worker(fds):
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(fds[0], 0)
    os.dup2(fds[1], 1)
    for fd in (*fds, wake_r, wake_w, control.detach()):
        os.close(fd)
    exec(program, {"__name__": "__worker__"})
while True:
    ready = select.select([control, wake_r], [], [])[0]
    if wake_r in ready:
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass
        reap()
    if control not in ready:
        continue
    data, fds, _, _ = socket.recv_fds(control, 1 << 20, 2)
    if not data:
        os._exit(0)
    request = json.loads(data)
    sys.path[:] = request["sys_path"]
    if request["preload"]:
        try:
            importlib.import_module(request["preload"].partition(":")[0])
        except BaseException:
            pass  # the worker imports it again and its caller hears why
        gc.freeze()
    if len(fds) != 2:  # only the import, ahead of the workers (warm)
        for fd in fds:
            os.close(fd)
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            become_worker(fds)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    tell(1, request["ticket"], pid)
"""

#: The zygote's answers: (kind, ticket or pid, pid or exit status).
_REPLY = struct.Struct(">Bqq")
_FORKED, _EXITED = 1, 2


class _Zygote:
    """An interpreter that forks the workers, so that their modules are imported only once.

    A worker started afresh spends about a second importing pandas and pyarrow (matplotlib
    for the report's), and a daily run starts three.  The zygote is such an interpreter too,
    started as ``python -c`` like them (so nothing of the caller's ``__main__`` runs in it,
    and the caller itself, with its threads, is never forked); it imports each worker's
    module before forking it, the worker then finds it imported, and its pages are shared
    until written.  Each worker gets its own two pipes from the caller (passed over the
    socket pair) and speaks the same protocol as a fresh one; :class:`_Forked` is its handle.

    A zygote forks only for a caller whose working folder, environment and standard error
    are still those it was started with (a worker sees the caller's as they are when it
    starts); after a change :func:`_zygote` starts another.  Where the platform cannot pass
    file descriptors or fork, each worker is a fresh interpreter as before.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, program: str) -> None:
        self._proc = proc
        self._sock = sock
        self._program = program
        self._owner = os.getpid()
        self._born = _process_state()
        self._tickets = 0
        self._cond = threading.Condition()
        self._pids: dict[int, int] = {}  # ticket -> pid
        self._exits: dict[int, int] = {}  # pid -> exit status
        self._kill_on_fork: set[int] = set()
        self.gone = False
        threading.Thread(target=self._read, name="process-pool-zygote", daemon=True).start()

    @classmethod
    def start(cls) -> _Zygote | None:
        """A new zygote, or None where one cannot run here."""
        if not (sys.executable and hasattr(os, "fork") and hasattr(socket, "send_fds")):
            return None  # pragma: no cover - not Linux/macOS, or Python without send_fds
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except (OSError, AttributeError):  # pragma: no cover - no SOCK_SEQPACKET (macOS)
            return None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE, str(theirs.fileno()), _BOOT],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            _log.debug("could not start the zygote (%s); workers start afresh", exc)
            return None
        finally:
            theirs.close()
        return cls(proc, ours, _BOOT)

    def serves_now(self) -> bool:
        """Whether a worker forked now would start as a fresh one would (zygote alive, and
        the caller's working folder, environment and standard error unchanged)."""
        return (
            not self.gone
            and self._owner == os.getpid()  # (a child this process forked starts its own)
            and self._program == _BOOT
            and _process_state() == self._born
        )

    def owned(self) -> bool:
        """Whether this process started the zygote (not a forked copy of the one that did)."""
        return self._owner == os.getpid()

    def failed(self) -> bool:
        """Whether it ended without forking a single worker (it cannot run here)."""
        with self._cond:
            return self.gone and not self._pids

    def idle(self) -> bool:
        """Whether every worker it was asked for has been forked and has ended."""
        with self._cond:
            return self.gone or (
                len(self._pids) == self._tickets and all(p in self._exits for p in self._pids.values())
            )

    def fork(self, preload: str | None) -> _Forked | None:
        """A worker forked once ``preload``'s module is imported, or None if the request failed."""
        try:
            child_in, ours_in = os.pipe()
        except OSError:
            return None
        try:
            ours_out, child_out = os.pipe()
        except OSError:
            os.close(child_in)
            os.close(ours_in)
            return None
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
        try:
            socket.send_fds(self._sock, [_request(ticket, preload)], [child_in, child_out])
        except OSError as exc:
            os.close(ours_in)
            os.close(ours_out)
            _log.debug("the zygote did not take a request (%s); a worker starts afresh", exc)
            return None
        finally:
            os.close(child_in)
            os.close(child_out)
        return _Forked(self, ticket, os.fdopen(ours_in, "wb"), os.fdopen(ours_out, "rb"))

    def preload(self, function: str) -> bool:
        """Have the zygote import ``function``'s module now, ahead of the workers it will fork."""
        try:
            self._sock.send(_request(-1, function))
        except OSError:
            return False
        return True

    def pid(self, ticket: int) -> int:
        """The pid of the worker for ``ticket``, once forked (waits for it)."""
        with self._cond:
            self._cond.wait_for(lambda: ticket in self._pids or self.gone)
            if ticket not in self._pids:
                raise ProcessLookupError("the zygote ended before it started this worker")
            return self._pids[ticket]

    def status(self, ticket: int, timeout: float | None) -> int | None:
        """The worker's exit status once it has ended (waiting up to ``timeout``), else None."""

        def known() -> bool:
            pid = self._pids.get(ticket)
            return pid in self._exits if pid is not None else self.gone

        with self._cond:
            if not self._cond.wait_for(known, timeout):
                return None
            pid = self._pids.get(ticket)
            return self._exits[pid] if pid is not None else -signal.SIGKILL

    def kill(self, ticket: int) -> None:
        """Kill the worker for ``ticket`` (as soon as it is forked, if it is not yet)."""
        with self._cond:
            pid = self._pids.get(ticket)
            if pid is None:
                self._kill_on_fork.add(ticket)
            elif pid not in self._exits:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """End the zygote (the workers it forked see it gone and end too)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - it leaves on end of input
            _kill(self._proc)
        self._sock.close()

    def _read(self) -> None:
        """Take in the zygote's answers until it ends; then its workers are gone too."""
        while True:
            try:
                data = self._sock.recv(_REPLY.size)
            except OSError:
                data = b""
            if len(data) != _REPLY.size:
                break
            kind, a, b = _REPLY.unpack(data)
            with self._cond:
                if kind == _FORKED:
                    self._pids[a] = b
                    if a in self._kill_on_fork:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(b, signal.SIGKILL)
                elif kind == _EXITED:
                    self._exits[a] = b
                self._cond.notify_all()
        with self._cond:
            self.gone = True
            for pid in self._pids.values():
                if pid not in self._exits:  # orphaned: it would leave within a quarter second
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self._exits[pid] = -signal.SIGKILL
            self._cond.notify_all()


class _Forked:
    """A worker forked by a :class:`_Zygote`: the parts of ``subprocess.Popen`` the pool uses."""

    def __init__(self, zygote: _Zygote, ticket: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._zygote = zygote
        self._ticket = ticket

    @property
    def pid(self) -> int:
        return self._zygote.pid(self._ticket)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.status(self._ticket, 0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._zygote.status(self._ticket, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"worker {self._ticket}", timeout or 0.0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self._zygote.kill(self._ticket)


def _request(ticket: int, preload: str | None) -> bytes:
    """A request to the zygote: import ``preload``'s module with the caller's ``sys.path``,
    then fork the worker for ``ticket`` when the worker's pipes come with it."""
    return json.dumps({"ticket": ticket, "sys_path": list(sys.path), "preload": preload or ""}).encode()


#: A worker process: started afresh, or forked by the zygote.
_Worker = subprocess.Popen[bytes] | _Forked


def _process_state() -> tuple[str, dict[str, str], tuple[int, int] | None]:
    """What a worker takes from its caller when it starts, besides ``sys.path``: the working
    folder, the environment and where standard error goes."""
    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed
        cwd = ""
    try:
        err = os.fstat(2)
        stderr: tuple[int, int] | None = (err.st_dev, err.st_ino)
    except OSError:
        stderr = None
    return cwd, dict(os.environ), stderr


_ZYGOTE_LOCK = threading.Lock()
#: The zygotes started, the one in use last; the others end once their workers have.
_ZYGOTES: list[_Zygote] = []
#: Whether workers are forked by a zygote where they can be (else each starts afresh).
_USE_ZYGOTE = True
#: Set once a zygote ended before forking anything: this process's workers start afresh.
_ZYGOTE_FAILED = False


def _zygote() -> _Zygote | None:
    """The zygote to fork a worker now: the current one while the caller's folder,
    environment and standard error are those it started with, else a new one (None where
    none can start).  Zygotes left behind end once their workers have."""
    global _ZYGOTE_FAILED
    with _ZYGOTE_LOCK:
        if _ZYGOTE_FAILED:
            return None
        current = _ZYGOTES[-1] if _ZYGOTES else None
        if current is not None and current.serves_now():
            return current
        if current is not None and current.owned() and current.failed():
            _log.debug("the zygote ended before it forked a worker; workers start afresh")
            _ZYGOTES.remove(current)
            current.close()  # (it has ended: only reaped here)
            _ZYGOTE_FAILED = True
            return None
        zygote = _Zygote.start()
        retired = [z for z in _ZYGOTES if z.owned() and z.idle()]
        _ZYGOTES[:] = [z for z in _ZYGOTES if z not in retired]
        if zygote is not None:
            _ZYGOTES.append(zygote)
    for old in retired:
        old.close()
    return zygote


def warm(*functions: str) -> bool:
    """Start the zygote now and have it import the modules of ``functions`` (``"module:name"``)
    while this process does something else; the workers it forks later find them imported.

    For a process that will create pools soon but does not know yet how many workers (a
    flow run's process, before it has read its configuration).  False where workers are not
    forked by a zygote (they then import their modules when they start).
    """
    zygote = _zygote() if _USE_ZYGOTE else None
    return zygote is not None and all(zygote.preload(f) for f in functions)


def _stop_zygotes() -> None:
    """End the zygotes (at exit, after :func:`discard_spares`)."""
    with _ZYGOTE_LOCK:
        zygotes = [z for z in _ZYGOTES if z.owned()]  # (a forked copy's are its parent's)
        _ZYGOTES.clear()
    for zygote in zygotes:
        zygote.close()


atexit.register(_stop_zygotes)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _resolve(name: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, _, qualname = name.partition(":")
    obj: Any = import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{name} is not callable")
    return obj  # type: ignore[no-any-return]


def _send(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next message, or raise ``EOFError`` when the other side has gone."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the other side closed the pipe")
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed the pipe mid-message")
    return pickle.loads(data)


def serve(source: IO[bytes], sink: IO[bytes], setup: dict[str, Any]) -> None:
    """The worker's loop: answer ``(job, args)`` with ``(job, ok, result or error text)`` until
    ``None`` or end of input.  A worker whose caller died (``kill -9``) ends at once instead of
    finishing its job unseen."""
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=orphaned, name="process-pool-orphan-watch", daemon=True).start()
    initializer = setup.get("initializer")
    if initializer is not None:
        _resolve(initializer)(*setup.get("initargs", ()))
    function = _resolve(setup["function"])
    while True:
        try:
            message = _receive(source)
        except EOFError:
            return
        if message is None:
            return
        job, args = message
        try:
            answer = (job, True, function(*args))
        except Exception as exc:  # reported, and the caller runs the job itself
            answer = (job, False, f"{type(exc).__name__}: {exc}")
        try:
            _send(sink, answer)
        except OSError:  # the caller has gone (killed, or it closed the pipe): nothing to tell
            return


def _start_worker(preload: str | None = None) -> _Worker | None:
    """A worker waiting for its first message, or None if none can start.

    Forked by the zygote (which imports ``preload``'s module first, once for all its
    workers) where it can be (:class:`_Zygote`), else a fresh interpreter.
    """
    if not sys.executable:
        return None
    zygote = _zygote() if _USE_ZYGOTE else None
    if zygote is not None:
        forked = zygote.fork(preload)
        if forked is not None:
            return forked
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
    except OSError as exc:
        _log.warning("could not start a worker process (%s); the caller does its share", exc)
        return None


#: Spare workers started by :func:`prestart`, by the function they will serve.
_SPARES: dict[str, list[_Worker]] = {}
_SPARES_LOCK = threading.Lock()


def prestart(function: str, processes: int) -> int:
    """Start ``processes`` spare workers for ``function`` now; the next pools for it take them.

    Each spare is a worker interpreter that imports ``function``'s module at once and then
    waits: a :class:`ProcessPool` for the same ``function`` created later takes spares before
    starting workers of its own, and finds them ready instead of waiting a second or so for
    each to import pandas or matplotlib.  A program that knows early which pools it will
    create (``sensitivity run`` knows from its configuration, before it imports Prefect and
    torch on its one busy core) lets them start on the idle ones.  Spares no pool took are
    ended by :func:`discard_spares`, and at the latest when this process exits.  Returns how
    many started.
    """
    started: list[_Worker] = []
    for _ in range(max(0, processes)):
        proc = _start_worker(function)
        if proc is None:
            break
        assert proc.stdin is not None
        try:
            _send(proc.stdin, {"sys_path": list(sys.path), "preload": function})
        except OSError:
            _kill(proc)
            continue
        started.append(proc)
    if started:
        with _SPARES_LOCK:
            _SPARES.setdefault(function, []).extend(started)
    return len(started)


def spares(function: str | None = None) -> int:
    """Spare workers waiting (for ``function``, or for any)."""
    with _SPARES_LOCK:
        if function is not None:
            return len(_SPARES.get(function, []))
        return sum(len(v) for v in _SPARES.values())


def _take_spares(function: str, processes: int) -> list[_Worker]:
    """Up to ``processes`` spares for ``function`` that are still alive, taken out of the pool."""
    taken: list[_Worker] = []
    with _SPARES_LOCK:
        waiting = _SPARES.get(function, [])
        while waiting and len(taken) < processes:
            proc = waiting.pop(0)
            if proc.poll() is None:
                taken.append(proc)
            else:
                _close_pipes(proc)
    return taken


def discard_spares() -> None:
    """End every spare worker no pool took (killed: a spare holds no work, at most a half-done
    import)."""
    with _SPARES_LOCK:
        procs = [p for waiting in _SPARES.values() for p in waiting]
        _SPARES.clear()
    for proc in procs:
        _kill(proc)
        _close_pipes(proc)


atexit.register(discard_spares)


class ProcessPool:
    """Up to ``processes`` worker interpreters running ``function`` (``"module:name"``).

    ``initializer`` (``"module:name"``) runs once in each worker with ``initargs`` before any
    job, as in :class:`concurrent.futures.ProcessPoolExecutor`.  Spares :func:`prestart`
    started for the same ``function`` are taken first; the rest are started here.  A worker
    that cannot be started is left out (the caller does its share).  Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        function: str,
        processes: int,
        *,
        initializer: str | None = None,
        initargs: Sequence[Any] = (),
        hang_s: float = 300.0,
    ) -> None:
        self._hang_s = hang_s
        self._procs: list[_Worker] = []
        self._jobs: list[tuple[Any, ...]] = []
        self._results: list[Any] = []
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._feeders: list[tuple[threading.Thread, _Worker]] = []
        #: For :meth:`call`: one lock over the job lists, an event per job answered (or given
        #: up) by a worker, and the worker and start time of each job in hand.
        self._guard = threading.Lock()
        self._answered: dict[int, threading.Event] = {}
        self._in_hand: dict[int, tuple[_Worker, float]] = {}
        self._closed = False
        setup = {
            "sys_path": list(sys.path),
            "function": function,
            "initializer": initializer,
            "initargs": tuple(initargs),
        }
        spares = _take_spares(function, max(0, processes))
        for _ in range(max(0, processes)):
            proc = spares.pop(0) if spares else _start_worker(function)
            if proc is None:
                break
            assert proc.stdin is not None  # for mypy: PIPE was asked for
            try:
                _send(proc.stdin, setup)
            except OSError:  # a spare that died meanwhile, or a worker that could not start
                _kill(proc)
                continue
            self._procs.append(proc)
            feeder = threading.Thread(
                target=self._feed, args=(proc,), name="process-pool-feeder", daemon=True
            )
            feeder.start()
            self._feeders.append((feeder, proc))

    @property
    def processes(self) -> int:
        """Workers started and not yet closed."""
        return len(self._procs)

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, *args: Any) -> int:
        """Queue one job (a worker may start on it at once); returns its place in :meth:`gather`."""
        i = len(self._jobs)
        self._jobs.append(args)
        self._results.append(_PENDING)
        self._todo.put(i)
        return i

    def gather(self, local: Callable[..., Any]) -> list[Any]:
        """The results of every job submitted, in order; the caller runs jobs with ``local`` too.

        The caller takes queued jobs until none is left, then waits for the workers' last ones.
        Every job a worker did not answer with a result (it raised, died or hung) is run by
        ``local`` afterwards, in the caller, whose exception, if any, propagates.  The workers
        take no jobs after this; later submissions run in the caller at the next call.
        """
        try:
            while True:
                try:
                    i = self._todo.get_nowait()
                except queue.Empty:
                    break
                if i is not None:
                    self._results[i] = local(*self._jobs[i])
        finally:
            self._stop_feeders()
        results, jobs = self._results, self._jobs
        self._results, self._jobs = [], []
        for i, value in enumerate(results):
            if value is _PENDING:
                results[i] = local(*jobs[i])
        return results

    def call(self, local: Callable[..., Any], *args: Any) -> Any:
        """``local(*args)`` as computed by a free worker; the calling thread waits for it.

        Several threads may call at once (each gets its own job's result), so a thread pool
        can hand its work to the workers without doing it under its own GIL.  When no worker
        answers the job -- none is running, it raised, it died, or it hung for ``hang_s`` (then
        it is stopped) -- the calling thread runs ``local(*args)`` itself, whose exception, if
        any, propagates.  Do not mix with :meth:`submit` and :meth:`gather` on one pool.
        Raises ``RuntimeError`` once the pool is closed (the caller is shutting it down, as
        on Ctrl-C: the waiting threads must not start the work themselves).
        """
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if not self._feeders:
            return local(*args)
        answered = threading.Event()
        with self._guard:
            i = len(self._jobs)
            self._jobs.append(args)
            self._results.append(_PENDING)
            self._answered[i] = answered
        self._todo.put(i)
        while not answered.wait(0.2):
            if self._closed:
                break
            held = self._in_hand.get(i)
            if held is not None and time.monotonic() - held[1] > self._hang_s:
                _log.warning("a worker process took over %.0f s on one job; stopped it", self._hang_s)
                _kill(held[0])  # its feeder sees the pipe close and gives the job up
            elif held is None and not any(feeder.is_alive() for feeder, _ in self._feeders):
                break  # no worker left to take it
        with self._guard:
            value = self._results[i]
            self._results[i] = None  # (the pool keeps no result once handed over)
            self._jobs[i] = ()
            del self._answered[i]
        if value is _PENDING and self._closed:
            raise RuntimeError("the worker pool was closed before it answered")
        return local(*args) if value is _PENDING else value

    def map(self, jobs: Sequence[tuple[Any, ...]], local: Callable[..., Any]) -> list[Any]:
        """``[local(*args) for args in jobs]``, shared between the workers and the caller."""
        for args in jobs:
            self.submit(*args)
        return self.gather(local)

    def _stop_feeders(self) -> None:
        """Empty the queue and let each worker finish its job in hand (stopped after ``hang_s``)."""
        while True:
            try:
                self._todo.get_nowait()
            except queue.Empty:
                break
        feeders, self._feeders = self._feeders, []
        for _ in feeders:
            self._todo.put(None)
        for feeder, proc in feeders:
            feeder.join(self._hang_s)
            if feeder.is_alive():
                _log.warning("a worker process took over %.0f s on one job; stopped it", self._hang_s)
                _kill(proc)
                feeder.join()

    def _feed(self, proc: _Worker) -> None:
        """Hand ``proc`` one queued job at a time until told to stop or the worker fails."""
        assert proc.stdin is not None
        assert proc.stdout is not None
        while True:
            i = self._todo.get()
            if i is None:
                return
            self._in_hand[i] = (proc, time.monotonic())
            try:
                _send(proc.stdin, (i, self._jobs[i]))
                job, ok, value = _receive(proc.stdout)
            except Exception as exc:
                # Not sent (an argument that does not pickle) or no answer (the worker died):
                # the job stays pending and the caller runs it; this worker takes no more.
                # (Killed by close(wait=False): the caller stopped it, nothing to report.)
                if not self._closed:
                    _log.warning(
                        "worker process failed (%s: %s); the caller takes its jobs", type(exc).__name__, exc
                    )
                _kill(proc)
                self._done_with(i)
                return
            if ok and job == i:
                self._results[i] = value
            else:
                _log.debug("worker could not run job %d (%s); the caller runs it", i, value)
            self._done_with(i)

    def _done_with(self, i: int) -> None:
        """Job ``i`` is answered or given up: wake its :meth:`call`, if any."""
        self._in_hand.pop(i, None)
        answered = self._answered.get(i)
        if answered is not None:
            answered.set()

    def close(self, *, wait: bool = True) -> None:
        """Stop every worker (a clean exit when idle; killed if it does not exit in 5 s).

        Jobs not gathered yet are dropped; threads waiting in :meth:`call` get ``RuntimeError``.
        With ``wait`` (the default) a worker first finishes the job in hand (up to ``hang_s``);
        without, every worker is killed at once, its job abandoned (for a caller that is
        being interrupted: the jobs must leave nothing half-done that matters, as the store's
        atomic writes do not).
        """
        self._closed = True
        if not wait:
            for proc in self._procs:
                _kill(proc)
        self._stop_feeders()
        procs, self._procs = self._procs, []
        for proc in procs:
            try:
                assert proc.stdin is not None
                _send(proc.stdin, None)
                proc.stdin.close()
            except OSError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def _kill(proc: _Worker) -> None:
    """Kill ``proc`` and reap it (its pipes are closed by :meth:`ProcessPool.close`)."""
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def _close_pipes(proc: _Worker) -> None:
    """Close this side's pipes of a worker that has ended."""
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
