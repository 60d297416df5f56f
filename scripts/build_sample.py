"""Build the bundled offline sample: classic Yahoo CSV downloads -> the store's Parquet format.

Usage (from the project root)::

    .venv/bin/python scripts/build_sample.py [--src DIR] [--dest DIR]

(defaults: ``--src ../shared/data/yahoo_classic_2009_2019 --dest data/sample``).

Each ``<SYMBOL>.csv`` (``Date,Open,High,Low,Close,Adj Close,Volume``) becomes
``<dest>/<SYMBOL>.parquet`` in :data:`sensitivity.store.PRICE_SCHEMA`, written with the
store's own atomic writer.  Values are parsed exactly (correctly rounded, like pandas'
``float_precision="round_trip"``) and every cell is checked to round-trip: the float64
stored equals the CSV's decimal text rounded once to float64.
The classic CSV has no corporate actions, so ``dividends`` and ``splits`` are NaN (unknown,
not zero).  ``fetched_at`` is the source commit's date and ``source`` names the repository
and commit.  Provenance and licence: ``data/sample/SOURCES.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from sensitivity.prices import PRICE_COLUMNS, check_price_frame
from sensitivity.store import read_price_file, write_price_file
from sensitivity.symbols import normalize_symbol

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "data" / "yahoo_classic_2009_2019"
DEFAULT_DEST = ROOT / "data" / "sample"

#: Provenance written into every row.
SOURCE = "yahoo-classic-csv:jiewwantan/StarTrader@a2bbf17"
#: The source commit's date (a2bbf17ac2e7839754a8bd41842b37fd26806e69, 2019-03-04).
FETCHED_AT = dt.datetime(2019, 3, 4, tzinfo=dt.UTC)

CSV_COLUMNS = {
    "Open": "open",
    "High": "high",
    "Low": "low",
    "Close": "close",
    "Adj Close": "adj_close",
    "Volume": "volume",
}


def _exact_floats(texts: list[str], where: str) -> np.ndarray:
    """Decimal texts -> float64 with Python's correctly rounded ``float()`` (exact round trip)."""
    try:
        return np.array([float(t) for t in texts], dtype=np.float64)
    except ValueError as exc:
        raise SystemExit(f"{where}: {exc}") from exc


def read_classic_csv(path: Path) -> pd.DataFrame:
    """A classic Yahoo CSV download as a price frame, every value parsed exactly as float64.

    Cells are read as text and converted with ``float()``, which rounds correctly, so the
    float64 stored is the one nearest to the decimal in the file (what
    ``pandas.read_csv(float_precision="round_trip")`` gave before pandas 3 deprecated that
    switch); :func:`verify_round_trip` checks it cell by cell.
    """
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    if header != ["Date", *CSV_COLUMNS]:
        raise SystemExit(f"{path}: unexpected header {header}; expected Date,{','.join(CSV_COLUMNS)}")
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    index = pd.DatetimeIndex(pd.to_datetime(list(columns[0]), format="%Y-%m-%d"), name="date")
    frame = pd.DataFrame(
        {
            CSV_COLUMNS[name]: _exact_floats(list(columns[i + 1]), f"{path} column {name}")
            for i, name in enumerate(CSV_COLUMNS)
        },
        index=index,
    )
    frame["dividends"] = np.nan
    frame["splits"] = np.nan
    return frame.loc[:, list(PRICE_COLUMNS)]


def verify_round_trip(csv_path: Path, parquet_path: Path) -> int:
    """Check every stored value equals ``float(text)`` of its CSV cell; return cells checked.

    The reference is parsed independently with ``decimal.Decimal`` (exact) and rounded to
    float64 once, and compared with the values read back from the Parquet file.
    """
    stored = read_price_file(parquet_path)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(stored):
        raise SystemExit(f"{parquet_path}: {len(stored)} rows stored, {len(rows)} in {csv_path}")
    dates = [d.date().isoformat() for d in stored.index]
    if dates != [r["Date"] for r in rows]:
        raise SystemExit(f"{parquet_path}: stored dates differ from {csv_path}")
    checked = 0
    for text_col, col in CSV_COLUMNS.items():
        want = np.array([float(Decimal(r[text_col])) for r in rows], dtype=np.float64)
        got = stored[col].to_numpy(dtype=np.float64)
        bad = np.flatnonzero(got != want)
        if bad.size:
            i = int(bad[0])
            raise SystemExit(
                f"{parquet_path}: {rows[i]['Date']} {col} stored {got[i]!r} != CSV {rows[i][text_col]!r}"
            )
        checked += want.size
    if not (stored["dividends"].isna().all() and stored["splits"].isna().all()):
        raise SystemExit(f"{parquet_path}: dividends/splits must be NaN (the CSV has no actions)")
    return checked


def build(src: Path, dest: Path) -> list[Path]:
    """Convert every ``<SYMBOL>.csv`` in ``src`` into ``dest``; return the files written."""
    csvs = sorted(src.glob("*.csv"))
    if not csvs:
        raise SystemExit(f"no CSV files in {src}")
    written = []
    for csv_path in csvs:
        symbol = normalize_symbol(csv_path.stem)
        frame = check_price_frame(read_classic_csv(csv_path), symbol)
        out = write_price_file(
            dest / f"{symbol}.parquet", frame, symbol=symbol, source=SOURCE, fetched_at=FETCHED_AT
        )
        cells = verify_round_trip(csv_path, out)
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        print(
            f"{symbol:>6}: {len(frame)} rows {frame.index[0].date()}..{frame.index[-1].date()}, "
            f"{cells} values round-trip exactly -> {shown} ({out.stat().st_size:,} bytes)"
        )
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder of classic Yahoo CSVs")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="output folder")
    args = parser.parse_args(argv)
    build(args.src, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
