"""A per-day file extended by copying its row groups but the last as bytes
(sensitivity.parquet_splice, store.prepare_spliced_table) is the file a write of the whole
table gives, byte for byte; where the copy cannot be made the store says so."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensitivity import parquet_splice, store
from sensitivity.parquet_splice import Footer, SpliceError, read_footer, splice_footer
from sensitivity.store import (
    ONE_ROW_PER_DATE,
    HeldFile,
    file_identity,
    kept_row_groups,
    prepare_spliced_table,
    prepare_table,
)

SETTINGS = {"plain_floats": True, "distinct": ONE_ROW_PER_DATE}


_BASE_ROWS = 6000


def _base(seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = _BASE_ROWS
    beta = rng.normal(1.0, 0.3, n)
    beta[rng.random(n) < 0.05] = np.nan
    return pa.table(
        {
            "date": pa.array(np.arange(n, dtype="int32") + 10_000, pa.int32()).cast(pa.date32()),
            "index_ticker": pa.array(["^GSPC"] * n),
            "ticker": pa.array(["AAPL"] * n),
            "window": pa.array(np.full(n, 252, dtype="int64")),
            "n_obs": pa.array(np.minimum(np.arange(n), 252).astype("int64")),
            "beta": pa.array(beta, from_pandas=True),
            "gamma": pa.array(rng.normal(0.0, 2.0, n)),
        }
    )


_BASES = {seed: _base(seed) for seed in range(6)}


def per_day(n: int, seed: int = 0) -> pa.Table:
    """A per-day-like table of ``n`` rows (dates, repeated strings and ints, floats with
    some nulls), the first rows of the same ones for every ``n``, but for a Huber-like
    column set on the last row only (so the rows but the last are those of any longer one)."""
    huber = np.full(n, np.nan)
    if n:
        huber[-1] = 1.1
    return (
        _BASES[seed]
        .slice(0, n)
        .append_column("huber_beta", pa.array(huber, from_pandas=True))
        .replace_schema_metadata({b"sensitivity.kind": b"sensitivity", b"rows": str(n).encode()})
    )


def whole(path: Path, table: pa.Table, rows: int) -> bytes:
    prepare_table(path, table, sweep=False, row_group_size=rows, **SETTINGS).commit()
    return path.read_bytes()


def extended(path: Path, table: pa.Table, rows: int) -> bool:
    """Write ``table`` over the file at ``path`` (whose rows it begins with) keeping the
    file's row groups but the last as bytes, as a daily run does; False where it cannot."""
    identity = file_identity(path)
    assert identity is not None
    md = pq.read_metadata(path)
    kept_bytes = kept_row_groups(md, rows, identity[1])
    if kept_bytes is None:
        return False
    kept = (md.num_row_groups - 1) * rows
    prepared = prepare_spliced_table(
        path,
        table.slice(kept),
        kept_rows=kept,
        kept_bytes=kept_bytes,
        source=HeldFile(os.open(path, os.O_RDONLY)),
        row_group_size=rows,
        **SETTINGS,
    )
    if prepared is None:
        return False
    prepared.commit()
    return True


