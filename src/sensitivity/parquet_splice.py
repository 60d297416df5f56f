"""Extend a Parquet file by its last row groups without re-encoding the ones before.

A daily run adds a day to each per-day file (``reports/sensitivity/``) of twenty years: the
rows before stay bit for bit, yet decoding and re-encoding them took two thirds of the daily
fit step (544 MB read and written at 500 tickers).  Parquet cannot be appended to in place,
and pyarrow cannot copy a row group as bytes, but the layout allows it: a file is ``PAR1``,
the row groups' column chunks one after another, the footer (Thrift ``FileMetaData`` in the
compact protocol), its length and ``PAR1``.  A chunk's bytes do not depend on where it
lies; only the footer records offsets.  So when the per-day files are written in row groups
of a fixed number of rows, the file pyarrow writes for a table equals

    the old file up to row group ``k``
    + the chunks pyarrow writes for the rows from group ``k`` on (in a file of their own)
    + that file's footer, with the old footer's first ``k`` row groups put before its own,
      its offsets moved by where its chunks now start and its groups' ordinals by ``k``

whenever the table's first ``k`` groups hold the old file's rows (tested byte for byte
against pyarrow writing the whole table, tests/test_parquet_splice.py).  This module builds
that footer; :mod:`sensitivity.store` decides when the old rows are the same and writes the
file.  Only the fields that hold offsets, the row count and the ordinals are rewritten; every
other byte of both footers is copied as it is, so a field this code does not know travels
unchanged (an offset field it does not know would not be moved: :func:`splice_footer`
refuses a footer with page indexes, bloom filters or encryption, which the store never
writes).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["MAGIC", "Footer", "SpliceError", "read_footer", "splice_footer"]

MAGIC: Final = b"PAR1"

# Compact protocol type codes.
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)

_INTEGERS: Final = (_I64, _I32, _I16)

# Field ids (parquet.thrift).
_FMD_SCHEMA: Final = 2
_FMD_NUM_ROWS: Final = 3
_FMD_ROW_GROUPS: Final = 4
_FMD_ENCRYPTION: Final = frozenset({8, 9})
_RG_COLUMNS: Final = 1
_RG_FILE_OFFSET: Final = 5
_RG_ORDINAL: Final = 7
_CC_FILE_OFFSET: Final = 2
_CC_META: Final = 3
#: ColumnChunk fields that point at page indexes or encrypted metadata: never written here.
_CC_REFUSED: Final = frozenset({4, 6, 8, 9})
#: ColumnMetaData fields holding file offsets: data, index and dictionary pages.
_CMD_OFFSETS: Final = frozenset({9, 10, 11})
#: ColumnMetaData's bloom filter offset: never written here.
_CMD_REFUSED: Final = frozenset({14})


class SpliceError(ValueError):
    """A footer this module does not splice: malformed, encrypted, or with offsets it would
    not move (page indexes, bloom filters)."""


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        try:
            x = b[i]
        except IndexError:
            raise SpliceError("truncated Thrift data") from None
        i += 1
        out |= (x & 0x7F) << shift
        if x < 0x80:
            return out, i
        shift += 7
        if shift > 70:
            raise SpliceError("malformed varint in Thrift data")


def _put_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def _unzigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _skip(b: bytes, i: int, t: int) -> int:
    """The position after a value of type ``t`` starting at ``i``."""
    if t in (_BOOL_TRUE, _BOOL_FALSE):
        return i
    if t == _BYTE:
        return i + 1
    if t in (_I16, _I32, _I64):
        return _varint(b, i)[1]
    if t == _DOUBLE:
        return i + 8
    if t == _BINARY:
        n, i = _varint(b, i)
        return i + n
    if t in (_LIST, _SET):
        return _skip_list(b, i)
    if t == _MAP:
        n, i = _varint(b, i)
        if n == 0:
            return i
        kv = b[i]
        i += 1
        for _ in range(n):
            i = _skip(b, i, kv >> 4)
            i = _skip(b, i, kv & 0x0F)
        return i
    if t == _STRUCT:
        return _skip_struct(b, i)
    raise SpliceError(f"unknown Thrift type {t}")


def _field(b: bytes, i: int, last: int) -> tuple[int, int, int]:
    """The field header at ``i`` of a struct whose previous field was ``last``: (id, type,
    position of the value); id 0 and type 0 at the struct's end (after its stop byte)."""
    try:
        h = b[i]
    except IndexError:
        raise SpliceError("truncated Thrift data") from None
    i += 1
    if h == 0:
        return 0, 0, i
    t, delta = h & 0x0F, h >> 4
    if delta:
        return last + delta, t, i
    v, i = _varint(b, i)
    return _unzigzag(v), t, i


