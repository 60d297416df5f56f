"""The Parquet store: the only code in ``sensitivity`` that writes to disk.

Layout under ``<data_dir>``::

    .lock                                         the writers' lock (see store_lock)
    prices/<SYMBOL>.parquet                       one price history per symbol     PRICE_SCHEMA
                                                  (+ the ranges fetched: COVERAGE_KEY)
    reports/sensitivity/<INDEX>__<TICKER>__w<WINDOW>.parquet
                                                  one file per (index_ticker, ticker, window)
                                                                                   SENSITIVITY_SCHEMA
    reports/summary/summary-<AS_OF>.parquet       one file per as_of date          SUMMARY_SCHEMA
    reports/scenarios/scenarios-<AS_OF>.parquet   one file per as_of date          SCENARIO_SCHEMA
    reports/daily/<AS_OF>/report.html             the human report of that as_of
    reports/daily/<AS_OF>/manifest.json           its machine manifest (written last)

Each report folder is a plain (non-hive) Parquet dataset: ``pandas.read_parquet(folder)``,
``pyarrow.dataset.dataset(folder)``, polars and DuckDB read it as one table.  File names never
use ``key=value`` folders, so partition discovery adds no columns.

**Schemas.**  Every file carries explicit pyarrow types (float64 stays float64: values are
cast with ``safe=True`` and never rounded) and two key-value metadata entries,
``sensitivity.schema_version`` and ``sensitivity.kind``.  A file written by a newer version
of the package, a file that is not ours and a damaged file are refused with a
:class:`~sensitivity.errors.StoreError` that names the file and says what to do.
Each kind has its own version (:data:`SCHEMA_VERSIONS`); a file of an older version is read
with the columns added since filled in (documented defaults, else null), so older report
files stay readable next to new ones.

**Paths.**  Symbols become file names only through
:func:`sensitivity.symbols.normalize_symbol` plus a check that the resolved path stays in its
folder, so no ticker string can reach outside ``<data_dir>``.

**Atomic writes.**  A file is written to a dot-prefixed temporary file in the same folder,
flushed and fsynced, moved over the target with :func:`os.replace`, and the folder is
fsynced.  On any failure the temporary file is removed and the previous file is untouched.
Readers and pyarrow datasets ignore dot-prefixed files; temporary files left by a killed
process are removed by the next write in that folder.

**Locking.**  Writers hold :func:`store_lock` while they write; readers need no lock (they
only ever see complete files).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import json
import math
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal, NamedTuple, NoReturn, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sensitivity.errors import DataValidationError, StoreError, StoreLockedError
from sensitivity.prices import (
    POSITIVE_COLUMNS,
    PRICE_COLUMNS,
    PriceArrays,
    check_price_arrays,
    check_price_frame,
    date_index,
    epoch_day,
    float_columns,
)
from sensitivity.process_pool import available_cpus
from sensitivity.symbols import normalize_symbol

Kind = Literal["prices", "sensitivity", "summary", "scenarios"]
_T = TypeVar("_T")
_R = TypeVar("_R")

#: Version of each on-disk schema.  Bump a kind's version when a column is added, removed or
#: retyped, and teach the readers to upgrade files of the older versions (:data:`_UPGRADES`).
#: Version 2 of ``sensitivity`` and ``summary`` added the robust-inference, convexity-test,
#: up/down, excess-return and Huber columns (and ``fit`` to the summary).
SCHEMA_VERSIONS: Final[dict[Kind, int]] = {"prices": 1, "sensitivity": 2, "summary": 2, "scenarios": 1}

#: The newest schema version of any kind.
SCHEMA_VERSION: Final = max(SCHEMA_VERSIONS.values())

#: Parquet key-value metadata keys.
VERSION_KEY: Final = b"sensitivity.schema_version"
KIND_KEY: Final = b"sensitivity.kind"
#: Key of a per-day file's :class:`InputsStamp` in its Parquet metadata.
INPUTS_KEY: Final = b"sensitivity.inputs"
#: Price files only: the date ranges fetched into the file, JSON ``[["YYYY-MM-DD", "YYYY-MM-DD"], ...]``
#: (a fetch covers its whole range even where the source had no prices, e.g. before a listing).
COVERAGE_KEY: Final = b"sensitivity.coverage"
#: Price files only: what the source reported it had checked of the symbol's data when the
#: file was last merged (an opaque text, handed back to the next fetch; see
#: :attr:`~sensitivity.sources.quality.CheckedPrices.checked_prefix`).  Absent: nothing.
CHECKED_PREFIX_KEY: Final = b"sensitivity.source_checked"

#: A date range, both ends inclusive.
DateRange = tuple[dt.date, dt.date]

#: Parquet compression of every file.
COMPRESSION: Final = "zstd"

#: Files read or written at once by the batch readers and writers (Arrow releases the GIL).
_MAX_IO_THREADS: Final = 8


def _schema(fields: Sequence[pa.Field], kind: Kind) -> pa.Schema:
    return pa.schema(
        list(fields),
        metadata={VERSION_KEY: str(SCHEMA_VERSIONS[kind]).encode(), KIND_KEY: kind.encode()},
    )


#: A price history: one row per trading date, with when and from where each row was fetched.
PRICE_SCHEMA: Final = _schema(
    [
        pa.field("date", pa.date32(), nullable=False),
        *(pa.field(c, pa.float64()) for c in PRICE_COLUMNS),
        pa.field("fetched_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    "prices",
)

_KEY_FIELDS: Final = [
    pa.field("date", pa.date32(), nullable=False),
    pa.field("index_ticker", pa.string(), nullable=False),
    pa.field("ticker", pa.string(), nullable=False),
    pa.field("window", pa.int64(), nullable=False),
    pa.field("n_obs", pa.int64(), nullable=False),
]
_VALUE_COLUMNS: Final = (
    "index_return",
    "stock_return",
    "alpha",
    "beta",
    "gamma",
    "sensitivity",
    "sensitivity_se",
    "sensitivity_ci_lower",
    "sensitivity_ci_upper",
    "alpha_se",
    "beta_se",
    "gamma_se",
    "linear_beta",
    "r2",
    "close",
    "prev_close",
    "dollar_sensitivity",
)
#: Float columns added by schema version 2, after ``se_type``.
_V2_VALUE_COLUMNS: Final = (
    "risk_free_return",
    "cov_alpha_beta",
    "cov_alpha_gamma",
    "cov_beta_gamma",
    "gamma_t",
    "gamma_p",
    "aic_linear",
    "aic_quadratic",
    "delta_aic",
    "secant_slope",
    "up_beta",
    "down_beta",
    "huber_alpha",
    "huber_beta",
    "huber_gamma",
    "huber_alpha_se",
    "huber_beta_se",
    "huber_gamma_se",
    "huber_cov_alpha_beta",
    "huber_cov_alpha_gamma",
    "huber_cov_beta_gamma",
    "huber_sensitivity",
    "huber_sensitivity_se",
)

#: The per-day sensitivity table (``reports/sensitivity/``), columns in this order.
SENSITIVITY_SCHEMA: Final = _schema(
    [
        *_KEY_FIELDS,
        *(pa.field(c, pa.float64()) for c in _VALUE_COLUMNS),
        pa.field("se_type", pa.string(), nullable=False),
        *(pa.field(c, pa.float64()) for c in _V2_VALUE_COLUMNS),
    ],
    "sensitivity",
)

#: The summary table (``reports/summary/``): ``as_of``, the sensitivity columns, then ``fit``
#: (the estimator the run's scenarios used).
SUMMARY_SCHEMA: Final = _schema(
    [
        pa.field("as_of", pa.date32(), nullable=False),
        *SENSITIVITY_SCHEMA,
        pa.field("fit", pa.string(), nullable=False),
    ],
    "summary",
)

#: The scenario table (``reports/scenarios/``): per combination of the as_of and index move,
#: the fitted return and price move of the latest fit, with their interval for the mean.
SCENARIO_SCHEMA: Final = _schema(
    [
        pa.field("as_of", pa.date32(), nullable=False),
        pa.field("index_ticker", pa.string(), nullable=False),
        pa.field("ticker", pa.string(), nullable=False),
        pa.field("window", pa.int64(), nullable=False),
        pa.field("date", pa.date32(), nullable=False),
        pa.field("n_obs", pa.int64(), nullable=False),
        pa.field("fit", pa.string(), nullable=False),
        pa.field("se_type", pa.string(), nullable=False),
        pa.field("level", pa.float64(), nullable=False),
        pa.field("index_move", pa.float64(), nullable=False),
        *(
            pa.field(c, pa.float64())
            for c in (
                "risk_free_return",
                "predicted_return",
                "predicted_return_se",
                "predicted_return_ci_lower",
                "predicted_return_ci_upper",
                "close",
                "price_move",
                "price_move_ci_lower",
                "price_move_ci_upper",
            )
        ),
    ],
    "scenarios",
)

#: How files of an older schema version are read: per kind and version, the columns they lack
#: and the value each gets (None: null).  Version-1 tables were always classical OLS fits on
#: raw returns.
_UPGRADES: Final[dict[Kind, dict[int, dict[str, Any]]]] = {
    "sensitivity": {1: {"se_type": "classical", "risk_free_return": 0.0}},
    "summary": {1: {"se_type": "classical", "risk_free_return": 0.0, "fit": "ols"}},
}
_V2_ADDED: Final = ("se_type", *_V2_VALUE_COLUMNS)

SENSITIVITY_COLUMNS: Final[tuple[str, ...]] = tuple(SENSITIVITY_SCHEMA.names)
#: The columns of ``reports/sensitivity/`` that the pipeline adds to the library's table
#: (:data:`sensitivity.api.OUTPUT_COLUMNS`, the others in the same order) from the index
#: symbol and the prices.
PIPELINE_COLUMNS: Final[tuple[str, ...]] = ("index_ticker", "close", "prev_close", "dollar_sensitivity")
SUMMARY_COLUMNS: Final[tuple[str, ...]] = tuple(SUMMARY_SCHEMA.names)
SCENARIO_COLUMNS: Final[tuple[str, ...]] = tuple(SCENARIO_SCHEMA.names)

_SCHEMAS: Final[dict[Kind, pa.Schema]] = {
    "prices": PRICE_SCHEMA,
    "sensitivity": SENSITIVITY_SCHEMA,
    "summary": SUMMARY_SCHEMA,
    "scenarios": SCENARIO_SCHEMA,
}
_COMBO: Final = ("index_ticker", "ticker", "window")

_HINTS: Final[dict[Kind, str]] = {
    "prices": "delete it and rerun to refetch the prices",
    "sensitivity": "delete it and rerun to recompute it",
    "summary": "restore it from a backup, or delete it and rerun for that as_of date",
    "scenarios": "delete it and rerun for that as_of date",
}


class _DamagedFileError(StoreError):
    """A store file exists but is not a readable Parquet file (a full rewrite may replace it)."""


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def _child(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any name that would resolve outside ``folder``."""
    seps = {os.sep, os.altsep} - {None}
    if not name or name.startswith(".") or any(s in name for s in seps if s) or "\x00" in name:
        raise StoreError(f"{name!r} cannot be used as a file name in {folder} (it would leave the folder)")
    path = folder / name
    # Only a symbolic link can lead a plain name out of its folder: anything else resolves to
    # the folder's own resolution plus the name.  One lstat instead of resolving both paths
    # component by component (0.1 ms a call; a daily run names about 1,500 store files).
    try:
        linked = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        linked = False
    except OSError:
        linked = True  # (a parent that is not a folder, no permission): resolve to find out
    if linked and path.resolve().parent != folder.resolve():
        raise StoreError(f"{name!r} resolves outside {folder}; refusing to read or write it there")
    return path


def _symbol_file_part(symbol: object, what: str) -> str:
    """The normalised symbol; raises :class:`~sensitivity.errors.ConfigError` if implausible."""
    return normalize_symbol(symbol, what=what)


def _temp_name(final: str) -> str:
    return f".{final}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


_TEMP_RE: Final = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{12})\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    except OSError:  # pragma: no cover - exotic platforms: assume alive, never delete
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (Linux: state ``Z`` in /proc): a
    killed writer whose parent died too stays so where nothing reaps orphans (a container
    whose first process does not), and writes nothing more."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:  # no /proc (not Linux), or it has just gone: as os.kill said
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
    state = stat.rfind(b")") + 2
    return stat[state : state + 1] == b"Z"