@pytest.mark.parametrize(
    ("old_rows", "new_rows", "rows"),
    [
        (5000, 5001, 2048),  # a day added: two groups copied, the third encoded again
        (4096, 4097, 2048),  # the old file ends on a group's end: that group and a new one
        (4097, 4098, 2048),
        (2049, 2050, 2048),
        (300, 4000, 64),  # several groups copied, many added
        (129, 130, 64),
        (65, 66, 64),
        (5000, 5001, 14),  # more than fourteen groups: the list's long header
        (700, 701, 50),
    ],
)
def test_a_spliced_file_is_the_whole_write_byte_for_byte(
    tmp_path: Path, old_rows: int, new_rows: int, rows: int
) -> None:
    full = per_day(new_rows)
    want = whole(tmp_path / "want.parquet", full, rows)
    path = tmp_path / "f.parquet"
    whole(path, per_day(old_rows), rows)  # the old file: its last row's Huber value goes
    assert extended(path, full, rows)
    assert path.read_bytes() == want
    assert pq.read_table(path).equals(full)
    md = pq.read_metadata(path)
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [
        min(rows, new_rows - g * rows) for g in range(-(-new_rows // rows))
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    old_rows=st.integers(1, 700),
    added=st.integers(1, 300),
    rows=st.integers(1, 130),
    seed=st.integers(0, 5),
)
def test_any_extension_spliced_or_not_is_the_whole_write(
    tmp_path_factory: pytest.TempPathFactory, old_rows: int, added: int, rows: int, seed: int
) -> None:
    """``added`` rows after an old file's (whose last row's Huber value moves on): a file of
    at least two groups is spliced, and the result is always the whole write's bytes."""
    folder = tmp_path_factory.mktemp("splice")
    full = per_day(old_rows + added, seed)
    want = whole(folder / "want.parquet", full, rows)
    path = folder / "f.parquet"
    whole(path, per_day(old_rows, seed), rows)
    copied = extended(path, full, rows)
    assert copied == (old_rows > rows)
    if not copied:
        whole(path, full, rows)
    assert path.read_bytes() == want


def test_the_rows_copied_are_those_of_the_file_held_not_of_its_replacement(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    whole(path, per_day(300), 64)
    held = HeldFile(os.open(path, os.O_RDONLY))
    size = os.fstat(held.fd).st_size
    kept_bytes = kept_row_groups(pq.read_metadata(path), 64, size)
    assert kept_bytes is not None
    want = whole(tmp_path / "want.parquet", per_day(301), 64)
    os.replace(_rewritten(path, per_day(300, seed=1)), path)  # another run's file now
    splice = {"kept_rows": 256, "kept_bytes": kept_bytes, "source": held, "row_group_size": 64}
    prepared = prepare_spliced_table(path, per_day(301).slice(256), **splice, **SETTINGS)
    assert prepared is not None
    prepared.commit()
    assert path.read_bytes() == want
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare_spliced_table(path, per_day(301).slice(250), **{**splice, "kept_rows": 250})
    held.close()
    held.close()  # idempotent


def _rewritten(path: Path, table: pa.Table) -> Path:
    other = path.with_name("other.parquet")
    whole(other, table, 64)
    return other


def test_a_file_of_another_layout_is_not_spliced(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    whole(path, per_day(300), 10_000)  # one group: written before the files had groups
    assert not extended(path, per_day(301), 64)
    whole(path, per_day(300), 50)  # groups of another size
    assert not extended(path, per_day(301), 64)
    whole(path, per_day(300).drop_columns(["gamma"]), 64)  # another schema
    assert not extended(path, per_day(301), 64)
    pq.write_table(per_day(300), path, row_group_size=64, write_page_index=True)
    assert not extended(path, per_day(301), 64)


def test_a_damaged_footer_is_refused() -> None:
    with pytest.raises(SpliceError):
        read_footer(b"junk")
    with pytest.raises(SpliceError):
        Footer.parse(b"\x15")  # a field header and nothing after it
    with pytest.raises(SpliceError):
        Footer.parse(b"\x00")  # no row count, no row groups


def test_lists_of_every_element_type_are_skipped_whole_and_truncations_refused() -> None:
    """The walk skips lists of integers, strings, structs, booleans and doubles (short and
    long list headers, a string longer than a one-byte length) to the struct's end, and every
    truncation of it raises :class:`SpliceError` (never an IndexError) or, cut inside a
    string, ends past the bytes given (which :meth:`Footer.parse` refuses)."""
    data = b"".join(
        [
            bytes([0x19, 0x25, 0x02, 0xD8, 0x04]),  # 1: list<i32> [1, 300]
            bytes([0x19, 0x28, 0x02, *b"ab", 0x01, *b"c"]),  # 2: list<binary> ["ab", "c"]
            bytes([0x19, 0x1C, 0x15, 0x0A, 0x00]),  # 3: list<struct> [{1: 5}]
            bytes([0x19, 0x21, 0x01, 0x02]),  # 4: list<bool> [true, false]
            bytes([0x19, 0x17]) + struct.pack("<d", 1.5),  # 5: list<double> [1.5]
            bytes([0x19, 0xF6, 0x10, *[0x02] * 16]),  # 6: list<i64> of 16 (long header)
            bytes([0x18, 0x82, 0x01]) + b"x" * 130,  # 7: binary of 130 bytes
            b"\x00",
        ]
    )
    assert parquet_splice._skip_struct(data, 0) == len(data)
    assert parquet_splice._skip(data, 0, 12) == len(data)
    refused = 0
    for cut in range(len(data)):
        try:
            end = parquet_splice._skip_struct(data[:cut], 0)
        except SpliceError:
            refused += 1
            continue
        assert end > cut
        with pytest.raises(SpliceError):
            Footer.parse(bytes([0x19, 0x1C]) + data[:cut])  # as a footer's schema list
    assert refused > len(data) - 140


def test_the_splice_refuses_a_page_index(tmp_path: Path) -> None:
    """Offsets this code does not move are refused, not copied wrong."""
    path = tmp_path / "f.parquet"
    pq.write_table(per_day(100), path, row_group_size=64, write_page_index=True)
    footer = Footer.parse(read_footer(path.read_bytes()))
    with pytest.raises(SpliceError, match="page index"):
        splice_footer(footer, 1, 64, footer, 100)


def test_the_copy_without_copy_file_range_gives_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = per_day(1000)
    want = whole(tmp_path / "want.parquet", full, 128)
    path = tmp_path / "f.parquet"
    whole(path, per_day(999), 128)

    def unsupported(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    assert extended(path, full, 128)
    assert path.read_bytes() == want


def test_a_copy_that_fails_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.parquet"
    whole(path, per_day(999), 128)
    before = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(store.StoreError, match="previous file was left unchanged"):
        extended(path, per_day(1000), 128)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.parquet"]
