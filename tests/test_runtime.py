"""Runtime guarantees: Dask gives the same tables as threads; concurrent runs never corrupt the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = (ROOT / "config" / "sample.toml").read_text()

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, runtime: str = "") -> Path:
    path = tmp_path / name
    path.write_text(SAMPLE_CONFIG + "\n[runtime]\n" + runtime + "\n")
    return path


def _tables(data: Path) -> dict[str, pd.DataFrame]:
    prices = {
        p.stem: pd.read_parquet(p).drop(columns=["fetched_at"])
        for p in sorted((data / "prices").glob("*.parquet"))
    }
    return {
        "sensitivity": pd.read_parquet(data / "reports" / "sensitivity"),
        "summary": pd.read_parquet(data / "reports" / "summary"),
        **{f"prices/{k}": v for k, v in prices.items()},
    }


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key], check_exact=True, obj=key)


def _cli(config: Path, data: Path, *extra: str) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("sensitivity")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen(
        [
            str(exe),
            "run",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--tickers",
            "KO,MSFT,XOM",
            "--start",
            "2016-01-01",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dask_runner_gives_the_same_tables_as_threads(tmp_path: Path) -> None:
    threads = _cli(_config(tmp_path, "threads.toml"), tmp_path / "threads")
    _, err = threads.communicate(timeout=300)
    assert threads.returncode == 0, err
    dask = _cli(_config(tmp_path, "dask.toml", 'task_runner = "dask"\ndask_workers = 2'), tmp_path / "dask")
    _, err = dask.communicate(timeout=300)
    assert dask.returncode == 0, err
    _assert_same(_tables(tmp_path / "threads"), _tables(tmp_path / "dask"))


def test_two_runs_at_once_leave_the_store_of_one_clean_run(tmp_path: Path) -> None:
    config = _config(tmp_path, "c.toml")
    clean = _cli(config, tmp_path / "clean")
    assert clean.wait(timeout=300) == 0, clean.communicate()[1]
    both = [_cli(config, tmp_path / "shared"), _cli(config, tmp_path / "shared")]
    for proc in both:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
    _assert_same(_tables(tmp_path / "clean"), _tables(tmp_path / "shared"))
    leftovers = [p for p in (tmp_path / "shared").rglob(".*") if p.name != ".lock"]
    assert not leftovers