def _remove_stale_temps(folder: Path) -> None:
    """Remove temporary files that a killed writer left in ``folder``.

    Only files matching the store's temp-name pattern and naming a process that no longer
    exists are removed; a write in progress (in this or another live process) is left alone.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    me = os.getpid()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == me or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)


#: The folders a batch of writes has looked at for stale temporary files (None: no batch).
_SWEPT: ContextVar[set[Path] | None] = ContextVar("sensitivity_store_swept", default=None)


@contextlib.contextmanager
def one_sweep_per_folder() -> Iterator[None]:
    """Within the block, a write looks for stale temporary files (:func:`_remove_stale_temps`)
    in a folder the first time only, not on every file.

    For a batch of writes to one folder: a fetch listed the folder of price files once per
    symbol, quadratic in the universe (measured: 0.3-0.7 ms a look among 500 files, 0.2-0.4 s a
    run; 1.9-4.3 ms among 3,000, 6-13 s a run; the more the prepared files waiting for their
    commit, the slower).  A temporary file left by a writer killed during the batch is removed
    by the next batch.  Per thread and per context (a :class:`~contextvars.ContextVar`), so
    it does not reach threads a pool starts inside the block: a writer that spreads its files
    over threads looks once itself and passes ``sweep=False``, as :func:`write_tables_atomic`
    does.  Nestable.
    """
    token = _SWEPT.set(set())
    try:
        yield
    finally:
        _SWEPT.reset(token)


def _sweep(folder: Path) -> None:
    """:func:`_remove_stale_temps` of ``folder``, unless this batch has looked there already."""
    swept = _SWEPT.get()
    if swept is not None:
        if folder in swept:
            return
        swept.add(folder)
    _remove_stale_temps(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystems that cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "the disk is full (free some space and rerun)"
    if isinstance(exc, PermissionError):
        return "permission denied (check the folder's permissions or pass a different --data-dir)"
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], *, sync_dir: bool = True) -> Path:
    """Write a file atomically: ``write(fileobj)`` fills a temporary file that replaces ``path``.

    The temporary file is dot-prefixed and lives in the same folder (so the final
    :func:`os.replace` is atomic); it is flushed and fsynced before the replace, and the folder
    is fsynced after it (a batch writer may pass ``sync_dir=False`` and sync the folder once
    at the end).  On any exception the temporary file is removed and the previous file at
    ``path`` is left exactly as it was; I/O and Arrow errors become a
    :class:`~sensitivity.errors.StoreError` naming ``path``.  Returns ``path``.
    """
    return PreparedFile(path, write).commit(sync_dir=sync_dir)


class PreparedFile:
    """A file written and fsynced beside ``path`` under a temporary name, not yet in place.

    :meth:`commit` puts it in place atomically (``os.replace``, then the folder's fsync);
    :meth:`discard` removes it.  Splitting :func:`write_atomic` lets a writer do the slow
    part (encoding, fsync) before it takes the store's lock and hold the lock only for the
    check that nothing changed meanwhile and the rename.  A prepared file never committed
    is removed by :meth:`discard` (call it in a ``finally``), or, if its process dies, by
    the next writer in the folder.  Errors are as in :func:`write_atomic`.  ``sweep=False``
    skips that removal, for a batch writer that did it once for all its files.  ``hold``:
    keep the file open as :attr:`held` (closed by :meth:`discard`).
    """

    def __init__(
        self, path: str | Path, write: Callable[[IO[bytes]], None], *, sweep: bool = True, hold: bool = False
    ) -> None:
        self.target = Path(path)
        #: With ``hold``: the file, held open (after :meth:`commit`, the one at ``target``).
        self.held: HeldFile | None = None
        folder = self.target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create folder {folder} for {self.target.name}: {_describe_os_error(exc)}"
            ) from exc
        if sweep:
            _sweep(folder)
        self._tmp: Path | None = folder / _temp_name(self.target.name)
        try:
            fd = os.open(self._tmp, (os.O_RDWR if hold else os.O_WRONLY) | os.O_CREAT | os.O_EXCL, 0o666)
            if hold:
                self.held = HeldFile(os.dup(fd), self.target)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:
            self._failed(exc)

    def commit(self, *, sync_dir: bool = True) -> Path:
        """Replace the target with the prepared file (and fsync the folder); returns the target."""
        if self._tmp is None:
            raise StoreError(f"{self.target}: the prepared file was already committed or discarded")
        try:
            os.replace(self._tmp, self.target)
        except BaseException as exc:
            self._failed(exc)
        self._tmp = None
        if sync_dir:
            _sync_folder(self.target.parent, self.target.name)
        return self.target

    def pending(self) -> bool:
        """Whether the prepared file is still there to commit (not committed, discarded or
        removed: a writer's temporary file outlives it only while its process runs)."""
        return self._tmp is not None and os.path.exists(self._tmp)

    def discard(self) -> None:
        """Remove the prepared file unless it was committed (idempotent)."""
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            if self.held is not None:
                self.held.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _failed(self, exc: BaseException) -> NoReturn:
        self.discard()
        if isinstance(exc, OSError | pa.ArrowException):
            raise StoreError(
                f"cannot write {self.target}: {_describe_os_error(exc)}; the previous file was left unchanged"
            ) from exc
        raise exc


def _sync_folder(folder: Path, what: str) -> None:
    try:
        _fsync_dir(folder)
    except OSError as exc:  # pragma: no cover - the files are in place; only durability is at stake
        raise StoreError(
            f"wrote {what} in {folder} but could not sync the folder: {_describe_os_error(exc)}"
        ) from exc


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data for {path} must be bytes, got {type(data).__name__}")
    payload = bytes(data)

    def _write(fh: IO[bytes]) -> None:
        fh.write(payload)

    return write_atomic(path, _write)


def write_table_atomic(
    path: str | Path, table: pa.Table, *, sync_dir: bool = True, distinct: Collection[str] | None = None
) -> Path:
    """Write an Arrow ``table`` as zstd-compressed Parquet to ``path`` atomically
    (``distinct``: as in :func:`prepare_table`)."""
    return prepare_table(path, table, distinct=distinct).commit(sync_dir=sync_dir)


def prepare_table(
    path: str | Path,
    table: pa.Table,
    *,
    sweep: bool = True,
    plain_floats: bool = False,
    distinct: Collection[str] | None = None,
    row_group_size: int | None = None,
) -> PreparedFile:
    """:func:`write_table_atomic` up to the rename: the :class:`PreparedFile` to commit.

    ``plain_floats``: leave the float columns uncompressed (the others stay zstd).  The
    per-day table's floats are model outputs whose mantissas do not compress: zstd saved 7%
    of their size (481 against 543 MB at 500 tickers x 20 years) for about twice the time
    to write and to read them back (1.67 against 1.11 s and 1.2-2.4 against 0.8-0.9 s).
    ``distinct``: the columns the caller knows hold distinct values (see
    :func:`_dictionary_columns`); None: counted.  ``row_group_size``: rows per row group
    (None: pyarrow's default, one group up to a million rows).
    """

    def _write(fh: IO[bytes]) -> None:
        # Encoded in memory, then written at once: Arrow writes every page to a Python file
        # object holding the GIL, so a batch's writer threads took turns at each page
        # (measured: about 0.5 ms of a 4 to 5 ms file, with less of the threads' waiting).
        fh.write(_encoded(table, plain_floats=plain_floats, distinct=distinct, row_group_size=row_group_size))

    return PreparedFile(path, _write, sweep=sweep)


def _encoded(
    table: pa.Table,
    *,
    plain_floats: bool,
    distinct: Collection[str] | None,
    row_group_size: int | None,
) -> pa.Buffer:
    """``table`` as a Parquet file in memory, written as :func:`prepare_table` describes."""
    dictionary = _dictionary_columns(table, distinct)
    compression: str | dict[str, str] = COMPRESSION
    if plain_floats:
        compression = {f.name: "none" if pa.types.is_floating(f.type) else COMPRESSION for f in table.schema}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression=compression, use_dictionary=dictionary, row_group_size=row_group_size
    )
    return sink.getvalue()


#: Rows per row group of a per-day file (``reports/sensitivity/``; about eight years).  A
#: daily run decodes a file's last group only and copies the groups before it as bytes
#: (:meth:`ReportStore.read_sensitivity_tails`, :func:`prepare_spliced_table`): the smaller
#: the groups, the fewer rows it decodes and encodes again, the more groups' metadata it
#: walks (about 0.8 ms each).
SENSITIVITY_ROW_GROUP: Final = 2048


class HeldFile:
    """A stored file held open, so that its bytes stay readable as they were when it was
    read even after another file is renamed over its path (the store never changes a file in
    place).  Closed by :meth:`close` or when the last reference goes.  ``metadata``: the
    file's parsed footer where the reader has it (a later read then need not parse it
    again)."""

    def __init__(self, fd: int, path: Path | None = None, metadata: pq.FileMetaData | None = None) -> None:
        self.fd = fd
        self.path = path
        self.metadata = metadata
        self._finalizer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def mapped(self) -> pa.BufferReader:
        """The file's bytes, mapped (the mapping lives as long as what is read from it)."""
        if self.closed:  # its number may already name another file
            raise OSError(errno.EBADF, f"{self.path or 'the held file'} was closed")
        return pa.BufferReader(pa.py_buffer(mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)))

    def hold_instead(self, other: HeldFile) -> None:
        """Hold ``other``'s file from now on (``other`` gives it up) and close this one's.

        For a file whose bytes, as far as they are read through this object, are this one's:
        a spliced per-day file holds the row groups of the file it was spliced from byte for
        byte (:func:`prepare_spliced_table`).  The file given up is closed here, in the
        caller's thread: once another file was renamed over it, closing its last descriptor
        frees its blocks (about 0.6 ms for a twenty-year per-day file), which a daily run's
        writer threads then do side by side instead of the run's last step, one by one.
        """
        if other.closed:
            raise OSError(errno.EBADF, f"{other.path or 'the held file'} was closed")
        _, _, (fd,), _ = other._finalizer.detach()  # type: ignore[misc]
        previous = self._finalizer
        self.fd, self.path, self.metadata = fd, other.path, other.metadata
        self._finalizer = weakref.finalize(self, os.close, fd)
        previous()


@dataclass(frozen=True)
class Splice:
    """A file's first ``rows`` rows, its first ``bytes`` bytes, to copy from ``source`` (the
    file as it was read) into the file that replaces it (:func:`prepare_spliced_table`)."""

    rows: int
    bytes: int
    source: HeldFile