def _skip_struct(b: bytes, i: int) -> int:
    """The position after the struct at ``i``.  Written out flat (the footer of a per-day
    file holds about 2,000 fields a row group): integers, strings and nested structs are
    skipped here without a call, the rarer types through :func:`_skip`."""
    try:
        while True:
            h = b[i]
            i += 1
            if h == 0:
                return i
            if h < 0x10:  # the field id follows as a varint
                while b[i] & 0x80:
                    i += 1
                i += 1
            t = h & 0x0F
            if t in _INTEGERS:
                while b[i] & 0x80:
                    i += 1
                i += 1
            elif t == _BINARY:
                n = b[i]
                i += 1
                if n & 0x80:
                    n, i = _varint(b, i - 1)
                i += n
            elif t == _STRUCT:
                i = _skip_struct(b, i)
            elif t == _LIST:
                i = _skip_list(b, i)
            elif t > _BOOL_FALSE:
                i = _skip(b, i, t)
    except IndexError:
        raise SpliceError("truncated Thrift data") from None


def _skip_list(b: bytes, i: int) -> int:
    """The position after the list (or set) at ``i``.  Lists of integers, strings and
    structs (a column's encodings, path and page statistics, a size histogram: four in each
    column's metadata) are skipped here without a call per element; a plain loop over
    :func:`_skip` took two fifths of the walk over a row group."""
    n, et, i = _list_header(b, i)
    try:
        if et in _INTEGERS:
            for _ in range(n):
                while b[i] & 0x80:
                    i += 1
                i += 1
        elif et == _STRUCT:
            for _ in range(n):
                i = _skip_struct(b, i)
        elif et == _BINARY:
            for _ in range(n):
                m = b[i]
                i += 1
                if m & 0x80:
                    m, i = _varint(b, i - 1)
                i += m
        elif et in (_BOOL_TRUE, _BOOL_FALSE):
            i += n  # a list's booleans take a byte each
        else:
            for _ in range(n):
                i = _skip(b, i, et)
    except IndexError:
        raise SpliceError("truncated Thrift data") from None
    return i


def _list_header(b: bytes, i: int) -> tuple[int, int, int]:
    try:
        h = b[i]
    except IndexError:
        raise SpliceError("truncated Thrift data") from None
    i += 1
    n, et = h >> 4, h & 0x0F
    if n == 15:
        n, i = _varint(b, i)
    return n, et, i


def _put_list_header(n: int, et: int) -> bytes:
    return bytes([(n << 4) | et]) if n < 15 else bytes([0xF0 | et]) + _put_varint(n)


def _int(b: bytes, i: int) -> tuple[int, int]:
    v, i = _varint(b, i)
    return _unzigzag(v), i


def _put_int(n: int) -> bytes:
    return _put_varint(_zigzag(n))


def _fid(b: bytes, i: int, h: int, fid: int) -> tuple[int, int]:
    """The id of the field whose header byte ``h`` was at ``i - 1`` (after the previous
    field ``fid``), and where its value starts."""
    if h >> 4:
        return fid + (h >> 4), i
    v, i = _varint(b, i)
    return _unzigzag(v), i


def _skip_fast(b: bytes, i: int, t: int) -> int:
    """:func:`_skip`, with the common types (integers, strings, structs) handled here."""
    if t in _INTEGERS:
        while b[i] & 0x80:
            i += 1
        return i + 1
    if t == _BINARY:
        n, i = _varint(b, i)
        return i + n
    if t == _STRUCT:
        return _skip_struct(b, i)
    if t == _LIST:
        return _skip_list(b, i)
    return _skip(b, i, t)