def prepare_spliced_table(
    path: Path,
    tail: pa.Table,
    *,
    kept_rows: int,
    kept_bytes: int,
    source: HeldFile,
    row_group_size: int,
    plain_floats: bool = False,
    distinct: Collection[str] | None = None,
) -> PreparedFile | None:
    """A file for ``path``: the first ``kept_rows`` rows of the file held as ``source`` (whole
    row groups of ``row_group_size`` rows, its first ``kept_bytes`` bytes: see
    :func:`kept_row_groups`) copied as bytes, then ``tail`` encoded after them; a
    :class:`PreparedFile` to commit.

    The result is byte for byte the file :func:`prepare_table` writes for those rows and
    ``tail`` with the same settings (see :mod:`sensitivity.parquet_splice`; tested), and its
    footer is checked before it is written.  Returns None where ``source``'s footer or schema
    is not one to splice ``tail`` after.
    """
    from sensitivity.parquet_splice import MAGIC, Footer, SpliceError, read_footer, splice_footer

    keep = kept_rows // row_group_size
    if keep < 1 or keep * row_group_size != kept_rows:
        raise ValueError(f"kept_rows must be a positive multiple of {row_group_size}, got {kept_rows}")
    src = source.fd
    try:
        size = os.fstat(src).st_size
        end = os.pread(src, min(size, 1 << 16), max(0, size - (1 << 16)))
        footer_len = int.from_bytes(end[-8:-4], "little") if len(end) >= 8 else 0
        if footer_len + 8 > len(end) and footer_len + 8 <= size:
            end = os.pread(src, footer_len + 8, size - footer_len - 8)
        old = Footer.parse(read_footer(end), groups=keep)
        encoded = _encoded(tail, plain_floats=plain_floats, distinct=distinct, row_group_size=row_group_size)
        tail_bytes = memoryview(encoded)
        new = Footer.parse(read_footer(tail_bytes), groups=0)
        if old.schema != new.schema or old.num_row_groups < keep or kept_bytes > size:
            return None
        footer = splice_footer(old, keep, kept_rows, new, kept_bytes - 4)
    except SpliceError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {_describe_os_error(exc)}") from exc
    closing = len(footer).to_bytes(4, "little") + MAGIC
    check = pq.read_metadata(pa.BufferReader(MAGIC + footer + closing))
    rows = kept_rows + tail.num_rows
    if check.num_rows != rows or check.num_row_groups != -(-rows // row_group_size):  # pragma: no cover
        raise StoreError(f"{path}: the spliced footer does not describe the rows; nothing was written")
    chunks = tail_bytes[4 : len(tail_bytes) - 8 - len(new.data)]

    def _write(fh: IO[bytes]) -> None:
        fh.flush()
        _copy_range(src, fh.fileno(), kept_bytes)
        fh.seek(kept_bytes)
        fh.write(chunks)
        fh.write(footer)
        fh.write(closing)

    prepared = PreparedFile(path, _write, sweep=False, hold=True)
    if prepared.held is not None:
        prepared.held.metadata = check  # the footer written: no second parse to read it back
    return prepared


@functools.cache
def _created_by() -> str:
    """What this pyarrow writes as a Parquet file's ``created_by``."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": pa.array([1])}), sink)
    return str(pq.read_metadata(pa.BufferReader(sink.getvalue())).created_by)


def kept_row_groups(md: pq.FileMetaData, rows: int, file_size: int) -> int | None:
    """Where the file of ``md`` (``file_size`` bytes) ends its row groups but the last, if a
    splice can keep them (:func:`prepare_spliced_table`): this pyarrow wrote it, in groups
    of ``rows`` rows (the last one at most), at least two, their chunks one after another
    from byte 4 to the footer (no page index, no bloom filter).  None otherwise."""
    n = md.num_row_groups
    if n < 2 or md.created_by != _created_by():
        return None
    footer_start = file_size - 8 - md.serialized_size
    return _kept_bytes(md, n - 1, rows, footer_start)


def _kept_bytes(md: pq.FileMetaData, keep: int, rows: int, data_end: int) -> int | None:
    """Where the file of ``md`` ends its first ``keep`` row groups, if each holds ``rows``
    rows with its chunks one after another from byte 4, and nothing but chunks (no page
    index, no bloom filter) lies before its footer at ``data_end``; else None."""
    if md.num_row_groups < keep:
        return None
    offset = kept = 4
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        if g < keep and group.num_rows != rows:
            return None
        if g == keep:
            kept = offset
        for c in range(group.num_columns):
            col = group.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            if first != offset or col.has_column_index or col.has_offset_index or col.bloom_filter_offset:
                return None
            offset += col.total_compressed_size
    if offset != data_end:
        return None
    return offset if keep == md.num_row_groups else kept


def _copy_range(src: int, dst: int, count: int) -> None:
    """Copy the first ``count`` bytes of ``src`` to ``dst`` at its position (in the kernel
    where it can: no pass through this process's memory)."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, done)
            if n == 0:
                raise OSError(errno.EIO, "the file ended before the bytes to copy")
            done += n
        return
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (
            errno.ENOSYS,
            errno.EXDEV,
            errno.EINVAL,
            errno.EOPNOTSUPP,
            errno.EPERM,
        ):
            raise
    while done < count:  # no copy_file_range here (or not between these files): read and write
        piece = os.pread(src, min(1 << 20, count - done), done)
        if not piece:
            raise OSError(errno.EIO, "the file ended before the bytes to copy")
        done += os.write(dst, piece)


#: The distinct columns of a price or per-day file: one row per date (``check_price_frame``;
#: both per-day writers check it); the rest repeat (a price file's ``fetched_at``, one time
#: per fetch, and ``source``; a per-day file's combination, ``n_obs``, mostly the window,
#: and ``se_type``).
ONE_ROW_PER_DATE: Final = ("date",)


def _dictionary_columns(table: pa.Table, distinct: Collection[str] | None = None) -> list[str]:
    """The columns worth dictionary-encoding: the repetitive ones (symbols, sources, windows,
    the dates of a summary).  Not the floats, which are mostly distinct and compress better
    plain, nor a column whose values are all distinct (the dates of a price or per-day file):
    its dictionary would repeat the column and add the indices (about 10% slower to write,
    and larger).  ``distinct``: those columns, as the caller knows them (the others are then
    taken as repetitive); None: counted, column by column (0.2 s for 500 per-day files)."""
    names = []
    for f in table.schema:
        if pa.types.is_floating(f.type):
            continue
        if distinct is not None:
            if f.name not in distinct:
                names.append(f.name)
            continue
        column = table.column(f.name)
        if table.num_rows > 1 and pc.count_distinct(column, mode="all").as_py() == table.num_rows:
            continue
        names.append(f.name)
    return names


def _io_workers(n: int) -> int:
    return max(1, min(_MAX_IO_THREADS, n))


def _map_io(fn: Callable[[_T], _R], items: Sequence[_T], *, workers: int | None = None) -> list[_R]:
    """``[fn(item) for item in items]`` a few at a time on threads (file reads), in order;
    ``workers``: at most that many threads (decoding is CPU work: one per CPU)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    n = _io_workers(len(items)) if workers is None else max(1, min(workers, len(items)))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="store-read") as pool:
        return list(pool.map(fn, items))


def write_tables_atomic(
    plans: Sequence[tuple[Path, pa.Table]],
    *,
    plain_floats: bool = False,
    distinct: Collection[str] | None = None,
    row_group_size: int | None = None,
    splices: Mapping[Path, Splice] | None = None,
) -> list[Path]:
    """Write several tables, each atomically, a few at a time; sync each folder once.

    Every file is complete or untouched.  If some writes fail, the others still finish
    before the first failure is raised, so no write is left running in the background.
    ``plain_floats``, ``distinct``, ``row_group_size``: as in :func:`prepare_table`.
    ``splices``: the paths whose table is only the rows after the file's first whole row
    groups, which are copied as bytes (:func:`prepare_spliced_table`; needs
    ``row_group_size``).  A splice that cannot be made raises :class:`StoreError`.  Once a
    spliced file is in place, its :attr:`Splice.source` holds it instead of the file it was
    spliced from (:meth:`HeldFile.hold_instead`: the same bytes up to the groups copied).
    """
    if not plans:
        return []
    folders = sorted({path.parent for path, _ in plans})
    for folder in folders:
        _remove_stale_temps(folder)  # once per folder, not once per file (each lists the folder)
    settings: dict[str, Any] = {"plain_floats": plain_floats, "distinct": distinct}

    def write_one(path: Path, table: pa.Table) -> Path:
        splice = splices.get(path) if splices else None
        if splice is None:
            prepared = prepare_table(path, table, sweep=False, row_group_size=row_group_size, **settings)
        else:
            if row_group_size is None:
                raise ValueError("a splice needs the row group size")
            spliced = prepare_spliced_table(
                path,
                table,
                kept_rows=splice.rows,
                kept_bytes=splice.bytes,
                source=splice.source,
                row_group_size=row_group_size,
                **settings,
            )
            if spliced is None:  # pragma: no cover - its layout was checked when it was read
                raise StoreError(f"{path}: its first {splice.rows} rows cannot be kept; nothing was written")
            prepared = spliced
        done = prepared.commit(sync_dir=False)
        if splice is not None and prepared.held is not None:
            # Its first groups are the held file's, byte for byte: whoever reads those rows
            # back (the report) reads them here, and the file spliced from is closed now.
            splice.source.hold_instead(prepared.held)
        return done

    with ThreadPoolExecutor(max_workers=_io_workers(len(plans)), thread_name_prefix="store-write") as pool:
        futures = [pool.submit(write_one, path, table) for path, table in plans]
        wait(futures)
    for folder in folders:
        _sync_folder(folder, f"{len(plans)} file(s)")
    return [f.result() for f in futures]


def _read_tables(paths: Sequence[Path], kind: Kind, columns: Sequence[str] | None = None) -> list[pa.Table]:
    """:func:`read_table` of each path, a few at a time, in order (first error raised)."""
    return _map_io(lambda p: read_table(p, kind, columns), paths)


# --------------------------------------------------------------------------------------------
# Reading with schema checks
# --------------------------------------------------------------------------------------------


def read_table(
    path: str | Path, kind: Kind, columns: Sequence[str] | None = None, *, use_threads: bool = True
) -> pa.Table:
    """Read a store file of ``kind``, check its version and cast it to our schema.

    See :func:`read_table_and_metadata`, which also returns the file's metadata.
    """
    return read_table_and_metadata(path, kind, columns, use_threads=use_threads)[0]


def read_table_and_metadata(
    path: str | Path, kind: Kind, columns: Sequence[str] | None = None, *, use_threads: bool = True
) -> tuple[pa.Table, Mapping[bytes, bytes]]:
    """Read a store file of ``kind``, check its version and cast it to our schema; return the
    table and the file's own key-value metadata (the table carries our schema's).
    ``use_threads``: decode the columns on Arrow's threads (False where the caller reads
    one file per thread)."""
    p = Path(path)
    with contextlib.closing(_open_parquet(p, kind)) as pf:
        meta = pf.schema_arrow.metadata or {}
        return _read_opened(p, pf, meta, kind, columns, use_threads=use_threads), meta


def _open_parquet(p: Path, kind: Kind, *, memory_map: bool = False) -> pq.ParquetFile:
    """``pq.ParquetFile(p)`` (its footer read), errors as :func:`read_table` describes them.

    ``memory_map``: the file is mapped, not read: columns stored plain and uncompressed (the
    per-day files' floats) then come back as views of its pages instead of copies.  Safe
    because the store only ever replaces a file by renaming another over it, never
    truncates one in place: a file replaced or removed while mapped keeps its pages until
    the last view is gone (tested).
    """
    try:
        return pq.ParquetFile(p, memory_map=memory_map)
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise StoreError(f"cannot read {p}: {_describe_os_error(exc)}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise _DamagedFileError(f"{p} is not a readable Parquet file ({exc}); {_HINTS[kind]}") from exc


def _read_opened(
    p: Path,
    pf: pq.ParquetFile,
    meta: Mapping[bytes, bytes],
    kind: Kind,
    columns: Sequence[str] | None = None,
    *,
    use_threads: bool = True,
    nulls: Collection[str] = (),
    row_groups: Sequence[int] | None = None,
) -> pa.Table:
    """The checked, cast table of the open file ``pf`` (see :func:`read_table`).

    ``nulls``: columns returned all null instead of decoded (:func:`_null_column`), whatever
    the file holds in them.  ``row_groups``: only those row groups' rows.
    """
    schema = _SCHEMAS[kind]
    hint = _HINTS[kind]
    try:
        version = _check_metadata(p, meta, kind)
        names = [n for n in schema.names if columns is None or n in columns]
        present = set(pf.schema_arrow.names)  # (pf.schema_arrow converts the schema on every access)
        missing = [n for n in names if n not in present and n not in nulls]
        added = _added_since(kind, version)
        if any(n not in added for n in missing):
            lacking = [n for n in missing if n not in added]
            raise StoreError(f"{p} lacks column(s) {', '.join(lacking)}; {hint}")
        skipped = [n for n in names if n in nulls]
        wanted = [n for n in names if n not in missing and n not in nulls]
        if row_groups is None:
            table = pf.read(columns=wanted, use_threads=use_threads)
        else:
            table = pf.read_row_groups(row_groups, columns=wanted, use_threads=use_threads)
        for n in missing:
            default = added[n]
            table = table.append_column(n, pa.array([default] * table.num_rows, type=schema.field(n).type))
        for n in skipped:
            table = table.append_column(n, _null_column(schema.field(n).type, table.num_rows))
    except StoreError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise _DamagedFileError(f"{p} is damaged and cannot be read ({exc}); {hint}") from exc
    target = pa.schema([schema.field(n) for n in names], metadata=schema.metadata)
    table = table.select(names)
    if table.schema.equals(target, check_metadata=False):
        # Already our types: Table.cast would still copy every column (measured: 1 s of
        # fresh memory for the per-day files of 500 tickers x 20 years).
        return table.replace_schema_metadata(target.metadata)
    try:
        return table.cast(target, safe=True)
    except (pa.ArrowException, ValueError) as exc:
        raise StoreError(f"{p} has columns of unexpected types ({exc}); {hint}") from exc


#: The longest all-null array made so far per type (:func:`_null_column`).
_NULLS: dict[pa.DataType, pa.Array] = {}


def _null_column(type_: pa.DataType, length: int) -> pa.Array:
    """An all-null array of ``type_`` and ``length``: a slice of one shared array, so that a
    column nobody needs costs no memory per file (``pa.nulls`` allocates and zeroes a whole
    values buffer each time: 40 KB per column of a twenty-year per-day file).  Arrow arrays
    are immutable, so sharing is safe; threads racing to make a longer one each make their
    own, and one of them is kept."""
    have = _NULLS.get(type_)
    if have is None or len(have) < length:
        have = pa.nulls(max(length, 2 * len(have) if have is not None else length), type_)
        _NULLS[type_] = have
    return have.slice(0, length)


def _added_since(kind: Kind, version: int) -> dict[str, Any]:
    """Columns a ``kind`` file of schema ``version`` may lack, with their values (None: null)."""
    if version >= SCHEMA_VERSIONS[kind]:
        return {}
    added: dict[str, Any] = {}
    if kind in ("sensitivity", "summary") and version < 2:
        added.update(dict.fromkeys(_V2_ADDED))
        if kind == "summary":
            added["fit"] = None
    for v in range(version, SCHEMA_VERSIONS[kind]):
        added.update(_UPGRADES.get(kind, {}).get(v, {}))
    return added


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of a stored file, None if there is none: it changes with
    every replacement (the store only replaces a file by renaming another over it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _refuse_newer(path: Path, kind: Kind) -> None:
    """Refuse to replace ``path`` when a newer version of the package wrote it.

    A whole-file rewrite never reads the old file, so without this check older code would
    silently replace (and lose) what a newer version stored.  A missing or damaged file is
    left to the rewrite, which replaces it.
    """
    try:
        raw = (pq.read_schema(path).metadata or {}).get(VERSION_KEY)
        version = int(raw.decode()) if raw is not None else None
    except (OSError, pa.ArrowException, UnicodeDecodeError, ValueError):
        return
    if version is not None and version > SCHEMA_VERSIONS[kind]:
        raise StoreError(
            f"{path} was written by a newer version of stock-sensitivity (schema {version} > "
            f"{SCHEMA_VERSIONS[kind]}); upgrade stock-sensitivity to replace it (it was left unchanged)"
        )


def _check_metadata(path: Path, meta: Mapping[bytes, bytes], kind: Kind) -> int:
    """Check a file's kind and version; return the version."""
    raw_version = meta.get(VERSION_KEY)
    raw_kind = meta.get(KIND_KEY)
    if raw_version is None or raw_kind is None:
        raise StoreError(
            f"{path} was not written by stock-sensitivity (no {VERSION_KEY.decode()} metadata); "
            f"move it out of {path.parent}"
        )
    try:
        version = int(raw_version.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{path} has an unreadable schema version {raw_version!r}; {_HINTS[kind]}") from exc
    found = raw_kind.decode(errors="replace")
    current = SCHEMA_VERSIONS.get(found, SCHEMA_VERSIONS[kind])  # type: ignore[call-overload]
    if version > current:
        raise StoreError(
            f"{path} was written by a newer version of stock-sensitivity (schema {version} > "
            f"{current}); upgrade stock-sensitivity to read it"
        )
    if version < 1:
        raise StoreError(f"{path} has an impossible schema version {version}; {_HINTS[kind]}")
    if found != kind:
        raise StoreError(f"{path} holds {found!r} data, not {kind!r}; move it out of {path.parent}")
    return version


# --------------------------------------------------------------------------------------------
# Frames <-> tables
# --------------------------------------------------------------------------------------------


def _date_array(values: pd.Series | pd.Index, column: str, what: str) -> pa.Array:
    """Midnight datetimes or ``datetime.date`` objects -> date32; refuses times of day."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        raise DataValidationError(f"{what}: column {column} must hold dates, got tz-aware {values.dtype}")
    if values.dtype == object or isinstance(values.dtype, pd.ArrowDtype):
        try:
            values = pd.to_datetime(values)
        except (TypeError, ValueError) as exc:
            raise DataValidationError(f"{what}: column {column} must hold dates ({exc})") from exc
    if not pd.api.types.is_datetime64_dtype(values.dtype):
        raise DataValidationError(f"{what}: column {column} must hold dates, got {values.dtype}")
    stamps = pd.DatetimeIndex(values)
    if stamps.tz is not None:
        raise DataValidationError(f"{what}: column {column} must hold dates, got tz-aware {stamps.dtype}")
    missing = np.asarray(stamps.isna(), dtype=bool)
    valid = stamps[~missing]
    off = valid[valid != valid.normalize()]
    if len(off):
        raise DataValidationError(
            f"{what}: column {column} must hold dates, got a time of day ({off[0]}); "
            "normalize the timestamps to midnight"
        )
    days = stamps.to_numpy().astype("datetime64[D]")
    return pa.array(days, type=pa.date32(), mask=missing)


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Casts allowed on write: numbers to numbers (checked for loss), text to text, and
    all-missing columns; never text to numbers or numbers to text."""
    if pa.types.is_null(source) or source == target:
        return True
    if pa.types.is_floating(target) or pa.types.is_integer(target):
        return bool(pa.types.is_integer(source) or pa.types.is_floating(source))
    if pa.types.is_string(target):
        return bool(pa.types.is_string(source) or pa.types.is_large_string(source))
    if pa.types.is_timestamp(target):
        return bool(pa.types.is_timestamp(source) and source.tz is not None)
    return False


def _column_array(series: pd.Series, fld: pa.Field, what: str) -> pa.Array:
    if pa.types.is_date32(fld.type):
        arr = _date_array(series, fld.name, what)
    else:
        try:
            arr = pa.Array.from_pandas(series)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise DataValidationError(
                f"{what}: column {fld.name} ({series.dtype}) cannot be stored as {fld.type} ({exc})"
            ) from exc
        if not _castable(arr.type, fld.type):
            raise DataValidationError(
                f"{what}: column {fld.name} must hold {fld.type} values, got {series.dtype}"
            )
        try:
            arr = arr.cast(fld.type, safe=True)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise DataValidationError(
                f"{what}: column {fld.name} ({series.dtype}) cannot be stored as {fld.type} "
                f"without loss ({exc})"
            ) from exc
    if not fld.nullable and arr.null_count:
        raise DataValidationError(f"{what}: column {fld.name} has {arr.null_count} missing value(s)")
    return arr


def table_from_frame(frame: pd.DataFrame, schema: pa.Schema, what: str) -> pa.Table:
    """Convert ``frame`` (its columns, not its index) to an Arrow table of ``schema``.

    Refuses missing and unknown columns (naming them), values that cannot be cast without
    loss, missing values in non-nullable columns and datetimes with a time of day.  NaN in a
    float column becomes a Parquet null.
    """
    missing = [n for n in schema.names if n not in frame.columns]
    if missing:
        raise DataValidationError(f"{what}: missing column(s) {', '.join(missing)}")
    extra = [str(c) for c in frame.columns if c not in schema.names]
    if extra:
        raise DataValidationError(
            f"{what}: unknown column(s) {', '.join(extra)}; the stored schema has {', '.join(schema.names)}"
        )
    if frame.columns.has_duplicates:
        raise DataValidationError(f"{what}: duplicated column names")

    def convert(f: pa.Field) -> pa.Array:
        return _column_array(frame[f.name].reset_index(drop=True), f, what)

    workers = min(available_cpus(), len(schema))
    if workers < 2 or len(frame) * len(schema) < _THREADED_CONVERSION_CELLS:
        arrays = [convert(f) for f in schema]
    else:
        # Arrow converts a column (the NaN scan that makes its nulls) without the GIL: the
        # per-day table of 500 tickers x 20 years converted in 0.13 s on two threads, 0.25 s
        # on one.  map() raises the first failing column's error, as the loop does.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-convert") as pool:
            arrays = list(pool.map(convert, schema))
    return pa.Table.from_arrays(arrays, schema=schema)


#: Cells (rows x columns) from which :func:`table_from_frame` converts the columns on threads.
_THREADED_CONVERSION_CELLS: Final = 1 << 20


def _frame_from_report_table(table: pa.Table) -> pd.DataFrame:
    """What ``pandas.read_parquet`` gives for the same data (``date``/``as_of`` as dates)."""
    return table.to_pandas()  # type: ignore[no-any-return]


def _empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


# --------------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------------


def _utc_timestamp(value: dt.datetime, what: str) -> pd.Timestamp:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{what}: fetched_at must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what}: fetched_at must be timezone-aware (e.g. datetime.now(UTC)), got {value!r}")
    return pd.Timestamp(value).tz_convert("UTC")


def _price_table(records: pd.DataFrame, symbol: str) -> pa.Table:
    """A price frame plus ``fetched_at``/``source`` columns -> a PRICE_SCHEMA table."""
    check_price_frame(records.loc[:, list(PRICE_COLUMNS)], symbol)
    frame = records.rename_axis("date").reset_index()
    return table_from_frame(frame.loc[:, list(PRICE_SCHEMA.names)], PRICE_SCHEMA, symbol)


def _fetched_price_table(frame: pd.DataFrame, symbol: str, stamp: pd.Timestamp, source: str) -> pa.Table:
    """A checked fetched price frame as a PRICE_SCHEMA table, every row stamped with ``stamp``
    (UTC) and ``source``: what :func:`_price_table` gives for the same rows (tested), built
    straight from the frame's arrays (the generic conversion costs a millisecond of pandas
    bookkeeping per fetch).  A date with a time of day goes the generic way, which names it."""
    stamps = frame.index.to_numpy(dtype="datetime64[ns]")
    days = stamps.astype("datetime64[D]")
    n = len(frame)
    if not np.array_equal(days.astype("datetime64[ns]"), stamps):
        records = frame.loc[:, list(PRICE_COLUMNS)].assign(fetched_at=stamp, source=source)
        return _price_table(records, symbol)
    arrays: list[pa.Array] = [pa.array(days, type=pa.date32())]
    for values in float_columns(frame, PRICE_COLUMNS).values():
        arrays.append(pa.array(values, type=pa.float64(), from_pandas=True))
    arrays.append(pa.array(np.full(n, stamp.as_unit("us").asm8), type=pa.timestamp("us", tz="UTC")))
    arrays.append(pa.array(np.full(n, source, dtype=object), type=pa.string()))
    return pa.Table.from_arrays(arrays, schema=PRICE_SCHEMA)


def _float_column(table: pa.Table, name: str) -> npt.NDArray[np.float64]:
    """A float column as numpy, NaN for null (as the price frame holds it)."""
    return np.asarray(table.column(name).to_numpy(), dtype=np.float64)


def _price_values(table: pa.Table) -> npt.NDArray[np.float64]:
    """The price columns of a (small) PRICE_SCHEMA table as a ``[rows, columns]`` array."""
    return np.column_stack([_float_column(table, c) for c in PRICE_COLUMNS]).reshape(
        table.num_rows, len(PRICE_COLUMNS)
    )


def price_table(frame: pd.DataFrame, *, symbol: str, source: str, fetched_at: dt.datetime) -> pa.Table:
    """Validate a price frame (see :mod:`sensitivity.prices`) and convert it to PRICE_SCHEMA.

    Every row gets the same ``source`` and ``fetched_at`` (timezone-aware, stored in UTC).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{symbol}: source must be a non-empty string, got {source!r}")
    stamp = _utc_timestamp(fetched_at, symbol)
    check_price_frame(frame, symbol)
    records = frame.loc[:, list(PRICE_COLUMNS)].copy()
    records["fetched_at"] = stamp
    records["source"] = source
    return _price_table(records, symbol)


def write_price_file(
    path: str | Path, frame: pd.DataFrame, *, symbol: str, source: str, fetched_at: dt.datetime
) -> Path:
    """Write a price frame to ``path`` in PRICE_SCHEMA, atomically (used for the sample)."""
    table = price_table(frame, symbol=symbol, source=source, fetched_at=fetched_at)
    return write_table_atomic(path, table, distinct=ONE_ROW_PER_DATE)


def _to_date(value: object, what: str) -> dt.date:
    if isinstance(value, dt.datetime):
        ts = pd.Timestamp(value)
        if ts.tz is not None or ts != ts.normalize():
            raise ValueError(f"{what} must be a date, got the datetime {value!r}")
        return ts.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{what} must be a date written YYYY-MM-DD, got {value!r}") from exc
    raise TypeError(f"{what} must be a date, got {value!r}")


def frame_from_price_table(table: pa.Table, *, with_provenance: bool = False) -> pd.DataFrame:
    """A PRICE_SCHEMA table -> a price frame (plus ``fetched_at``, ``source`` if asked).

    A table read with only some of the price columns gives a frame of those columns.
    """
    index = date_index(table_days(table))
    data: dict[str, Any] = {
        c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
        for c in PRICE_COLUMNS
        if c in table.column_names
    }
    if with_provenance:
        # Straight from the Arrow buffers (the schema's timestamp[us, UTC] and non-null
        # strings): a Python object per row cost more than the rest of the read.
        micros = np.asarray(table.column("fetched_at").to_numpy(), dtype="datetime64[us]")  # UTC; NaT: null
        data["fetched_at"] = pd.array(micros, dtype="datetime64[us]").tz_localize("UTC")
        data["source"] = pd.array(table.column("source"), dtype="str")
    return pd.DataFrame(data, index=index)


def table_days(table: pa.Table) -> npt.NDArray[np.int64]:
    """A table's ``date`` column as int64 days since 1970-01-01."""
    return np.asarray(table.column("date").cast(pa.int32()).to_numpy(), dtype=np.int64)


def _check_price_columns(columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in PRICE_COLUMNS]
    if unknown:
        raise ValueError(f"unknown price column(s): {', '.join(map(str, unknown))}")


def read_price_file(
    path: str | Path,
    *,
    start: dt.date | str | None = None,
    end: dt.date | str | None = None,
    with_provenance: bool = False,
    columns: Sequence[str] | None = None,
    use_threads: bool = True,
) -> pd.DataFrame:
    """Read a PRICE_SCHEMA file into a price frame, keeping ``start <= date <= end``.

    With ``with_provenance`` the frame also has ``fetched_at`` (UTC) and ``source`` per row.
    ``columns``: only these price columns (of :data:`~sensitivity.prices.PRICE_COLUMNS`) are
    read, the others are not decompressed (the fit needs two of the eight).
    ``use_threads``: see :func:`read_table_and_metadata`.
    """
    wanted = None
    if columns is not None:
        _check_price_columns(columns)
        provenance = ["fetched_at", "source"] if with_provenance else []
        wanted = ["date", *columns, *provenance]
    table = read_table(path, "prices", wanted, use_threads=use_threads)
    if start is not None:
        table = table.filter(pc.greater_equal(table.column("date"), pa.scalar(_to_date(start, "start"))))
    if end is not None:
        table = table.filter(pc.less_equal(table.column("date"), pa.scalar(_to_date(end, "end"))))
    return frame_from_price_table(table, with_provenance=with_provenance)


class StoredPrices(NamedTuple):
    """A symbol's price file as one read saw it (:meth:`PriceStore.read_snapshot`)."""

    #: The PRICE_SCHEMA table, checked and cast, with provenance.
    table: pa.Table
    #: The date ranges fetched into it (:meth:`PriceStore.coverage`).
    coverage: list[DateRange]
    #: What the source reported it had checked at the last merge (None: nothing).
    checked_prefix: str | None


@dataclass(frozen=True)
class MergeResult:
    """What :meth:`PriceStore.merge` did to one symbol's stored history.

    ``rows_changed`` counts overlapping dates whose stored values differed from the new fetch
    (a restated adjusted history shows up here); ``rows_removed`` counts stored dates that a
    ``replace=True`` merge dropped.  ``first_date``/``last_date`` span the stored history
    after the merge.
    """

    symbol: str
    rows_before: int
    rows_after: int
    rows_added: int
    rows_changed: int
    first_date: dt.date
    last_date: dt.date
    rows_removed: int = 0
    path: Path | None = None


@dataclass
class PreparedMerge:
    """A merge written under a temporary name (:meth:`PriceStore.prepare_merge`)."""

    #: What the merge does, once committed.
    result: MergeResult
    file: PreparedFile

    def commit(self) -> MergeResult:
        """Put the merged file in place atomically; returns :attr:`result`."""
        self.file.commit()
        return self.result

    def discard(self) -> None:
        """Drop the merged file unless it was committed (idempotent)."""
        self.file.discard()


class PriceStore:
    """Price histories under ``<data_dir>/prices/``, one Parquet file per symbol.

    Writers should hold :func:`store_lock` around :meth:`merge`; reads need no lock.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / "prices"

    def path_for(self, symbol: str) -> Path:
        """The file of ``symbol`` (normalised; refused with ConfigError if implausible)."""
        sym = _symbol_file_part(symbol, "symbol")
        return _child(self.folder, f"{sym}.parquet")

    def read(self, symbol: str, *, with_provenance: bool = False) -> pd.DataFrame | None:
        """The stored price frame of ``symbol``, or None if it was never stored.

        With ``with_provenance`` the frame also has the ``fetched_at`` (UTC) and ``source``
        of each row.
        """
        path = self.path_for(symbol)
        try:
            return read_price_file(path, with_provenance=with_provenance)
        except FileNotFoundError:
            return None

    def read_with_coverage(self, symbol: str) -> tuple[pd.DataFrame, list[DateRange]] | None:
        """:meth:`read` with provenance and :meth:`coverage` from one read of the file, or
        None if it was never stored."""
        read = self.read_table_with_coverage(symbol)
        if read is None:
            return None
        table, ranges = read
        return frame_from_price_table(table, with_provenance=True), ranges

    def read_table_with_coverage(self, symbol: str) -> tuple[pa.Table, list[DateRange]] | None:
        """The stored PRICE_SCHEMA table of ``symbol`` (checked and cast, as :func:`read_table`
        gives it) and its :meth:`coverage`, from one read of the file; None if it was never
        stored.  A fetch's snapshot of what it merges into (:meth:`prepare_merge`)."""
        read = self.read_snapshot(symbol)
        return None if read is None else (read.table, read.coverage)

    def read_snapshot(self, symbol: str) -> StoredPrices | None:
        """:meth:`read_table_with_coverage` and the file's ``checked_prefix`` (what the
        source reported it had checked when the file was last merged), from one read of the
        file; None if it was never stored."""
        path = self.path_for(symbol)
        try:
            table, meta = read_table_and_metadata(path, "prices")
        except FileNotFoundError:
            return None
        ranges = _parse_coverage(meta.get(COVERAGE_KEY))
        raw = meta.get(CHECKED_PREFIX_KEY)
        try:
            checked = raw.decode("utf-8") if raw is not None else None
        except UnicodeDecodeError:
            checked = None  # a hint only: without it the source checks everything again
        return StoredPrices(table, ranges if ranges is not None else _stored_span(table_days(table)), checked)

    def read_many(
        self,
        symbols: Iterable[str],
        start: dt.date | str | None = None,
        end: dt.date | str | None = None,
        *,
        with_provenance: bool = False,
        columns: Sequence[str] | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Price frames of ``symbols`` restricted to ``start <= date <= end`` (inclusive).

        Keys are the normalised symbols, in the given order; symbols never stored are left
        out (a stored symbol with no row in the range maps to an empty frame).  All paths are
        validated before anything is read.  ``columns``: only these price columns (see
        :func:`read_price_file`).
        """
        lo = _to_date(start, "start") if start is not None else None
        hi = _to_date(end, "end") if end is not None else None

        def _one(path: Path) -> pd.DataFrame:
            return read_price_file(
                path, start=lo, end=hi, with_provenance=with_provenance, columns=columns, use_threads=False
            )

        return self._read_each(symbols, _one)

    def read_many_arrays(
        self,
        symbols: Iterable[str],
        start: dt.date | str | None = None,
        end: dt.date | str | None = None,
        *,
        columns: Sequence[str] = ("close", "adj_close"),
    ) -> dict[str, PriceArrays]:
        """:meth:`read_many` as :class:`~sensitivity.prices.PriceArrays` (no frames).

        The same files, checks and date range; rows in stored order.  What the fit reads a
        universe with: building a pandas frame per symbol took about twice as long as reading
        the files (500 symbols x 20 years: 1.1 to 1.6 s against 0.4 to 0.5 s).
        """
        _check_price_columns(columns)
        epoch = dt.date(1970, 1, 1)
        lo = (_to_date(start, "start") - epoch).days if start is not None else None
        hi = (_to_date(end, "end") - epoch).days if end is not None else None
        names = ["date", *columns]

        def _one(path: Path) -> PriceArrays:
            table = read_table(path, "prices", names, use_threads=False)
            days = table_days(table)
            keep = None
            if lo is not None:
                keep = days >= lo
            if hi is not None:
                keep = days <= hi if keep is None else keep & (days <= hi)
            data = {
                c: np.asarray(table.column(c).to_numpy(zero_copy_only=False), np.float64) for c in columns
            }
            if keep is not None and not keep.all():
                days = days[keep]
                data = {c: v[keep] for c, v in data.items()}
            return PriceArrays(days, data)

        return self._read_each(symbols, _one)

    def _read_each(self, symbols: Iterable[str], read: Callable[[Path], _T]) -> dict[str, _T]:
        """``read(path)`` of each symbol's file, one per CPU at a time, keyed by normalised
        symbol in the given order; symbols never stored (no file) are left out.  Every path is
        validated before anything is read.  ``read`` decodes on its own thread only: the fit's
        read of 501 price files took 0.39-0.62 s against 0.66-0.86 s on eight threads each
        also decoding on Arrow's (GIL and thread-pool contention on two cores)."""
        paths = {self._norm(s): self.path_for(s) for s in symbols}

        def _one(path: Path) -> _T | None:
            try:
                return read(path)
            except FileNotFoundError:
                return None

        results = _map_io(_one, list(paths.values()), workers=available_cpus())
        return {sym: r for sym, r in zip(paths, results, strict=True) if r is not None}

    def coverage(self, symbol: str) -> list[DateRange] | None:
        """The date ranges fetched into ``symbol``'s file (sorted, merged), or None if never stored.

        A fetch covers its whole requested range, also where the source had no prices (before a
        listing, holidays).  A file written without coverage (older versions, the bundled
        sample) is taken to cover its first to its last stored date.
        """
        path = self.path_for(symbol)
        try:
            meta = pq.read_schema(path).metadata or {}
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise _DamagedFileError(
                f"{path} is not a readable Parquet file ({exc}); {_HINTS['prices']}"
            ) from exc
        ranges = _parse_coverage(meta.get(COVERAGE_KEY))
        if ranges is not None:
            return ranges
        table = read_table(path, "prices", columns=["date"])
        if table.num_rows == 0:
            return []
        lo, hi = pc.min(table.column("date")).as_py(), pc.max(table.column("date")).as_py()
        return [(lo, hi)]

    def last_date(self, symbol: str) -> dt.date | None:
        """The last stored date of ``symbol``, or None if it was never stored."""
        path = self.path_for(symbol)
        try:
            table = read_table(path, "prices", columns=["date"])
        except FileNotFoundError:
            return None
        if table.num_rows == 0:
            return None
        last = pc.max(table.column("date")).as_py()
        return last if isinstance(last, dt.date) else None

    def symbols(self) -> list[str]:
        """The symbols with a stored price file, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.parquet") if not p.name.startswith((".", "_")))

    def merge(
        self,
        symbol: str,
        frame: pd.DataFrame,
        *,
        source: str,
        fetched_at: dt.datetime | None = None,
        replace: bool = False,
        covers: DateRange | None = None,
        stored: tuple[pa.Table | None, list[DateRange] | None] | None = None,
        checked_prefix: str | None = None,
    ) -> MergeResult:
        """Merge a fetched price frame into the stored history of ``symbol``, atomically.

        :meth:`prepare_merge` and its commit; see there.
        """
        prepared = self.prepare_merge(
            symbol,
            frame,
            source=source,
            fetched_at=fetched_at,
            replace=replace,
            covers=covers,
            stored=stored,
            checked_prefix=checked_prefix,
        )
        return prepared.commit()

    def prepare_merge(
        self,
        symbol: str,
        frame: pd.DataFrame,
        *,
        source: str,
        fetched_at: dt.datetime | None = None,
        replace: bool = False,
        covers: DateRange | None = None,
        stored: tuple[pa.Table | None, list[DateRange] | None] | None = None,
        checked_prefix: str | None = None,
    ) -> PreparedMerge:
        """The merge of a fetched price frame into the stored history of ``symbol``, written
        beside the stored file and fsynced; :meth:`PreparedMerge.commit` puts it in place.

        The result is the union by date; on dates both have, the new fetch wins.  Stored rows
        outside the fetched range are kept: a partial fetch never drops stored prices.
        ``replace=True`` (a full refetch) makes the fetched frame the whole history, and also
        overwrites a damaged file.  ``covers`` is the date range the fetch asked for (default:
        the frame's first to last date); it is added to the file's :meth:`coverage` (with
        ``replace=True`` it becomes the coverage).  ``fetched_at`` defaults to now (UTC).  The
        frame is validated with :func:`~sensitivity.prices.check_price_frame` before anything
        is written, and the merged rows again (:func:`~sensitivity.prices.check_price_arrays`).
        ``stored``: the file's current contents as ``(table, coverage)``
        (:meth:`read_table_with_coverage`; ``(None, None)`` when there is no file), as the
        caller has just read them; it spares reading the file again.  The merge is built on
        what was read, so commit it only while holding :func:`store_lock` and with the stored
        file unchanged since that read (``pipeline.fetch_symbol`` checks its identity under the
        lock, so that only the rename is done there), and :meth:`PreparedMerge.discard` it
        otherwise.  ``checked_prefix``: what the source reported it had checked with this
        fetch (:attr:`~sensitivity.sources.quality.CheckedPrices.checked_prefix`), kept in
        the file for the next fetch (:meth:`read_snapshot`); a merge without one leaves none.
        """
        sym = self._norm(symbol)
        path = self.path_for(sym)
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{sym}: source must be a non-empty string, got {source!r}")
        if checked_prefix is not None and not isinstance(checked_prefix, str):
            raise ValueError(f"{sym}: checked_prefix must be a string, got {checked_prefix!r}")
        stamp = _utc_timestamp(fetched_at if fetched_at is not None else dt.datetime.now(dt.UTC), sym)
        check_price_frame(frame, sym)
        if covers is not None:
            lo, hi = _to_date(covers[0], "covers[0]"), _to_date(covers[1], "covers[1]")
            if lo > hi:
                raise ValueError(f"{sym}: covers must be (start, end) with start <= end, got {covers!r}")
            span: DateRange = (lo, hi)
        else:
            span = (frame.index[0].date(), frame.index[-1].date())
        # In Arrow from here on: the stored table as read, the fetched rows as a table, their
        # union by date as the file to write.  A daily merge adds a row to twenty years; through
        # pandas the stored rows were converted twice (in and out) for 5 to 6 ms a symbol.
        new = _fetched_price_table(frame, sym, stamp, source)

        old: pa.Table | None
        old_coverage: list[DateRange] | None = None
        if stored is not None:
            old, old_coverage = stored
            if old is not None and not old.schema.equals(PRICE_SCHEMA, check_metadata=False):
                raise ValueError(f"{sym}: stored must be the price table read with its provenance")
        else:
            try:
                old = read_table(path, "prices")
            except FileNotFoundError:
                old = None
            except _DamagedFileError:
                if not replace:
                    raise
                old = None  # a full refetch replaces a damaged file
        if old is None:
            old = _empty_table(PRICE_SCHEMA)

        old_days, new_days = table_days(old), table_days(new)
        _, in_old, in_new = np.intersect1d(old_days, new_days, assume_unique=True, return_indices=True)
        a = _price_values(old.take(in_old))
        b = _price_values(new.take(in_new))
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        rows_changed = int((~same).any(axis=1).sum())
        rows_added = len(new_days) - len(in_new)
        if replace:
            combined = new
            rows_removed = len(old_days) - len(in_old)
            coverage = [span]
        else:
            n_old = len(old_days)
            if np.array_equal(in_old, np.arange(n_old - len(in_old), n_old)):
                kept = old.slice(0, n_old - len(in_old))  # the usual update: the overlap is the tail
                kept_days = old_days[: kept.num_rows]
            else:
                only_old = np.ones(n_old, dtype=bool)
                only_old[in_old] = False
                kept = old.filter(pa.array(only_old))
                kept_days = old_days[only_old]
            if kept.num_rows == 0:
                combined = new
            else:
                combined = pa.concat_tables([kept, new])
                if kept_days[-1] >= new_days[0]:  # rows on both sides: sort by date
                    order = np.argsort(np.concatenate([kept_days, new_days]), kind="stable")
                    combined = combined.take(pa.array(order))
            rows_removed = 0
            if old_coverage is None or (not old_coverage and old.num_rows):
                old_coverage = self._old_coverage(path, old_days)
            coverage = _merge_ranges([*old_coverage, span])
        days = table_days(combined)
        check_price_arrays(days, {c: _float_column(combined, c) for c in POSITIVE_COLUMNS}, sym)
        meta = dict(PRICE_SCHEMA.metadata or {})
        meta[COVERAGE_KEY] = json.dumps([[a.isoformat(), b.isoformat()] for a, b in coverage]).encode()
        if checked_prefix is not None:
            meta[CHECKED_PREFIX_KEY] = checked_prefix.encode("utf-8")
        table = combined.replace_schema_metadata(meta)
        result = MergeResult(
            symbol=sym,
            rows_before=old.num_rows,
            rows_after=combined.num_rows,
            rows_added=rows_added,
            rows_changed=rows_changed,
            first_date=epoch_day(int(days[0])),
            last_date=epoch_day(int(days[-1])),
            rows_removed=rows_removed,
            path=path,
        )
        return PreparedMerge(result, prepare_table(path, table, distinct=ONE_ROW_PER_DATE))

    @staticmethod
    def _norm(symbol: str) -> str:
        return _symbol_file_part(symbol, "symbol")

    @staticmethod
    def _old_coverage(path: Path, days: npt.NDArray[np.int64]) -> list[DateRange]:
        """The coverage of the file being merged into (its date span if it has none);
        ``days``: its dates."""
        if not len(days):
            return []
        try:
            ranges = _parse_coverage((pq.read_schema(path).metadata or {}).get(COVERAGE_KEY))
        except (OSError, pa.ArrowException):
            ranges = None
        return ranges if ranges is not None else _stored_span(days)


def _stored_span(days: npt.NDArray[np.int64]) -> list[DateRange]:
    """What a price file written without coverage covers: its first to its last stored date
    (``days``: its dates, in order)."""
    return [(epoch_day(int(days[0])), epoch_day(int(days[-1])))] if len(days) else []


def _parse_coverage(raw: bytes | None) -> list[DateRange] | None:
    """The ranges of a COVERAGE_KEY value; None when absent or unreadable (callers fall back)."""
    if raw is None:
        return None
    try:
        pairs = json.loads(raw.decode("utf-8"))
        ranges = [(dt.date.fromisoformat(a), dt.date.fromisoformat(b)) for a, b in pairs]
    except (UnicodeDecodeError, ValueError, TypeError):
        return None
    if any(a > b for a, b in ranges):
        return None
    return _merge_ranges(ranges)


def _merge_ranges(ranges: Iterable[DateRange]) -> list[DateRange]:
    """Sorted ranges with overlapping or adjacent ones (next day) merged."""
    out: list[DateRange] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + dt.timedelta(days=1):
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

_SENS_RE: Final = re.compile(r"^(?P<index>[^_][^/]*?)__(?P<ticker>[^/]+?)__w(?P<window>\d+)\.parquet$")


def _parquet_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))


def _check_symbol_column(values: pd.Series, column: str, what: str) -> None:
    for raw in pd.unique(values):
        norm = normalize_symbol(raw, what=f"{what}: {column}")
        if norm != raw:
            raise DataValidationError(f"{what}: {column} {raw!r} is not a normalised symbol; use {norm!r}")


def _json_ready(value: Any, where: str) -> Any:
    """``value`` with NaN/inf -> None and numpy scalars -> Python; refuses non-JSON values."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"manifest key {where}[{k!r}] must be a string, got {type(k).__name__}")
            out[k] = _json_ready(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"manifest value {where} is a {type(value).__name__} ({value!r:.60}), which JSON cannot hold; "
        "convert it to a string, number, list or dict first"
    )


#: A per-day file's combination: ``(index_ticker, ticker, window)``.
SensitivityKey = tuple[str, str, int]


@dataclass(frozen=True)
class InputsStamp:
    """What the rows of a per-day file were computed from, kept in its metadata.

    ``through``: the file's last date; ``digest``: a digest of every input its rows depend
    on up to that date (prices, returns, calendar, model settings, code), as the writer
    computed it.  A daily run that finds the same digest for its own inputs through
    ``through`` keeps the rows and computes only the later ones
    (``sensitivity.pipeline``).
    """

    through: dt.date
    digest: str

    def to_bytes(self) -> bytes:
        return json.dumps({"through": self.through.isoformat(), "digest": self.digest}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> InputsStamp | None:
        """The stamp ``raw`` encodes, or None when there is none or it cannot be read."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(dt.date.fromisoformat(data["through"]), str(data["digest"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True, eq=False)
class StoredTail:
    """What :meth:`ReportStore.read_sensitivity_tails` read of a per-day file.

    ``table``: its rows from row ``skipped`` on (all of them when ``skipped`` is 0), with its
    ``stamp``.  The ``skipped`` rows before are whole row groups, the file's first
    ``kept_bytes`` bytes, that a later write copies from the file as read (``held`` open:
    another run may rename a file over the path meanwhile); ``skipped_fitted`` of them have
    a sensitivity, and the file's first date is ``first_date`` (None when nothing was
    skipped: the table's first).
    """

    table: pa.Table
    stamp: InputsStamp | None
    skipped: int = 0
    skipped_fitted: int = 0
    first_date: dt.date | None = None
    kept_bytes: int | None = None
    held: HeldFile | None = None

    @property
    def rows(self) -> int:
        """The file's rows."""
        return self.skipped + int(self.table.num_rows)

    def rows_from(self, tail: pa.Table, columns: Sequence[str]) -> StoredRows | pa.Table:
        """The file's rows in ``columns`` once ``tail`` replaces the rows from ``skipped``
        on: :class:`StoredRows` over the held file, or ``tail`` itself if nothing was skipped."""
        if self.skipped == 0 or self.held is None:
            return tail.select(list(columns))
        return StoredRows(self.held, self.skipped, tail.select(list(columns)))


@dataclass(frozen=True, eq=False)
class StoredRows:
    """A per-day file's rows without holding them in memory: its first ``skipped`` rows are
    read from ``held`` (the file as this run read it, or, once the run wrote the file, the
    file it wrote, whose first row groups it copied from the one read) when asked, the rest
    are ``tail``.  What a daily run hands the report for
    a ticker it kept: the report reads the dates and sensitivities of every ticker and the
    whole rows of the few it charts, a fraction of twenty years of rows."""

    held: HeldFile
    skipped: int
    tail: pa.Table

    @property
    def num_rows(self) -> int:
        return self.skipped + int(self.tail.num_rows)

    @property
    def column_names(self) -> list[str]:
        return list(self.tail.column_names)

    def read(self, columns: Sequence[str]) -> pa.Table:
        """The rows in ``columns`` (a :class:`StoreError` if the held file cannot be read)."""
        names = list(columns)
        tail = self.tail.select(names)
        where = self.held.path or "a per-day file"
        try:
            pf = pq.ParquetFile(self.held.mapped(), metadata=self.held.metadata)
            groups, rows = 0, 0
            while rows < self.skipped and groups < pf.metadata.num_row_groups:
                rows += pf.metadata.row_group(groups).num_rows
                groups += 1
            head = pf.read_row_groups(range(groups), columns=names, use_threads=False)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise StoreError(f"cannot read back the rows of {where} ({exc}); run again") from exc
        if head.num_rows != self.skipped:  # pragma: no cover - checked when it was read
            raise StoreError(f"the rows read back from {where} are not those it held; run again")
        head = head.cast(tail.schema) if not head.schema.equals(tail.schema, check_metadata=False) else head
        return pa.concat_tables([head.replace_schema_metadata(tail.schema.metadata), tail])


#: File descriptors left to the rest of the process when a read holds per-day files open.
_FD_MARGIN: Final = 512


def _holdable(n: int) -> int:
    """How many of ``n`` files a read may hold open: up to the soft limit on open files less
    :data:`_FD_MARGIN`, raised toward the hard limit where it is lower than that."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX: no per-process limit to mind here
        return n
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + _FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return n if soft == resource.RLIM_INFINITY else max(0, min(n, soft - _FD_MARGIN))


def _null_count(pf: pq.ParquetFile, groups: Iterable[int], column: str) -> int:
    """Nulls of ``column`` in row ``groups`` of ``pf``: from the statistics where written,
    else decoded."""
    md = pf.metadata
    index = pf.schema_arrow.get_field_index(column)
    total = 0
    for g in groups:
        stats = md.row_group(g).column(index).statistics if index >= 0 else None
        if stats is not None and stats.has_null_count:
            total += stats.null_count
        else:
            total += pf.read_row_group(g, columns=[column]).column(0).null_count
    return total


def _first_date(pf: pq.ParquetFile) -> dt.date:
    """The date of a per-day file's first row: its first row group's least date, from the
    statistics where written (rows are in date order, one a date), else decoded (0.3-0.4 ms
    a file, a sixth of reading a daily run's tail)."""
    index = pf.schema_arrow.get_field_index("date")
    stats = pf.metadata.row_group(0).column(index).statistics if index >= 0 else None
    if stats is not None and stats.has_min_max and isinstance(stats.min, dt.date):
        return stats.min
    first: dt.date = pf.read_row_group(0, columns=["date"]).column(0)[0].as_py()
    return first


class ReportStore:
    """The report tables and daily reports under ``<data_dir>/reports/``.

    Writers should hold :func:`store_lock`; reads need no lock.  Tables come back as
    ``pandas.read_parquet`` gives them (``date``/``as_of`` as ``datetime.date`` objects).
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / "reports"
        self.sensitivity_dir = self.folder / "sensitivity"
        self.summary_dir = self.folder / "summary"
        self.scenarios_dir = self.folder / "scenarios"
        self.daily_dir = self.folder / "daily"
        # Per-day files this store read whole (so of a version it may replace), by their
        # identity then: a rewrite of one still unchanged need not read its version again.
        self._read_whole: dict[Path, tuple[int, int, int]] = {}

    # -- paths ---------------------------------------------------------------------------

    def sensitivity_path(self, index_ticker: str, ticker: str, window: int) -> Path:
        """The file of one (index_ticker, ticker, window) combination."""
        idx = _symbol_file_part(index_ticker, "index_ticker")
        tic = _symbol_file_part(ticker, "ticker")
        win = _window(window)
        return _child(self.sensitivity_dir, f"{idx}__{tic}__w{win}.parquet")

    def scenarios_path(self, as_of: dt.date | str) -> Path:
        """The scenario file of one as_of date."""
        day = _to_date(as_of, "as_of")
        return _child(self.scenarios_dir, f"scenarios-{day.isoformat()}.parquet")

    def summary_path(self, as_of: dt.date | str) -> Path:
        """The summary file of one as_of date."""
        day = _to_date(as_of, "as_of")
        return _child(self.summary_dir, f"summary-{day.isoformat()}.parquet")

    def report_paths(self, as_of: dt.date | str) -> tuple[Path, Path]:
        """``(report.html, manifest.json)`` of one as_of date."""
        day = _to_date(as_of, "as_of")
        folder = _child(self.daily_dir, day.isoformat())
        return folder / "report.html", folder / "manifest.json"

    # -- sensitivity ---------------------------------------------------------------------

    def write_sensitivity(
        self, frame: pd.DataFrame, *, stamps: Mapping[SensitivityKey, InputsStamp] | None = None
    ) -> list[Path]:
        """Replace the files of the (index_ticker, ticker, window) combinations in ``frame``.

        ``frame`` has exactly the SENSITIVITY columns (``date`` as datetime64 at midnight or
        ``datetime.date``).  Everything is validated before the first file is written; each
        combination's file is then replaced atomically, sorted by date.  Files of other
        combinations are left alone.  ``stamps``: the :class:`InputsStamp` to keep in each
        combination's file (none where absent).  Returns the paths written.
        """
        table = table_from_frame(frame, SENSITIVITY_SCHEMA, "sensitivity table")
        work = frame.loc[:, ["date", *_COMBO]].reset_index(drop=True)
        _check_symbol_column(work["index_ticker"], "index_ticker", "sensitivity table")
        _check_symbol_column(work["ticker"], "ticker", "sensitivity table")
        dates = table.column("date").cast(pa.int32()).to_numpy()
        # Rows by combination (in key order), then date: each file is a slice of that order.
        combo = work.groupby(list(_COMBO), sort=True).ngroup().to_numpy()
        order = np.lexsort((dates, combo))
        sorted_combo, sorted_dates = combo[order], dates[order]
        same = (sorted_combo[1:] == sorted_combo[:-1]) & (sorted_dates[1:] == sorted_dates[:-1])
        if same.any():
            first = int(order[int(np.flatnonzero(same)[0]) + 1])
            row = work.iloc[first]
            raise DataValidationError(
                f"sensitivity table: {row['ticker']} against {row['index_ticker']} (window "
                f"{row['window']}) has date {frame['date'].iloc[first]} more than once"
            )
        in_order = bool(np.all(order[1:] > order[:-1]))
        ordered = table if in_order else table.take(pa.array(order))  # one pass, or none
        starts: list[int] = (
            np.flatnonzero(np.r_[True, sorted_combo[1:] != sorted_combo[:-1]]).tolist() if len(order) else []
        )
        ends = [*starts[1:], len(order)]
        plans: dict[SensitivityKey, pa.Table] = {}
        for lo, hi in zip(starts, ends, strict=True):
            row = work.iloc[int(order[lo])]
            key = (str(row["index_ticker"]), str(row["ticker"]), int(row["window"]))
            plans[key] = ordered.slice(int(lo), int(hi - lo))
        return self._write_sensitivity_files(plans, stamps or {}, {})

    def write_sensitivity_tables(
        self,
        tables: Mapping[SensitivityKey, pa.Table],
        *,
        stamps: Mapping[SensitivityKey, InputsStamp] | None = None,
        kept: Mapping[SensitivityKey, StoredTail] | None = None,
    ) -> list[Path]:
        """:meth:`write_sensitivity` from Arrow tables, one per combination (its key).

        Each table has the per-day schema (as :meth:`read_sensitivity_tables` returns it)
        and holds its key's rows only, dates strictly increasing; all are checked before the
        first file is written.  A daily run writes the rows it kept plus the ones it added.
        ``kept``: for a key whose file :meth:`read_sensitivity_tails` read from row
        ``skipped`` on, what it read: that key's table holds only the rows from there on,
        and the file's first ``skipped`` rows are copied as bytes from the file as it was
        read (held open: another run may have replaced it since, and this run's file is
        then its rows and this run's, as with a whole read); the file is the one a write of
        all its rows gives, byte for byte.  Returns the paths written.
        """
        for key, table in tables.items():
            if not table.schema.equals(SENSITIVITY_SCHEMA, check_metadata=False):
                raise DataValidationError(
                    f"sensitivity table of {key[1]} against {key[0]} (window {key[2]}) does not "
                    "have the per-day schema"
                )
            _check_symbol_column(pd.Series([key[0]]), "index_ticker", "sensitivity table")
            _check_symbol_column(pd.Series([key[1]]), "ticker", "sensitivity table")
            if not _holds_only(table, key):
                raise DataValidationError(
                    f"sensitivity table of {key[1]} against {key[0]} (window {key[2]}) holds other "
                    "combinations or dates out of order"
                )
        splices: dict[SensitivityKey, Splice] = {}
        for key, tail in (kept or {}).items():
            if key not in tables or tail.skipped == 0:
                continue
            if tail.kept_bytes is None or tail.held is None:
                raise ValueError(f"the rows read of {key[1]} against {key[0]} (window {key[2]}) hold no file")
            table = tables[key]
            if (
                table.num_rows
                and tail.table.num_rows
                and (table.column("date")[0].as_py() != tail.table.column("date")[0].as_py())
            ):
                raise DataValidationError(
                    f"sensitivity table of {key[1]} against {key[0]} (window {key[2]}) does not "
                    "begin where the rows read from its file did"
                )
            splices[key] = Splice(tail.skipped, tail.kept_bytes, tail.held)
        return self._write_sensitivity_files(tables, stamps or {}, splices)

    def _write_sensitivity_files(
        self,
        tables: Mapping[SensitivityKey, pa.Table],
        stamps: Mapping[SensitivityKey, InputsStamp],
        splices: Mapping[SensitivityKey, Splice],
    ) -> list[Path]:
        plans: list[tuple[Path, pa.Table]] = []
        for key, table in tables.items():
            meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != INPUTS_KEY}
            stamp = stamps.get(key)
            if stamp is not None:
                meta[INPUTS_KEY] = stamp.to_bytes()
            plans.append((self.sensitivity_path(*key), table.replace_schema_metadata(meta)))
        # A file read whole since and still the same (it is only ever replaced by a rename,
        # which changes its identity) was of a version this code may replace: the daily run's
        # 500 files then need no second footer read (0.13 s).
        stale = [path for path, _ in plans if self._read_whole.get(path) != file_identity(path)]
        _map_io(lambda path: _refuse_newer(path, "sensitivity"), stale)
        return write_tables_atomic(
            plans,
            plain_floats=True,
            distinct=ONE_ROW_PER_DATE,
            row_group_size=SENSITIVITY_ROW_GROUP,
            splices={self.sensitivity_path(*key): splice for key, splice in splices.items()},
        )

    def read_sensitivity_tables(
        self,
        keys: Iterable[SensitivityKey],
        *,
        keep: Callable[[SensitivityKey, InputsStamp], bool] | None = None,
        unused: Callable[[SensitivityKey], Collection[str]] | None = None,
    ) -> dict[SensitivityKey, tuple[pa.Table, InputsStamp | None]]:
        """Each combination's whole file, as Arrow (the per-day schema), with its stamp.

        ``keep``: read only the files with a stamp that ``keep(key, stamp)`` accepts (called
        on the reading threads, once the footer is read; the rest are not decoded).
        ``unused``: columns of a kept file that the caller discards (``unused(key)``, called
        after ``keep`` on the same thread): they are not decoded and come back all null.  A
        daily run with ``fit = "ols"`` drops the stored Huber columns of every ticker with a
        new day (only the latest row has them): 11 of the 46 columns, 220 MB of the 919 MB a
        read of 500 tickers x 20 years allocated.  Files that are missing, or damaged (a
        rewrite replaces them), are left out; other problems raise
        :class:`~sensitivity.errors.StoreError` as :func:`read_table` does.
        """
        read = self._read_per_day(keys, keep=keep, unused=unused, tails=False)
        return {key: (tail.table, tail.stamp) for key, tail in read.items()}

    def read_sensitivity_tails(
        self,
        keys: Iterable[SensitivityKey],
        *,
        keep: Callable[[SensitivityKey, InputsStamp], bool] | None = None,
        unused: Callable[[SensitivityKey], Collection[str]] | None = None,
    ) -> dict[SensitivityKey, StoredTail]:
        """:meth:`read_sensitivity_tables`, decoding only each file's last row group where
        the groups before it can be kept as bytes by :meth:`write_sensitivity_tables`
        (``kept``; :func:`kept_row_groups`), the file held open until then: a daily run reads
        and writes the rows from there on, not twenty years of them.  Other files are read
        whole (:attr:`StoredTail.skipped` 0)."""
        return self._read_per_day(keys, keep=keep, unused=unused, tails=True)

    def _read_per_day(
        self,
        keys: Iterable[SensitivityKey],
        *,
        keep: Callable[[SensitivityKey, InputsStamp], bool] | None,
        unused: Callable[[SensitivityKey], Collection[str]] | None,
        tails: bool,
    ) -> dict[SensitivityKey, StoredTail]:
        rows = SENSITIVITY_ROW_GROUP
        wanted = list(dict.fromkeys(keys))
        holdable = _holdable(len(wanted)) if tails else 0

        def one(n: int) -> StoredTail | None:
            key = wanted[n]
            path = self.sensitivity_path(*key)
            held = None
            tail: StoredTail | None = None
            try:
                if n < holdable:
                    held = HeldFile(os.open(path, os.O_RDONLY), path)
                    st = os.fstat(held.fd)
                    before: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
                else:
                    before = file_identity(path)
                # Mapped: the pages (plain, uncompressed floats) are decoded from the file's
                # mapping instead of from a copy read into fresh memory first; the decoded
                # columns are fresh memory either way (1.89 MB allocated for a 1.17 MB file: an
                # all-null column gets its whole buffer).  500 x 20 years read in 0.68-0.76 s
                # instead of 1.05-1.9 s with a third of the system time; a daily run's fit
                # step took 5.49 s instead of 5.97 s (medians of six alternated runs).
                with contextlib.closing(_open_parquet(path, "sensitivity", memory_map=True)) as pf:
                    meta = pf.schema_arrow.metadata or {}
                    stamp = InputsStamp.from_bytes(meta.get(INPUTS_KEY))
                    if keep is not None and (stamp is None or not keep(key, stamp)):
                        return None
                    md = pf.metadata
                    kept_bytes = None
                    if held is not None and before is not None:
                        current = _check_metadata(path, meta, "sensitivity") == SCHEMA_VERSIONS["sensitivity"]
                        kept_bytes = kept_row_groups(md, rows, before[1]) if current else None
                    last = md.num_row_groups - 1
                    # One file per thread: Arrow's own threads on top only add contention.
                    table = _read_opened(
                        path,
                        pf,
                        meta,
                        "sensitivity",
                        use_threads=False,
                        nulls=() if unused is None else unused(key),
                        row_groups=None if kept_bytes is None else [last],
                    )
                    tail = StoredTail(table, stamp)
                    if kept_bytes is not None and held is not None:
                        held.metadata = md  # the file held is the one read (identity checked below)
                        skipped = last * rows
                        tail = StoredTail(
                            table,
                            stamp,
                            skipped=skipped,
                            skipped_fitted=skipped - _null_count(pf, range(last), "sensitivity"),
                            first_date=_first_date(pf),
                            kept_bytes=kept_bytes,
                            held=held,
                        )
                if before is None or file_identity(path) != before:
                    # Replaced meanwhile: the rows read may not be those of the file held (a
                    # tail is left out: the ticker is fitted in full; whole rows are the old
                    # file's, as consistent as before).
                    if tail.skipped:
                        tail = None
                    return tail
                self._read_whole[path] = before
                return tail
            except (FileNotFoundError, _DamagedFileError):
                return None
            finally:
                if held is not None and (tail is None or tail.held is not held):
                    held.close()

        # One decoding thread per CPU: eight on two cores took twice as long (0.54 against
        # 1.0-1.3 s for 500 files), most of it system time.
        found = _map_io(one, range(len(wanted)), workers=available_cpus())
        return {k: v for k, v in zip(wanted, found, strict=True) if v is not None}

    def read_sensitivity(
        self,
        *,
        index_ticker: str | None = None,
        tickers: Iterable[str] | None = None,
        window: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The per-day table (all combinations, or those matching the filters).

        Sorted by index_ticker, ticker, window, date; an empty table with the right columns
        when nothing matches.  ``columns`` reads only those (plus the key columns ``date``,
        ``index_ticker``, ``ticker``, ``window``), in the schema's order: at universe scale
        most of the time is spent turning columns nobody asked for into pandas.
        """
        if columns is not None:
            unknown = sorted(set(columns) - set(SENSITIVITY_SCHEMA.names))
            if unknown:
                raise ValueError(f"unknown sensitivity column(s): {', '.join(unknown)}")
            wanted = {"date", *_COMBO, *columns}
            columns = [n for n in SENSITIVITY_SCHEMA.names if n in wanted]
        want_index = _symbol_file_part(index_ticker, "index_ticker") if index_ticker is not None else None
        want_tickers = {_symbol_file_part(t, "ticker") for t in tickers} if tickers is not None else None
        want_window = _window(window) if window is not None else None
        filtered = want_index is not None or want_tickers is not None or want_window is not None
        keyed: list[tuple[tuple[str, str, int], Path]] = []
        unnamed: list[Path] = []  # files not named by this store: read, then sort everything
        for path in _parquet_files(self.sensitivity_dir):
            m = _SENS_RE.match(path.name)
            if m is None:
                if not filtered:
                    unnamed.append(path)
                continue
            key = (m.group("index"), m.group("ticker"), int(m.group("window")))
            if want_index is not None and key[0] != want_index:
                continue
            if want_tickers is not None and key[1] not in want_tickers:
                continue
            if want_window is not None and key[2] != want_window:
                continue
            keyed.append((key, path))
        keyed.sort()
        parts = _read_tables([p for _, p in keyed] + unnamed, "sensitivity", columns)
        empty = _empty_table(SENSITIVITY_SCHEMA)
        table = pa.concat_tables(parts) if parts else empty.select(columns or empty.column_names)
        # Files hold one combination each, sorted by date, and were read in key order; sort
        # again only if some file breaks that (renamed by hand, or not written here).
        in_order = not unnamed and all(
            _holds_only(part, key) for (key, _), part in zip(keyed, parts, strict=False)
        )
        if not in_order:
            table = table.sort_by([(c, "ascending") for c in (*_COMBO, "date")])
        return _frame_from_report_table(table)

    # -- summary -------------------------------------------------------------------------

    def write_summary(self, frame: pd.DataFrame) -> list[Path]:
        """Upsert summary rows: for each ``as_of`` in ``frame``, replace its combinations' rows.

        Rows of that as_of whose (index_ticker, ticker, window) is not in ``frame`` are kept,
        as are all other as_of files: a rerun for the same day replaces its rows, earlier days
        stay.  Each as_of file is rewritten atomically, sorted by index_ticker, ticker,
        window.  Returns the paths written.
        """
        return self._upsert_by_as_of(frame, "summary", self.summary_path, ())

    def read_summary(self, *, as_of: dt.date | str | None = None) -> pd.DataFrame:
        """The summary rows (of one ``as_of``, or all), sorted by as_of and combination."""
        return self._read_by_as_of("summary", self.summary_dir, self.summary_path, as_of, ())

    # -- scenarios -----------------------------------------------------------------------

    def write_scenarios(self, frame: pd.DataFrame) -> list[Path]:
        """Upsert scenario rows with the semantics of :meth:`write_summary`.

        For each ``as_of``, the rows of the (index_ticker, ticker, window) combinations in
        ``frame`` (all their index moves) replace that day's rows of those combinations; the
        file is rewritten atomically, sorted by combination and ``index_move``.
        """
        return self._upsert_by_as_of(frame, "scenarios", self.scenarios_path, ("index_move",))

    def read_scenarios(self, *, as_of: dt.date | str | None = None) -> pd.DataFrame:
        """The scenario rows (of one ``as_of``, or all), sorted by as_of, combination, move."""
        return self._read_by_as_of(
            "scenarios", self.scenarios_dir, self.scenarios_path, as_of, ("index_move",)
        )

    # -- shared by the per-as_of tables --------------------------------------------------

    def _upsert_by_as_of(
        self,
        frame: pd.DataFrame,
        kind: Kind,
        path_for: Callable[[dt.date], Path],
        extra_key: tuple[str, ...],
    ) -> list[Path]:
        what = f"{kind} table"
        schema = _SCHEMAS[kind]
        table = table_from_frame(frame, schema, what)
        work = frame.loc[:, [*_COMBO, *extra_key]].reset_index(drop=True)
        _check_symbol_column(work["index_ticker"], "index_ticker", what)
        _check_symbol_column(work["ticker"], "ticker", what)
        days = table.column("as_of").cast(pa.int32()).to_numpy()
        work["_day"] = days
        dup = work.duplicated(subset=["_day", *_COMBO, *extra_key])
        if dup.any():
            row = work.loc[dup].iloc[0]
            extra = "".join(f", {k} {row[k]}" for k in extra_key)
            raise DataValidationError(
                f"{what}: {row['ticker']} against {row['index_ticker']} (window "
                f"{row['window']}{extra}) appears more than once for one as_of"
            )
        order = [(c, "ascending") for c in (*_COMBO, *extra_key)]
        plans: list[tuple[Path, pa.Table]] = []
        for day, rows in work.groupby("_day", sort=True).groups.items():
            as_of = dt.date(1970, 1, 1) + dt.timedelta(days=int(cast(int, day)))
            path = path_for(as_of)
            new = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
            try:
                old = read_table(path, kind)
            except FileNotFoundError:
                old = None
            if old is not None and old.num_rows:
                new_keys = set(zip(*(new.column(c).to_pylist() for c in _COMBO), strict=True))
                old_keys = zip(*(old.column(c).to_pylist() for c in _COMBO), strict=True)
                keep = [k not in new_keys for k in old_keys]
                merged = pa.concat_tables([old.filter(pa.array(keep)), new])
            else:
                merged = new
            merged = merged.sort_by(order)
            plans.append((path, merged))
        return write_tables_atomic(plans)

    def _read_by_as_of(
        self,
        kind: Kind,
        folder: Path,
        path_for: Callable[[dt.date], Path],
        as_of: dt.date | str | None,
        extra_key: tuple[str, ...],
    ) -> pd.DataFrame:
        if as_of is not None:
            path = path_for(_to_date(as_of, "as_of"))
            paths = [path] if path.exists() else []
        else:
            paths = _parquet_files(folder)
        parts = _read_tables(paths, kind)
        table = pa.concat_tables(parts) if parts else _empty_table(_SCHEMAS[kind])
        table = table.sort_by([("as_of", "ascending"), *((c, "ascending") for c in (*_COMBO, *extra_key))])
        return _frame_from_report_table(table)

    # -- daily report --------------------------------------------------------------------

    def write_report(self, as_of: dt.date, html: bytes, manifest: Mapping[str, Any]) -> tuple[Path, Path]:
        """Write ``report.html`` and ``manifest.json`` of ``as_of``, each atomically.

        The manifest is written as indented JSON with sorted keys; NaN and infinities become
        null, numpy scalars become numbers, anything else JSON cannot hold (dates, paths,
        timestamps) is refused before anything is written.  The manifest is written last, so
        its presence marks a complete report.
        """
        if not isinstance(html, bytes | bytearray):
            raise TypeError(f"html must be bytes (encode the page as UTF-8), got {type(html).__name__}")
        if not isinstance(manifest, Mapping):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        clean = _json_ready(manifest, "manifest")
        text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
        html_path, manifest_path = self.report_paths(as_of)
        write_bytes_atomic(html_path, bytes(html))
        write_bytes_atomic(manifest_path, text.encode("utf-8"))
        return html_path, manifest_path


def as_read_back(frame: pd.DataFrame, kind: Literal["summary", "scenarios"]) -> pd.DataFrame:
    """``frame`` as :meth:`ReportStore.read_summary` (or ``read_scenarios``) returns its rows
    once written: the store's schema and types, sorted by as_of and combination (and index
    move), nothing written.  For a caller that needs what the store will hold before it is
    written (the daily run's report draft)."""
    extra = ("index_move",) if kind == "scenarios" else ()
    table = table_from_frame(frame, _SCHEMAS[kind], f"{kind} table")
    table = table.sort_by([("as_of", "ascending"), *((c, "ascending") for c in (*_COMBO, *extra))])
    return _frame_from_report_table(table)


def _holds_only(part: pa.Table, key: tuple[str, str, int]) -> bool:
    """Whether ``part`` holds only the combination ``key``, with strictly increasing dates."""
    if part.num_rows == 0:
        return True
    for column, value in zip(_COMBO, key, strict=True):
        if not pc.all(pc.equal(part.column(column), value)).as_py():
            return False
    days = part.column("date").cast(pa.int32()).to_numpy()
    return bool(np.all(days[1:] > days[:-1]))


def _window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or int(window) < 0:
        raise ValueError(f"window must be an integer >= 0, got {window!r}")
    return int(window)


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------


@dataclass
class _ProcessLock:
    """The state of one lock file in this process."""

    pid: int
    rlock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_LOCKS: dict[str, _ProcessLock] = {}
_LOCKS_GUARD = threading.Lock()


def _holder(path: Path) -> tuple[int | None, str]:
    """The holder's pid (None when the lock file names none: it is emptied on release) and
    ``pid N, started T``, from one read of the lock file, as far as it can be read."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    pid = info.get("pid")
    started = info.get("started", "at an unknown time")
    number = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    return number, f"pid {info.get('pid', 'unknown')}, started {started}"


def _another_run(described: str, data_dir: Path) -> StoreLockedError:
    return StoreLockedError(
        f"another run ({described}) is writing to {data_dir}; wait for it to finish or pass a "
        "different --data-dir"
    )


#: The first wait of a process for another's store lock (the waits then double up to poll_s).
_FIRST_POLL_S: float = 0.001


def _take_file_lock(path: Path, data_dir: Path, deadline: float, poll_s: float) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {path}: {_describe_os_error(exc)}") from exc
    try:
        # Polls with waits that start at a millisecond and double up to poll_s: writers hold
        # the lock for milliseconds at a time (one symbol's merge), and a waiter that slept a
        # whole poll_s at the first refusal left the store idle for most of that time.
        wait_s = min(_FIRST_POLL_S, poll_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _another_run(_holder(path)[1], data_dir) from None
                time.sleep(min(wait_s, remaining))
                wait_s = min(2.0 * wait_s, poll_s)
        info = {"pid": os.getpid(), "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_file_lock(fd: int) -> None:
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(data_dir: str | Path, *, timeout_s: float = 600, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold the exclusive write lock of ``data_dir`` (``fcntl.flock`` on ``<data_dir>/.lock``).

    Exclusive across processes: a second process waits up to ``timeout_s`` seconds (polling
    every ``poll_s``), then gets :class:`~sensitivity.errors.StoreLockedError` naming the pid
    and start time of the holder, which writes them into the lock file.  Within one process
    the lock is re-entrant for the thread that holds it (nesting never deadlocks) and other
    threads wait for it like other processes do, so do not hold it in one thread while
    waiting for another thread that takes it.  The lock is released when the block exits, or
    by the OS when the holder dies.  Yields the lock file's path.
    """
    if timeout_s < 0 or not math.isfinite(timeout_s):
        raise ValueError(f"timeout_s must be a finite number >= 0, got {timeout_s!r}")
    if not poll_s > 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
    folder = Path(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the data folder {folder}: {_describe_os_error(exc)}") from exc
    path = folder / ".lock"
    key = str(path.resolve())
    deadline = time.monotonic() + timeout_s
    with _LOCKS_GUARD:
        state = _LOCKS.get(key)
        if state is None or state.pid != os.getpid():  # a forked child starts afresh
            state = _ProcessLock(pid=os.getpid())
            _LOCKS[key] = state
    got = state.rlock.acquire(timeout=timeout_s) if timeout_s > 0 else state.rlock.acquire(blocking=False)
    if not got:
        pid, described = _holder(path)
        if pid is not None and pid != os.getpid():
            # The thread ahead of this one is itself waiting for another run's lock (and may
            # not have given up yet): name the run that holds it, as that thread will.
            raise _another_run(described, folder)
        raise StoreLockedError(
            f"another thread of this process (pid {os.getpid()}) is writing to {folder}; wait for it "
            "to finish or pass a different --data-dir"
        )
    try:
        if state.depth == 0:
            state.fd = _take_file_lock(path, folder, deadline, poll_s)
        state.depth += 1
    except BaseException:
        state.rlock.release()
        raise
    try:
        yield path
    finally:
        state.depth -= 1
        try:
            if state.depth == 0 and state.fd is not None:
                fd, state.fd = state.fd, None
                _release_file_lock(fd)
        finally:
            state.rlock.release()


__all__ = [
    "CHECKED_PREFIX_KEY",
    "COMPRESSION",
    "COVERAGE_KEY",
    "INPUTS_KEY",
    "PIPELINE_COLUMNS",
    "PRICE_SCHEMA",
    "SCENARIO_COLUMNS",
    "SCENARIO_SCHEMA",
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "SENSITIVITY_COLUMNS",
    "SENSITIVITY_SCHEMA",
    "SUMMARY_COLUMNS",
    "SUMMARY_SCHEMA",
    "DateRange",
    "InputsStamp",
    "MergeResult",
    "PreparedFile",
    "PreparedMerge",
    "PriceStore",
    "ReportStore",
    "SensitivityKey",
    "StoredPrices",
    "as_read_back",
    "file_identity",
    "frame_from_price_table",
    "one_sweep_per_folder",
    "prepare_table",
    "price_table",
    "read_price_file",
    "read_table",
    "read_table_and_metadata",
    "store_lock",
    "table_days",
    "table_from_frame",
    "write_atomic",
    "write_bytes_atomic",
    "write_price_file",
    "write_table_atomic",
    "write_tables_atomic",
]