@dataclass(frozen=True)
class _Edits:
    """What a walk over the new row groups changes: offsets move by ``shift``, ordinals by
    ``ordinals``; each change is recorded in ``edits`` as (start, end, new bytes)."""

    shift: int
    ordinals: int
    edits: list[tuple[int, int, bytes]]


#: A field's handler: given the footer, the position of the field's value and its type,
#: record what it changes and return the position after the value.
_Handler = Callable[[bytes, int, int, _Edits], int]


def _edited_struct(b: bytes, i: int, handlers: Mapping[int, _Handler], ctx: _Edits) -> int:
    """Walk the struct at ``i``, handing each field in ``handlers`` (by id) to its handler
    and skipping the others; returns the position after the struct."""
    fid = 0
    while True:
        h = b[i]
        i += 1
        if h == 0:
            return i
        if h >> 4:  # (:func:`_fid`, inlined: a row group's walk reads about 1,000 field headers)
            fid += h >> 4
        else:
            fid, i = _fid(b, i, h, fid)
        handle = handlers.get(fid)
        i = _skip_fast(b, i, h & 0x0F) if handle is None else handle(b, i, h & 0x0F, ctx)


def _offset(*, keep_zero: bool) -> _Handler:
    """A handler moving an integer field by the walk's shift (a 0 stays 0 where
    ``keep_zero``: a field that holds 0 when it is not set)."""

    def handle(b: bytes, i: int, t: int, ctx: _Edits) -> int:
        if t not in _INTEGERS:
            return _skip_fast(b, i, t)
        v, j = _int(b, i)
        if v or not keep_zero:
            ctx.edits.append((i, j, _put_int(v + ctx.shift)))
        return j

    return handle


def _ordinal(b: bytes, i: int, t: int, ctx: _Edits) -> int:
    if t not in _INTEGERS:
        return _skip_fast(b, i, t)
    v, j = _int(b, i)
    ctx.edits.append((i, j, _put_int(v + ctx.ordinals)))
    return j


def _refused(what: str) -> Callable[[int], _Handler]:
    def for_field(fid: int) -> _Handler:
        def handle(b: bytes, i: int, t: int, ctx: _Edits) -> int:
            raise SpliceError(what.format(fid=fid))

        return handle

    return for_field


def _column_meta(b: bytes, i: int, t: int, ctx: _Edits) -> int:
    if t != _STRUCT:
        return _skip_fast(b, i, t)
    return _edited_struct(b, i, _COLUMN_META, ctx)


def _columns(b: bytes, i: int, t: int, ctx: _Edits) -> int:
    if t != _LIST:
        return _skip_fast(b, i, t)
    n, et, i = _list_header(b, i)
    if et != _STRUCT:
        raise SpliceError("a row group's columns are not structs")
    for _ in range(n):
        i = _edited_struct(b, i, _COLUMN_CHUNK, ctx)
    return i


_refused_meta = _refused("a column's metadata has field {fid}, which this splice does not move")
_refused_chunk = _refused("a column chunk has field {fid} (page index or encryption)")
#: ColumnMetaData: the data, index and dictionary page offsets move; a bloom filter is refused.
_COLUMN_META: Final[dict[int, _Handler]] = {
    **dict.fromkeys(_CMD_OFFSETS, _offset(keep_zero=False)),
    **{fid: _refused_meta(fid) for fid in _CMD_REFUSED},
}
#: ColumnChunk: its (deprecated) file offset moves unless 0 (pyarrow writes 0, older writers
#: an offset), its metadata is walked; page indexes and encryption are refused.
_COLUMN_CHUNK: Final[dict[int, _Handler]] = {
    _CC_FILE_OFFSET: _offset(keep_zero=True),
    _CC_META: _column_meta,
    **{fid: _refused_chunk(fid) for fid in _CC_REFUSED},
}
#: RowGroup: its columns are walked, its file offset moves unless 0 (not set), its ordinal
#: moves by the groups kept before it.
_ROW_GROUP: Final[dict[int, _Handler]] = {
    _RG_COLUMNS: _columns,
    _RG_FILE_OFFSET: _offset(keep_zero=True),
    _RG_ORDINAL: _ordinal,
}


@dataclass(frozen=True)
class Footer:
    """A Parquet file's footer: its Thrift bytes and where its row groups lie in them."""

    data: bytes
    num_rows: int
    #: Start of each row group's struct in :attr:`data`, then the end of the last located.
    group_bounds: tuple[int, ...]
    #: The schema's Thrift bytes (two files whose schemas differ have different bytes here).
    schema: bytes

    @property
    def num_row_groups(self) -> int:
        return len(self.group_bounds) - 1

    @classmethod
    def parse(cls, data: bytes, *, groups: int | None = None) -> Footer:
        """Parse ``data`` (a FileMetaData); ``groups``: locate only the first ``groups`` row
        groups (each costs a walk over its columns' metadata) and stop there."""
        data = bytes(data)
        fid, i = 0, 0
        num_rows: int | None = None
        bounds: list[int] | None = None
        schema: bytes | None = None
        while True:
            fid, t, i = _field(data, i, fid)
            if t == 0:
                break
            if fid in _FMD_ENCRYPTION:
                raise SpliceError("the footer is encrypted")
            if fid == _FMD_SCHEMA and t == _LIST:
                end = _skip(data, i, t)
                schema = data[i:end]
                i = end
            elif fid == _FMD_NUM_ROWS and t == _I64:
                num_rows, i = _int(data, i)
            elif fid == _FMD_ROW_GROUPS and t == _LIST:
                n, et, i = _list_header(data, i)
                if et != _STRUCT:
                    raise SpliceError("the row groups are not structs")
                bounds = [i]
                for _ in range(n if groups is None else min(n, groups)):
                    i = _skip_struct(data, i)
                    bounds.append(i)
                if groups is not None and groups < n:
                    break
            else:
                i = _skip(data, i, t)
        if num_rows is None or bounds is None or schema is None:
            raise SpliceError("the footer lacks the schema, the row count or the row groups")
        if i > len(data):
            raise SpliceError("truncated Thrift data")
        return cls(data, num_rows, tuple(bounds), schema)


def read_footer(file_bytes_tail: bytes | memoryview) -> bytes:
    """The footer's Thrift bytes from the end of a Parquet file (at least the footer, its
    length and the magic)."""
    if len(file_bytes_tail) < 8 or file_bytes_tail[-4:] != MAGIC:
        raise SpliceError("not a Parquet file (no PAR1 at its end)")
    (n,) = struct.unpack("<I", file_bytes_tail[-8:-4])
    if n + 8 > len(file_bytes_tail):
        raise SpliceError("the footer's length points before the bytes given")
    return bytes(file_bytes_tail[-8 - n : -8])


def splice_footer(old: Footer, keep: int, kept_rows: int, tail: Footer, shift: int) -> bytes:
    """The footer of the old file's first ``keep`` row groups (``kept_rows`` rows; ``old``
    parsed at least that far) followed by the chunks of ``tail``'s file moved ``shift`` bytes
    further on.  Everything but the row count and the row groups comes from ``tail``."""
    if keep > old.num_row_groups:
        raise SpliceError(f"the old footer has {old.num_row_groups} located row group(s), not {keep}")
    b = tail.data
    edits: list[tuple[int, int, bytes]] = []
    ctx = _Edits(shift, keep, edits)
    fid, i = 0, 0
    try:
        while True:
            fid, t, i = _field(b, i, fid)
            if t == 0:
                break
            if fid == _FMD_NUM_ROWS and t == _I64:
                _, j = _int(b, i)
                edits.append((i, j, _put_int(tail.num_rows + kept_rows)))
                i = j
            elif fid == _FMD_ROW_GROUPS and t == _LIST:
                n, _, j = _list_header(b, i)
                kept = old.data[old.group_bounds[0] : old.group_bounds[keep]]
                edits.append((i, j, _put_list_header(keep + n, _STRUCT) + kept))
                i = j
                for _ in range(n):
                    i = _edited_struct(b, i, _ROW_GROUP, ctx)
            else:
                i = _skip(b, i, t)
    except IndexError:
        raise SpliceError("truncated Thrift data") from None
    parts: list[bytes] = []
    at = 0
    for start, end, new in edits:
        parts += (b[at:start], new)
        at = end
    parts.append(b[at:])
    return b"".join(parts)
